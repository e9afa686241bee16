//! The running snapshot: everything a connection or request needs, built from a
//! [`Config`] away from the hot path and published whole through one `ArcSwap`.
//!
//! A request loads the snapshot once and keeps it to the end, so a reload never
//! changes the rules under a request in flight; the next request on the same
//! keep-alive connection already sees the new one. Server live state is carried
//! from the previous snapshot by identity (backend name, server name).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::config::{self, Config};
use crate::http::route::Router;
use crate::metrics::FrontendStats;
use crate::upstream::Backend;

/// The current snapshot, shared by every listener and connection.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

#[derive(Debug)]
pub struct Runtime {
    /// Starts at 1 and grows by one with every successful reload.
    pub generation: u64,
    pub config: Arc<Config>,
    frontends: HashMap<String, Arc<Frontend>>,
    /// In file order.
    backends: Vec<Arc<Backend>>,
}

/// A frontend as the current snapshot sees it.
#[derive(Debug)]
pub struct Frontend {
    pub name: Arc<str>,
    pub config: config::Frontend,
    pub router: Router,
    pub access: AccessList,
    /// Counters kept across reloads.
    pub stats: Arc<FrontendStats>,
}

impl Runtime {
    /// Builds the snapshot for `config`, carrying server state over from
    /// `previous` where backend and server names stay.
    pub fn build(config: Arc<Config>, previous: Option<&Runtime>) -> Runtime {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|backend| {
                let old = previous.and_then(|runtime| runtime.backend(&backend.name));
                Arc::new(Backend::build(backend, old.map(|b| &**b)))
            })
            .collect();
        let by_name: HashMap<&str, &Arc<Backend>> = backends
            .iter()
            .map(|backend| (&*backend.name, backend))
            .collect();
        let frontends = config
            .frontends
            .iter()
            .filter_map(|frontend| {
                // Validation guarantees every backend a frontend names exists.
                let router =
                    Router::new(frontend, |name| by_name.get(name).map(|b| Arc::clone(b)))?;
                let stats = previous
                    .and_then(|runtime| runtime.frontend(&frontend.name))
                    .map(|old| Arc::clone(&old.stats))
                    .unwrap_or_default();
                let built = Frontend {
                    name: Arc::from(frontend.name.as_str()),
                    config: frontend.clone(),
                    router,
                    access: AccessList::new(&frontend.allow, &frontend.deny),
                    stats,
                };
                Some((frontend.name.clone(), Arc::new(built)))
            })
            .collect();
        Runtime {
            generation: previous.map_or(1, |runtime| runtime.generation + 1),
            config,
            frontends,
            backends,
        }
    }

    pub fn frontend(&self, name: &str) -> Option<&Arc<Frontend>> {
        self.frontends.get(name)
    }

    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|backend| &*backend.name == name)
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Frontends in file order.
    pub fn frontends(&self) -> impl Iterator<Item = &Arc<Frontend>> {
        self.config
            .frontends
            .iter()
            .filter_map(|frontend| self.frontends.get(&frontend.name))
    }
}

/// A frontend's client allow/deny lists: deny is checked first; an empty allow
/// list allows everyone not denied.
#[derive(Debug, Clone, Default)]
pub struct AccessList {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AccessList {
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> AccessList {
        AccessList {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
        }
    }

    pub fn permits(&self, client: std::net::IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let client = match client {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, std::net::IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|net| net.contains(&client)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("cidr")).collect()
    }

    #[test]
    fn deny_is_checked_before_allow() {
        let access = AccessList::new(&nets(&["10.0.0.0/8"]), &nets(&["10.0.0.5/32"]));
        assert!(access.permits("10.1.2.3".parse().expect("ip")));
        assert!(!access.permits("10.0.0.5".parse().expect("ip")));
        assert!(!access.permits("192.168.1.1".parse().expect("ip")));
    }

    #[test]
    fn empty_allow_list_allows_everyone_not_denied() {
        let access = AccessList::new(&[], &nets(&["127.0.0.2/32"]));
        assert!(access.permits("127.0.0.1".parse().expect("ip")));
        assert!(!access.permits("127.0.0.2".parse().expect("ip")));
        assert!(!access.permits("::ffff:127.0.0.2".parse().expect("ip")));
    }
}
