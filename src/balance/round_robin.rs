//! Smooth weighted round robin (nginx's algorithm).
//!
//! Over any window of sum(weights) consecutive picks every server gets exactly its
//! weight, and picks of a heavy server are spread out rather than bunched (weights
//! 5,1,1 give `a a b a c a a`). The schedule for one cycle is computed once per
//! change of the server set and shared by all threads; a pick is one atomic
//! increment and an index.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::derived::Derived;
use super::tier::{available, balance_weight};
use super::{PickContext, active_tier};
use crate::upstream::Server;

#[derive(Debug)]
pub struct RoundRobin {
    /// One cycle of picks, as indices into the backend's servers.
    schedule: Derived<Box<[u32]>>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(servers: &[Arc<Server>], epoch: Arc<AtomicU64>) -> RoundRobin {
        RoundRobin {
            schedule: Derived::new(epoch, || schedule(servers)),
            next: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self, servers: &[Arc<Server>], _ctx: &PickContext<'_>) -> Option<usize> {
        let order = self.schedule.load(|| schedule(servers));
        if order.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % order.len();
        // Normally the first candidate is taken. A server can have changed state
        // since the schedule was built, or be at its connection limit: then the
        // next ones in the cycle are tried.
        let (done, rest) = order.split_at(start);
        rest.iter()
            .chain(done)
            .map(|&index| index as usize)
            .find(|&index| available(&servers[index]))
    }
}

/// The cycle for the active tier as it is now.
fn schedule(servers: &[Arc<Server>]) -> Box<[u32]> {
    let weights: Vec<(u32, u32)> = active_tier(servers)
        .into_iter()
        .map(|index| (index as u32, balance_weight(&servers[index])))
        .collect();
    smooth_cycle(&weights).into_boxed_slice()
}

/// One cycle of nginx's smooth weighted round robin over `(id, weight)` pairs:
/// each step every current weight grows by its weight, the largest is picked and
/// loses the total. Weights are divided by their common divisor first, so the
/// cycle is as short as it can be.
fn smooth_cycle(weights: &[(u32, u32)]) -> Vec<u32> {
    let divisor = weights
        .iter()
        .map(|&(_, weight)| weight)
        .filter(|&weight| weight > 0)
        .fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let weights: Vec<(u32, i64)> = weights
        .iter()
        .filter(|&&(_, weight)| weight > 0)
        .map(|&(id, weight)| (id, i64::from(weight / divisor)))
        .collect();
    let total: i64 = weights.iter().map(|&(_, weight)| weight).sum();
    if total == weights.len() as i64 {
        // Equal weights give file order; large pools skip the n * total steps.
        return weights.iter().map(|&(id, _)| id).collect();
    }
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (slot, &(_, weight)) in weights.iter().enumerate() {
            current[slot] += weight;
            if current[slot] > current[best] {
                best = slot;
            }
        }
        current[best] -= total;
        order.push(weights[best].0);
    }
    order
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_cycle_spreads_a_heavy_server() {
        let order = smooth_cycle(&[(0, 5), (1, 1), (2, 1)]);
        assert_eq!(order, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn smooth_cycle_gives_exact_shares_in_every_window() {
        let weights = [(0, 3), (1, 7), (2, 1), (3, 4), (4, 0)];
        let cycle = smooth_cycle(&weights);
        let total: u32 = weights.iter().map(|w| w.1).sum();
        assert_eq!(cycle.len(), total as usize);
        // Any window of `total` consecutive picks of the repeating schedule.
        for start in 0..cycle.len() {
            let mut counts = [0u32; 5];
            for offset in 0..cycle.len() {
                counts[cycle[(start + offset) % cycle.len()] as usize] += 1;
            }
            for &(id, weight) in &weights {
                assert_eq!(counts[id as usize], weight, "window at {start}");
            }
        }
    }

    #[test]
    fn common_divisor_shortens_the_cycle() {
        assert_eq!(smooth_cycle(&[(0, 256), (1, 128)]), vec![0, 1, 0]);
        assert!(smooth_cycle(&[(0, 0), (1, 0)]).is_empty());
    }

    #[test]
    fn equal_weights_rotate_in_file_order() {
        assert_eq!(smooth_cycle(&[(0, 1), (1, 1), (2, 1)]), vec![0, 1, 2]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Through the balancer, with random weights (0 included): every run of
        /// one cycle's length, wherever it starts, gives every server exactly
        /// its weight divided by the weights' common divisor.
        #[test]
        fn exact_shares_over_every_cycle(weights in proptest::collection::vec(0u32..=12, 1..8)) {
            use crate::balance::testing::{self, Spec};
            let specs: Vec<Spec> = weights.iter().map(|&w| Spec::weight(w)).collect();
            let backend = testing::backend("round_robin", &specs);
            let balancer = RoundRobin::new(&backend.servers, Arc::clone(&backend.epoch));
            let ctx = PickContext { client: [127, 0, 0, 1].into(), key: None };
            let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
            if divisor == 0 {
                proptest::prop_assert_eq!(balancer.pick(&backend.servers, &ctx), None);
                return Ok(());
            }
            let cycle: u32 = weights.iter().map(|w| w / divisor).sum();
            let picks: Vec<usize> = (0..cycle * 3)
                .map(|_| balancer.pick(&backend.servers, &ctx).unwrap())
                .collect();
            for window in picks.windows(cycle as usize) {
                for (index, &weight) in weights.iter().enumerate() {
                    let count = window.iter().filter(|&&pick| pick == index).count() as u32;
                    proptest::prop_assert_eq!(count, weight / divisor);
                }
            }
        }
    }
}
