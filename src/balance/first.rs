//! First: the first server in file order that can take work and is under its
//! `max_connections` (HAProxy's `first`). With limits set, servers fill up one
//! after the other; without, everything goes to the first server up, which is
//! what active/passive and leader/follower pools want (the health check finds
//! the leader). Backup servers follow the same order once no primary is up.
//!
//! The scan is linear in the servers skipped, which are the full or down ones
//! before the one taken; usually there are none.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::PickContext;
use super::derived::Derived;
use super::tier::Tier;
use crate::upstream::Server;

#[derive(Debug)]
pub struct First {
    tier: Derived<Tier>,
}

impl First {
    pub fn new(servers: &[Arc<Server>], epoch: Arc<AtomicU64>) -> First {
        First {
            tier: Derived::new(epoch, || Tier::build(servers)),
        }
    }

    pub fn pick(&self, servers: &[Arc<Server>], _ctx: &PickContext<'_>) -> Option<usize> {
        self.tier
            .load(|| Tier::build(servers))
            .first_available(servers, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{self, Spec};
    use crate::upstream::{AdminState, Health};

    fn ctx() -> PickContext<'static> {
        PickContext {
            client: [127, 0, 0, 1].into(),
            key: None,
        }
    }

    #[test]
    fn fills_servers_in_file_order() {
        let specs = [
            Spec::max_connections(2),
            Spec::max_connections(1),
            Spec::weight(1),
        ];
        let backend = testing::backend("first", &specs);
        let balancer = First::new(&backend.servers, Arc::clone(&backend.epoch));
        let mut held = Vec::new();
        let mut picks = Vec::new();
        for _ in 0..5 {
            let index = balancer.pick(&backend.servers, &ctx()).unwrap();
            picks.push(index);
            held.push(backend.servers[index].begin());
        }
        assert_eq!(picks, vec![0, 0, 1, 2, 2]);
        // Server 0 frees a slot: it is first again.
        held.remove(0);
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(0));
    }

    #[test]
    fn moves_on_when_the_first_is_down_drained_or_weight_zero_and_back() {
        let backend = testing::backend("first", &testing::plain(3));
        let balancer = First::new(&backend.servers, Arc::clone(&backend.epoch));
        let first = &backend.servers[0].state;
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(0));
        first.set_health(Health::Down);
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(1));
        first.set_health(Health::Up);
        first.set_admin_state(AdminState::Drain);
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(1));
        first.set_admin_state(AdminState::Ready);
        first.set_weight_override(Some(0));
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(1));
        first.set_weight_override(None);
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(0));
    }

    #[test]
    fn backups_only_when_no_primary_is_up() {
        let specs = [Spec::max_connections(1), Spec::backup(), Spec::backup()];
        let backend = testing::backend("first", &specs);
        let balancer = First::new(&backend.servers, Arc::clone(&backend.epoch));
        let _held = backend.servers[0].begin();
        // The primary is full, not down: wait for it rather than spill over.
        assert_eq!(balancer.pick(&backend.servers, &ctx()), None);
        backend.servers[0].state.set_health(Health::Down);
        assert_eq!(balancer.pick(&backend.servers, &ctx()), Some(1));
    }
}
