//! Server selection: one [`Balancer`] per backend, an enum over the algorithms the
//! config names, each with one `pick`.
//!
//! Every algorithm sees only servers that can take traffic now (up, not drained
//! or in maintenance, weight above zero), and backup servers only while no
//! non-backup server can. Picking reads atomics and an immutable schedule; it
//! takes no lock. Whatever an algorithm derives from the server set (a schedule,
//! a ring) it rebuilds when the backend's epoch moves, which every change of
//! health, admin state or weight bumps.

mod round_robin;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use round_robin::RoundRobin;

use crate::config;
use crate::upstream::Server;

/// What a pick may look at besides the servers' live state.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The client's address (the `source` algorithm hashes it).
    pub client: IpAddr,
    /// The request's hash key, when the backend hashes one and the request has it.
    pub key: Option<&'a [u8]>,
}

/// A backend's balancing algorithm and whatever state it keeps.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
}

impl Balancer {
    pub fn new(backend: &config::Backend, epoch: Arc<AtomicU64>) -> Balancer {
        match backend.balance {
            config::Balance::RoundRobin => Balancer::RoundRobin(RoundRobin::new(epoch)),
            other => {
                tracing::warn!(
                    backend = %backend.name,
                    balance = other.as_str(),
                    "balance algorithm not available yet, using round_robin"
                );
                Balancer::RoundRobin(RoundRobin::new(epoch))
            }
        }
    }

    /// The index (into `servers`) of the server that takes the next request or
    /// session, or `None` when no server can take it now.
    #[inline]
    pub fn pick(&self, servers: &[Arc<Server>], ctx: &PickContext<'_>) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(servers, ctx),
        }
    }
}

/// Indices of the servers in the tier that takes traffic now: the usable
/// non-backup servers, or, when there are none, the usable backup servers.
pub fn active_tier(servers: &[Arc<Server>]) -> Vec<usize> {
    let usable = |backup: bool| {
        servers
            .iter()
            .enumerate()
            .filter(move |(_, server)| server.backup == backup && server.is_usable())
            .map(|(index, _)| index)
    };
    let primary: Vec<usize> = usable(false).collect();
    if primary.is_empty() {
        usable(true).collect()
    } else {
        primary
    }
}
