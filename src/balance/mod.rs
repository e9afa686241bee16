//! Server selection: one [`Balancer`] per backend, an enum over the algorithms the
//! config names, each with one `pick`.
//!
//! Every algorithm sees only servers that can take traffic now (up, not drained
//! or in maintenance, weight above zero), and backup servers only while no
//! non-backup server can; none picks a server at its `max_connections`. Picking
//! reads atomics and an immutable table; it takes no lock. Whatever an algorithm
//! derives from the server set (a schedule, a ring, a sampling table) it
//! rebuilds when the backend's epoch moves, which every change of health, admin
//! state or weight bumps (see [`derived`]).
//!
//! docs/balancing.md explains the algorithms for operators.

mod derived;
mod first;
mod hash;
mod least_conn;
mod p2c;
mod random;
mod round_robin;
mod tier;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use first::First;
pub use hash::{Hash, hash_client, hash_key};
pub use least_conn::LeastConn;
pub use p2c::P2c;
pub use random::Random;
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
    LeastConn(LeastConn),
    Random(Random),
    P2c(P2c),
    /// `source` and `hash`.
    Hash(Hash),
    First(First),
}

impl Balancer {
    /// The balancer for `backend` over `servers` (the backend's servers in file
    /// order, which picks index into). Its tables are built here, from the
    /// servers' state as of `epoch`.
    pub fn new(
        backend: &config::Backend,
        servers: &[Arc<Server>],
        epoch: Arc<AtomicU64>,
    ) -> Balancer {
        use config::Balance;
        match backend.balance {
            Balance::RoundRobin => Balancer::RoundRobin(RoundRobin::new(servers, epoch)),
            Balance::LeastConn => Balancer::LeastConn(LeastConn::new(servers, epoch)),
            Balance::Random => Balancer::Random(Random::new(servers, epoch)),
            Balance::P2c => Balancer::P2c(P2c::new(servers, epoch)),
            Balance::Source | Balance::Hash => Balancer::Hash(Hash::new(backend, servers, epoch)),
            Balance::First => Balancer::First(First::new(servers, epoch)),
        }
    }

    /// The index (into `servers`) of the server that takes the next request or
    /// session, or `None` when no server can take it now.
    #[inline]
    pub fn pick(&self, servers: &[Arc<Server>], ctx: &PickContext<'_>) -> Option<usize> {
        match self {
            Balancer::RoundRobin(balancer) => balancer.pick(servers, ctx),
            Balancer::LeastConn(balancer) => balancer.pick(servers, ctx),
            Balancer::Random(balancer) => balancer.pick(servers, ctx),
            Balancer::P2c(balancer) => balancer.pick(servers, ctx),
            Balancer::Hash(balancer) => balancer.pick(servers, ctx),
            Balancer::First(balancer) => balancer.pick(servers, ctx),
        }
    }
}

/// Indices of the servers in the tier that takes traffic now: the usable
/// non-backup servers, or, when there are none, the usable backup servers.
pub fn active_tier(servers: &[Arc<Server>]) -> Vec<usize> {
    let backup = backups_take_traffic(servers);
    servers
        .iter()
        .enumerate()
        .filter(|(_, server)| server.backup == backup && server.is_usable())
        .map(|(index, _)| index)
        .collect()
}

/// Whether the backup servers are the tier that takes traffic: no non-backup
/// server is usable.
pub(crate) fn backups_take_traffic(servers: &[Arc<Server>]) -> bool {
    !servers
        .iter()
        .any(|server| !server.backup && server.is_usable())
}

/// Backends to test balancers on: servers that are never contacted, with the
/// live state a real backend has.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use crate::config;
    use crate::upstream::Backend;

    /// One server of a test backend; unnamed servers are called s0, s1, ...
    #[derive(Debug, Clone)]
    pub struct Spec {
        pub name: Option<String>,
        pub weight: u32,
        pub backup: bool,
        pub max_connections: u32,
    }

    impl Default for Spec {
        fn default() -> Self {
            Spec {
                name: None,
                weight: 1,
                backup: false,
                max_connections: 0,
            }
        }
    }

    impl Spec {
        pub fn named(name: &str) -> Spec {
            Spec {
                name: Some(name.to_string()),
                ..Spec::default()
            }
        }

        pub fn weight(weight: u32) -> Spec {
            Spec {
                weight,
                ..Spec::default()
            }
        }

        pub fn max_connections(max_connections: u32) -> Spec {
            Spec {
                max_connections,
                ..Spec::default()
            }
        }

        pub fn backup() -> Spec {
            Spec {
                backup: true,
                ..Spec::default()
            }
        }
    }

    /// `n` servers of weight 1.
    pub fn plain(n: usize) -> Vec<Spec> {
        vec![Spec::default(); n]
    }

    pub fn backend(balance: &str, specs: &[Spec]) -> Backend {
        backend_with(balance, "", specs)
    }

    /// A backend with `balance`, more backend keys in `extra` (TOML lines), and
    /// the servers in `specs`.
    pub fn backend_with(balance: &str, extra: &str, specs: &[Spec]) -> Backend {
        let toml = format!(
            "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
             [backends.pool]\nbalance = \"{balance}\"\n{extra}\n\
             [backends.pool.health]\ncheck = \"none\"\n\n\
             [[backends.pool.servers]]\naddress = \"127.0.0.1:1\"\n"
        );
        let config = config::parse(&toml, Path::new("test.toml"))
            .unwrap_or_else(|errors| panic!("{errors}\n{toml}"));
        let mut backend = config.backends[0].clone();
        let template = backend.servers[0].clone();
        backend.servers = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| config::Server {
                name: spec.name.clone().unwrap_or_else(|| format!("s{i}")),
                address: format!("127.0.0.1:{}", 10_000 + i),
                addr: ([127, 0, 0, 1], 10_000 + i as u16).into(),
                weight: spec.weight,
                backup: spec.backup,
                max_connections: spec.max_connections,
                ..template.clone()
            })
            .collect();
        Backend::build(&backend, None)
    }
}
