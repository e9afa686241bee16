//! Backends and their servers: identity, live state, connection pools, and the
//! pick that hands a request or session to one server.

pub mod pool;
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use pool::{ConnectError, Connection, Pool, PoolSettings};
pub use server::{AdminState, Health, InFlightGuard, Server, ServerState, ServerStatus};

use crate::balance::{Balancer, PickContext};
use crate::config;

/// A backend as the current snapshot sees it.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub config: config::Backend,
    /// In file order.
    pub servers: Vec<Arc<Server>>,
    pub balancer: Balancer,
    /// Bumped by any server state change; shared with the servers' live state and
    /// with the same backend in later snapshots.
    pub epoch: Arc<AtomicU64>,
}

impl Backend {
    /// Builds the backend for a new snapshot. Live state and pools of servers
    /// that `previous` already had (same server name) are carried over, so health,
    /// counters, admin state and warm connections survive a reload.
    pub fn build(config: &config::Backend, previous: Option<&Backend>) -> Backend {
        let epoch = previous
            .map(|backend| Arc::clone(&backend.epoch))
            .unwrap_or_default();
        let kept: HashMap<&str, &Arc<Server>> = previous
            .map(|backend| {
                backend
                    .servers
                    .iter()
                    .map(|server| (&*server.name, server))
                    .collect()
            })
            .unwrap_or_default();
        let settings = PoolSettings {
            protocol: config.protocol,
            connect_timeout: config.timeouts.connect,
            idle_timeout: config.timeouts.idle,
        };
        let servers = config
            .servers
            .iter()
            .map(|server| {
                let old = kept.get(server.name.as_str());
                let state = old
                    .map(|old| Arc::clone(&old.state))
                    .unwrap_or_else(|| Arc::new(ServerState::new(Arc::clone(&epoch))));
                let pool = old
                    .filter(|old| {
                        old.pool.addr() == server.addr && *old.pool.settings() == settings
                    })
                    .map(|old| Arc::clone(&old.pool))
                    .unwrap_or_else(|| Arc::new(Pool::new(server.addr, settings.clone())));
                Arc::new(Server::new(server, state, pool))
            })
            .collect();
        // A new server set is a change balancers must see.
        epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Backend {
            name: Arc::from(config.name.as_str()),
            balancer: Balancer::new(config, Arc::clone(&epoch)),
            config: config.clone(),
            servers,
            epoch,
        }
    }

    /// The server that takes the next request or session, or `None` when no
    /// server can take it now.
    #[inline]
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<&Arc<Server>> {
        self.balancer
            .pick(&self.servers, ctx)
            .map(|index| &self.servers[index])
    }

    pub fn server(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|server| &*server.name == name)
    }
}
