//! Weighted random: each pick draws a server with probability weight / total,
//! in constant time from an alias table, with the calling thread's own
//! generator. No state is shared between picks, so it needs no coordination
//! between proxies either: several flowgate instances in front of one pool
//! spread independently.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::PickContext;
use super::derived::Derived;
use super::tier::{RandomSource, ThreadRandom, WeightedTier, available};
use crate::upstream::Server;

/// Draws after the first one that found a server full or gone, before falling
/// back to a scan.
const REDRAWS: usize = 2;

#[derive(Debug)]
pub struct Random {
    table: Derived<WeightedTier>,
}

impl Random {
    pub fn new(servers: &[Arc<Server>], epoch: Arc<AtomicU64>) -> Random {
        Random {
            table: Derived::new(epoch, || WeightedTier::build(servers)),
        }
    }

    pub fn pick(&self, servers: &[Arc<Server>], _ctx: &PickContext<'_>) -> Option<usize> {
        self.pick_with(servers, &mut ThreadRandom)
    }

    pub(crate) fn pick_with(
        &self,
        servers: &[Arc<Server>],
        random: &mut impl RandomSource,
    ) -> Option<usize> {
        let table = self.table.load(|| WeightedTier::build(servers));
        if table.tier.len() == 0 {
            return None;
        }
        for _ in 0..=REDRAWS {
            let index = table.tier.members[table.draw(random)].index;
            if available(&servers[index]) {
                return Some(index);
            }
        }
        let start = random.below(table.tier.len() as u64) as usize;
        table.tier.first_available(servers, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{self, Spec};
    use crate::upstream::Health;

    #[test]
    fn shares_follow_weights() {
        let specs = [Spec::weight(1), Spec::weight(2), Spec::weight(7)];
        let backend = testing::backend("random", &specs);
        let balancer = Random::new(&backend.servers, Arc::clone(&backend.epoch));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0usize; 3];
        let picks = 100_000;
        for _ in 0..picks {
            counts[balancer.pick_with(&backend.servers, &mut rng).unwrap()] += 1;
        }
        for (count, weight) in counts.iter().zip([1.0, 2.0, 7.0]) {
            let share = *count as f64 / picks as f64;
            assert!((share - weight / 10.0).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn never_picks_weight_zero_down_or_full_servers() {
        let specs = [
            Spec::weight(0),
            Spec::weight(1),
            Spec::max_connections(1),
            Spec::weight(5),
        ];
        let backend = testing::backend("random", &specs);
        let balancer = Random::new(&backend.servers, Arc::clone(&backend.epoch));
        let _full = backend.servers[2].begin();
        backend.servers[3].state.set_health(Health::Down);
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..1_000 {
            assert_eq!(balancer.pick_with(&backend.servers, &mut rng), Some(1));
        }
        backend.servers[1].state.set_health(Health::Down);
        assert_eq!(balancer.pick_with(&backend.servers, &mut rng), None);
    }
}
