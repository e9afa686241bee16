//! Backends and their servers: identity, live state, connection pools, and the
//! pick that hands a request or session to one server.

pub mod pool;
mod queue;
pub mod response_time;
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use tokio::sync::Notify;

pub use pool::{ConnectError, Connection, Pool, PoolSettings, ServerStream, UpstreamTls};
pub use queue::{Queue, QueueError};
pub use response_time::ResponseTime;
pub use server::{
    AdminState, CheckStatus, FULL_WEIGHT, Health, InFlightGuard, Server, ServerState, ServerStatus,
};

use crate::balance::{Balancer, PickContext};
use crate::config;
use crate::metrics::AtomicHistogram;

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
    /// Notified on the same changes, so queued requests look again.
    pub changed: Arc<Notify>,
    /// Requests waiting for a server slot; shared with later snapshots.
    pub queue: Arc<Queue>,
    /// Counters that outlive reloads.
    pub stats: Arc<BackendStats>,
    /// In-flight work on all servers of the backend; shared like `epoch`.
    pub in_flight: Arc<AtomicU32>,
}

/// A backend's counters, kept across reloads.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Attempts made again after a failure.
    pub retries: AtomicU64,
    pub connect_errors: AtomicU64,
    /// From sending a request to its response head.
    pub response_seconds: AtomicHistogram,
    /// Time waited for a slot, by requests that waited.
    pub queue_seconds: AtomicHistogram,
}

/// Why no server slot could be had for a request or session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no server available")]
    NoServer,
    #[error("queue full")]
    QueueFull,
    #[error("queue timeout")]
    QueueTimeout,
}

/// TLS settings for one server of a backend with a `tls` table: the configured
/// `server_name`, else the host the server's address names.
pub fn upstream_tls(backend: &config::Backend, server: &config::Server) -> Option<UpstreamTls> {
    let tls = backend.tls.as_ref()?;
    Some(server_tls(
        tls,
        tls.client.clone()?,
        &server.address,
        server.addr,
    ))
}

/// TLS settings for the health checks of one server: as [`upstream_tls`], with
/// the checks' ALPN; `None` when checks speak plain TCP (`health.tls = false`).
pub fn check_tls(backend: &config::Backend, server: &Server) -> Option<UpstreamTls> {
    let tls = backend.tls.as_ref()?;
    Some(server_tls(
        tls,
        tls.check_client.clone()?,
        &server.address,
        server.addr,
    ))
}

fn server_tls(
    tls: &config::BackendTls,
    config: Arc<rustls::ClientConfig>,
    address: &str,
    addr: std::net::SocketAddr,
) -> UpstreamTls {
    let host = match &tls.server_name {
        Some(name) => name.clone(),
        None => address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    };
    let server_name = rustls::pki_types::ServerName::try_from(host)
        .unwrap_or_else(|_| rustls::pki_types::ServerName::from(addr.ip()));
    UpstreamTls {
        config,
        server_name,
        ca_digest: tls.ca_digest,
    }
}

/// Longest passive ejection, however often a server was ejected.
const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Backend {
    /// Builds the backend for a new snapshot. Live state and pools of servers
    /// that `previous` already had (same server name) are carried over, so health,
    /// counters, admin state and warm connections survive a reload.
    pub fn build(config: &config::Backend, previous: Option<&Backend>) -> Backend {
        let epoch = previous
            .map(|backend| Arc::clone(&backend.epoch))
            .unwrap_or_default();
        let changed = previous
            .map(|backend| Arc::clone(&backend.changed))
            .unwrap_or_default();
        let queue = previous
            .map(|backend| Arc::clone(&backend.queue))
            .unwrap_or_default();
        let stats = previous
            .map(|backend| Arc::clone(&backend.stats))
            .unwrap_or_default();
        let in_flight = previous
            .map(|backend| Arc::clone(&backend.in_flight))
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
        let settings_for = |server: &config::Server| PoolSettings {
            protocol: config.protocol,
            connect_timeout: config.timeouts.connect,
            idle_timeout: config.timeouts.idle,
            tls: upstream_tls(config, server),
        };
        let checked = config.health.check != config::CheckKind::None;
        let servers: Vec<Arc<Server>> = config
            .servers
            .iter()
            .map(|server| {
                let settings = settings_for(server);
                let old = kept.get(server.name.as_str());
                let state = old.map(|old| Arc::clone(&old.state)).unwrap_or_else(|| {
                    Arc::new(
                        ServerState::new(Arc::clone(&epoch), Arc::clone(&changed), checked)
                            .sharing_backend_in_flight(Arc::clone(&in_flight)),
                    )
                });
                let pool = old
                    .filter(|old| {
                        old.pool.addr() == server.addr && *old.pool.settings() == settings
                    })
                    .map(|old| Arc::clone(&old.pool))
                    .unwrap_or_else(|| Arc::new(Pool::new(server.addr, settings)));
                Arc::new(Server::new(server, state, pool, Arc::clone(&queue)))
            })
            .collect();
        // A new server set is a change balancers must see.
        epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Backend {
            name: Arc::from(config.name.as_str()),
            balancer: Balancer::new(config, &servers, Arc::clone(&epoch)),
            config: config.clone(),
            servers,
            epoch,
            changed,
            queue,
            stats,
            in_flight,
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

    /// A slot on a server for one request or session: picked at once when a
    /// server can take it, else after waiting in the backend's FIFO queue (at
    /// most `max_queue` waiters, each at most `timeouts.queue`). With no usable
    /// server at all the answer is immediate.
    pub async fn acquire(&self, ctx: &PickContext<'_>) -> Result<InFlightGuard, Unavailable> {
        if self.queue.is_empty()
            && let Some(server) = self.pick(ctx).or_else(|| self.server_with_room())
        {
            return Ok(server.begin());
        }
        if !self.servers.iter().any(|server| server.is_usable()) {
            return Err(Unavailable::NoServer);
        }
        let mut slot = self
            .queue
            .join(self.config.max_queue)
            .map_err(|_| Unavailable::QueueFull)?;
        // A slot may have come free between the pick above and joining.
        if let Some(server) = self.pick(ctx) {
            slot.close();
            // A slot handed over meanwhile goes on to the next waiter.
            drop(slot.try_recv());
            self.queue.prune();
            return Ok(server.begin());
        }
        let queued = tokio::time::Instant::now();
        let deadline = queued + self.config.timeouts.queue;
        loop {
            // Armed before waiting, so a change in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            tokio::select! {
                handed = &mut slot => match handed {
                    Ok(guard) => {
                        self.stats.queue_seconds.observe(queued.elapsed());
                        return Ok(guard);
                    }
                    Err(_) => break,
                },
                // A server came back, was made ready, or got weight: free
                // capacity goes to the oldest waiters first (maybe this one).
                () = changed => self.dispatch(ctx),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        slot.close();
        // A slot handed over at the last moment goes on to the next waiter.
        drop(slot.try_recv());
        self.queue.prune();
        self.stats.queue_seconds.observe(queued.elapsed());
        Err(Unavailable::QueueTimeout)
    }

    /// Hands free capacity to queued requests, oldest first.
    fn dispatch(&self, ctx: &PickContext<'_>) {
        while !self.queue.is_empty() {
            let Some(server) = self.pick(ctx) else {
                return;
            };
            if self.queue.hand_over(server.begin()).is_some() {
                // Nobody was waiting after all; the slot is released.
                return;
            }
        }
    }

    /// The first server, in file order, of the tier that takes traffic now
    /// (backups only while no other server is usable) that is under its
    /// `max_connections`. The balancer can miss such a server for the instant
    /// it rebuilds what it derives from the server set (a new snapshot after a
    /// reload, a state change), and the queue is only for servers at their
    /// limit: a request queued then would wait for a slot that nothing hands
    /// over, and get a 503 at `timeouts.queue`.
    fn server_with_room(&self) -> Option<&Arc<Server>> {
        let primary = self
            .servers
            .iter()
            .any(|server| !server.backup && server.is_usable());
        self.servers
            .iter()
            .find(|server| server.backup != primary && server.is_usable() && server.has_capacity())
    }

    /// The slot for another attempt after `failed` failed: another server when
    /// `redispatch` is on and one can take it, else the same server again.
    pub async fn acquire_retry(
        &self,
        ctx: &PickContext<'_>,
        failed: Option<&Arc<Server>>,
    ) -> Result<InFlightGuard, Unavailable> {
        let Some(failed) = failed else {
            return self.acquire(ctx).await;
        };
        if !self.config.redispatch && failed.has_capacity() {
            return Ok(failed.begin());
        }
        let guard = self.acquire(ctx).await?;
        if !Arc::ptr_eq(guard.server(), failed) {
            return Ok(guard);
        }
        // The algorithm chose the failed server again (a hash, `first`): the
        // next server in file order, of the tier that takes traffic now
        // (backups only while no primary is usable, as for any pick), that
        // can take the attempt, if any.
        let primary_usable = self
            .servers
            .iter()
            .any(|server| !server.backup && server.is_usable());
        let start = self
            .servers
            .iter()
            .position(|s| Arc::ptr_eq(s, failed))
            .unwrap_or(0);
        let alternative = (1..self.servers.len())
            .map(|offset| &self.servers[(start + offset) % self.servers.len()])
            .find(|server| {
                server.backup != primary_usable && server.is_usable() && server.has_capacity()
            });
        Ok(match alternative {
            Some(server) => {
                drop(guard);
                server.begin()
            }
            None => guard,
        })
    }

    /// A live success from `server` (passive checks).
    #[inline]
    pub fn record_success(&self, server: &Server) {
        if self.config.passive.is_some() {
            server.state.record_live_success();
        }
    }

    /// A live failure from `server`: a connect error, a reset, a 502/503/504.
    /// After `passive.consecutive_failures` of them in a row the server is
    /// ejected for `passive.ejection_time`, doubled for each ejection in a row
    /// (at most 5 minutes). The last usable server of a backend is never
    /// ejected: an unreliable server serves better than none.
    pub fn record_failure(&self, server: &Arc<Server>, why: &str) {
        let Some(passive) = self.config.passive else {
            return;
        };
        let failures = server.state.record_live_failure();
        if failures < passive.consecutive_failures || server.state.is_ejected() {
            return;
        }
        let others_usable = self
            .servers
            .iter()
            .any(|other| !Arc::ptr_eq(other, server) && other.is_usable());
        if !others_usable {
            tracing::warn!(
                "{}/{} has {failures} failures in a row ({why}) but is the last usable server: not ejected",
                self.name,
                server.name
            );
            return;
        }
        let repeat = server.state.count_ejection();
        let duration = passive
            .ejection_time
            .saturating_mul(1 << (repeat - 1).min(16))
            .min(MAX_EJECTION.max(passive.ejection_time));
        server.state.reset_live_failures();
        server.state.set_ejected(true);
        tracing::warn!(
            "{}/{} ejected for {} after {failures} failures in a row: {why}",
            self.name,
            server.name,
            humantime::format_duration(duration)
        );
        let (state, name) = (
            Arc::clone(&server.state),
            format!("{}/{}", self.name, server.name),
        );
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            state.set_ejected(false);
            tracing::info!("{name} back from ejection");
            // Behaving for as long again as it was out earns a fresh start.
            tokio::time::sleep(duration).await;
            if !state.is_ejected() {
                state.forgive_ejections();
            }
        });
    }

    pub fn server(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|server| &*server.name == name)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::balance::testing::{self, Spec};

    const CTX: PickContext<'static> = PickContext {
        client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        key: None,
    };

    async fn retry_server(backend: &Backend, failed: usize) -> Option<usize> {
        let guard = backend
            .acquire_retry(&CTX, Some(&backend.servers[failed]))
            .await
            .ok()?;
        backend
            .servers
            .iter()
            .position(|server| Arc::ptr_eq(server, guard.server()))
    }

    #[tokio::test]
    async fn another_attempt_skips_backups_while_a_primary_is_usable() {
        // `first` picks server 0 again; in file order after it comes a backup.
        let specs = [Spec::default(), Spec::backup(), Spec::default()];
        let backend = testing::backend("first", &specs);
        assert_eq!(retry_server(&backend, 0).await, Some(2));
    }

    #[tokio::test]
    async fn another_attempt_stays_on_the_failed_primary_rather_than_a_backup() {
        let specs = [Spec::default(), Spec::backup()];
        let backend = testing::backend("first", &specs);
        assert_eq!(retry_server(&backend, 0).await, Some(0));
    }

    #[tokio::test]
    async fn another_attempt_moves_between_backups_once_no_primary_is_usable() {
        let specs = [Spec::default(), Spec::backup(), Spec::backup()];
        let backend = testing::backend("first", &specs);
        backend.servers[0].state.set_health(Health::Down);
        assert_eq!(retry_server(&backend, 1).await, Some(2));
    }

    #[tokio::test]
    async fn another_attempt_skips_full_servers_and_without_redispatch_stays() {
        let specs = [Spec::default(), Spec::max_connections(1), Spec::default()];
        let backend = testing::backend("first", &specs);
        let _held = backend.servers[1].begin();
        assert_eq!(retry_server(&backend, 0).await, Some(2));
        let backend = testing::backend_with("first", "redispatch = false", &specs);
        assert_eq!(retry_server(&backend, 2).await, Some(2));
    }
}
