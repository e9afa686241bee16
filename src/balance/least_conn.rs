//! Least connections: the server with the fewest in-flight requests (http) or
//! open sessions (tcp) for its weight, so a server with weight 2 is as loaded
//! as one with weight 1 when it holds twice the work. A long-poll counts for as
//! long as it waits, which is what makes this the choice for worker pools.
//!
//! Ties are broken in rotation: the scan starts one server further each pick,
//! and the first of the least loaded from there wins. The scan reads one atomic
//! per server, so a pick costs time linear in the size of the tier (see
//! docs/balancing.md for what that means at thousands of servers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::PickContext;
use super::derived::Derived;
use super::tier::{Tier, available};
use crate::upstream::Server;

#[derive(Debug)]
pub struct LeastConn {
    tier: Derived<Tier>,
    next: AtomicUsize,
}

impl LeastConn {
    pub fn new(servers: &[Arc<Server>], epoch: Arc<AtomicU64>) -> LeastConn {
        LeastConn {
            tier: Derived::new(epoch, || Tier::build(servers)),
            next: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self, servers: &[Arc<Server>], _ctx: &PickContext<'_>) -> Option<usize> {
        let tier = self.tier.load(|| Tier::build(servers));
        if tier.len() == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % tier.len();
        let best = least_loaded(&tier, start)?;
        if available(&servers[best]) {
            Some(best)
        } else {
            // The table is a moment behind a state change: check everything.
            tier.first_available(servers, start)
        }
    }
}

/// The least loaded member for its weight that has room, scanning from `start`
/// and wrapping around, so among equals the first from `start` wins. An idle
/// server cannot be beaten: the scan stops at the first one.
#[inline]
fn least_loaded(tier: &Tier, start: usize) -> Option<usize> {
    let (wrapped, from_start) = tier.members.split_at(start);
    if tier.uniform {
        // Equal weights and no limits (the usual pool): compare counts alone.
        let (mut best_load, mut best) = (u32::MAX, None);
        for member in from_start.iter().chain(wrapped) {
            let in_flight = member.state.in_flight();
            if in_flight < best_load {
                if in_flight == 0 {
                    return Some(member.index);
                }
                (best_load, best) = (in_flight, Some(member.index));
            }
        }
        return best;
    }
    // a/b < c/d as a*d < c*b; the starting "best" loses to any real load.
    let (mut best_load, mut best_weight, mut best) = (1u64 << 32, 1u64, None);
    for member in from_start.iter().chain(wrapped) {
        let in_flight = member.state.in_flight();
        if in_flight == 0 {
            return Some(member.index);
        }
        let (load, weight) = (u64::from(in_flight), u64::from(member.weight));
        if load * best_weight < best_load * weight && member.has_room(in_flight) {
            (best_load, best_weight, best) = (load, weight, Some(member.index));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{self, Spec};
    use crate::upstream::{AdminState, InFlightGuard};

    fn ctx() -> PickContext<'static> {
        PickContext {
            client: [127, 0, 0, 1].into(),
            key: None,
        }
    }

    #[test]
    fn equal_loads_rotate_through_every_server() {
        let backend = testing::backend("least_conn", &testing::plain(4));
        let balancer = LeastConn::new(&backend.servers, Arc::clone(&backend.epoch));
        let picks: Vec<usize> = (0..8)
            .map(|_| balancer.pick(&backend.servers, &ctx()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn follows_the_work_held_open() {
        let backend = testing::backend("least_conn", &testing::plain(3));
        let balancer = LeastConn::new(&backend.servers, Arc::clone(&backend.epoch));
        // Every pick holds its request open: the counts stay level.
        let mut held: Vec<InFlightGuard> = Vec::new();
        for _ in 0..30 {
            let index = balancer.pick(&backend.servers, &ctx()).unwrap();
            held.push(backend.servers[index].begin());
        }
        for server in &backend.servers {
            assert_eq!(server.state.in_flight(), 10);
        }
        // Server 1 finishes its work: it takes the next ten.
        held.retain(|guard| &*guard.server().name != "s1");
        for _ in 0..10 {
            let index = balancer.pick(&backend.servers, &ctx()).unwrap();
            assert_eq!(index, 1);
            held.push(backend.servers[index].begin());
        }
    }

    #[test]
    fn weight_scales_the_load_a_server_may_hold() {
        let specs = [Spec::weight(1), Spec::weight(3)];
        let backend = testing::backend("least_conn", &specs);
        let balancer = LeastConn::new(&backend.servers, Arc::clone(&backend.epoch));
        let mut held = Vec::new();
        for _ in 0..40 {
            let index = balancer.pick(&backend.servers, &ctx()).unwrap();
            held.push(backend.servers[index].begin());
        }
        assert_eq!(backend.servers[0].state.in_flight(), 10);
        assert_eq!(backend.servers[1].state.in_flight(), 30);
    }

    #[test]
    fn skips_full_drained_and_backup_servers() {
        let specs = [Spec::max_connections(1), Spec::weight(1), Spec::backup()];
        let backend = testing::backend("least_conn", &specs);
        let balancer = LeastConn::new(&backend.servers, Arc::clone(&backend.epoch));
        let _full = backend.servers[0].begin();
        for _ in 0..5 {
            assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(1));
        }
        backend.servers[1].state.set_admin_state(AdminState::Drain);
        // Server 0 is up (so the backup stays out) but full.
        assert_eq!(balancer.pick(&backend.servers, &ctx()), None);
        backend.servers[0].state.set_admin_state(AdminState::Maint);
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(2));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The pick is never strictly more loaded (for its weight) than any
        /// other server that could have taken the work.
        #[test]
        fn never_picks_a_more_loaded_server(
            servers in proptest::collection::vec((1u32..=8, 0u32..12, 0u32..4), 1..12),
            picks in 1usize..40,
        ) {
            let specs: Vec<Spec> = servers
                .iter()
                .map(|&(weight, _, max)| Spec { weight, max_connections: max * 5, ..Spec::default() })
                .collect();
            let backend = testing::backend("least_conn", &specs);
            let balancer = LeastConn::new(&backend.servers, Arc::clone(&backend.epoch));
            let mut held = Vec::new();
            for (server, &(_, load, _)) in backend.servers.iter().zip(&servers) {
                for _ in 0..load {
                    held.push(server.begin());
                }
            }
            for _ in 0..picks {
                let picked = balancer.pick(&backend.servers, &ctx());
                let candidates: Vec<&Arc<Server>> =
                    backend.servers.iter().filter(|s| available(s)).collect();
                let Some(picked) = picked else {
                    proptest::prop_assert!(candidates.is_empty());
                    continue;
                };
                let chosen = &backend.servers[picked];
                proptest::prop_assert!(available(chosen));
                for other in candidates {
                    let mine = u64::from(chosen.state.in_flight()) * u64::from(other.weight());
                    let theirs = u64::from(other.state.in_flight()) * u64::from(chosen.weight());
                    proptest::prop_assert!(mine <= theirs, "picked {} over {}", chosen.name, other.name);
                }
                held.push(chosen.begin());
            }
        }
    }
}
