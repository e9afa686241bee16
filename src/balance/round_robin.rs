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

/// The longest cycle: 4 MiB of schedule. Pools whose weights add up to more
/// (after dividing by their common divisor) have them scaled down to fit.
const MAX_CYCLE: u64 = 1 << 20;

/// One cycle of nginx's smooth weighted round robin over `(id, weight)` pairs:
/// each step every current weight grows by its weight, the largest is picked
/// (the first of equals) and loses the total. Weights are divided by their
/// common divisor first, so the cycle is as short as it can be.
///
/// Written out as nginx does it, a cycle costs servers × total steps: with a
/// slow start (which counts weights in twentieths) at 1,000 servers, 20
/// million for every step of the ramp. Servers of one weight, though, take
/// their turns in rotation (their current weights grow alike, and the one
/// picked falls behind the others), so each step compares only the first in
/// line of each distinct weight: distinct weights × total steps, the same
/// cycle.
fn smooth_cycle(weights: &[(u32, u32)]) -> Vec<u32> {
    let divisor = weights
        .iter()
        .map(|&(_, weight)| weight)
        .filter(|&weight| weight > 0)
        .fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let mut weights: Vec<(u32, u64)> = weights
        .iter()
        .filter(|&&(_, weight)| weight > 0)
        .map(|&(id, weight)| (id, u64::from(weight / divisor)))
        .collect();
    let mut total: u64 = weights.iter().map(|&(_, weight)| weight).sum();
    if total == weights.len() as u64 {
        // Equal weights give file order.
        return weights.iter().map(|&(id, _)| id).collect();
    }
    if total > MAX_CYCLE {
        // Shares then hold to within one turn per server and cycle.
        for (_, weight) in &mut weights {
            *weight = (*weight * MAX_CYCLE / total).max(1);
        }
        total = weights.iter().map(|&(_, weight)| weight).sum();
    }
    let mut lines: Vec<Line> = Vec::new();
    for (slot, &(_, weight)) in weights.iter().enumerate() {
        match lines.iter_mut().find(|line| line.weight == weight) {
            Some(line) => line.slots.push(slot),
            None => lines.push(Line {
                weight,
                slots: vec![slot],
                turns: 0,
            }),
        }
    }
    let mut order = Vec::with_capacity(total as usize);
    for step in 1..=total {
        // The largest current weight, the first server of equals.
        let mut best: Option<(i64, usize, usize)> = None;
        for (number, line) in lines.iter().enumerate() {
            let (current, slot) = line.first(step, total);
            if best
                .is_none_or(|(most, first, _)| current > most || (current == most && slot < first))
            {
                best = Some((current, slot, number));
            }
        }
        let Some((_, slot, number)) = best else {
            break;
        };
        lines[number].turns += 1;
        order.push(weights[slot].0);
    }
    order
}

/// The servers of one weight, in the order they take their turns.
#[derive(Debug)]
struct Line {
    weight: u64,
    /// Positions in the weights, ascending.
    slots: Vec<usize>,
    /// Turns the servers of this weight have had.
    turns: u64,
}

impl Line {
    /// The first in line at `step`, and its current weight: `step * weight -
    /// total * (its turns so far)`.
    #[inline]
    fn first(&self, step: u64, total: u64) -> (i64, usize) {
        let count = self.slots.len() as u64;
        let slot = self.slots[(self.turns % count) as usize];
        // Both products well inside i64: step, weight and total are at
        // most MAX_CYCLE plus the number of servers.
        let current = (step * self.weight) as i64 - (total * (self.turns / count)) as i64;
        (current, slot)
    }
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

    /// nginx's smooth weighted round robin, step by step over every server.
    fn reference_cycle(weights: &[(u32, u32)]) -> Vec<u32> {
        let divisor = weights.iter().map(|w| w.1).filter(|&w| w > 0).fold(0, gcd);
        if divisor == 0 {
            return Vec::new();
        }
        let weights: Vec<(u32, i64)> = weights
            .iter()
            .filter(|w| w.1 > 0)
            .map(|&(id, w)| (id, i64::from(w / divisor)))
            .collect();
        let total: i64 = weights.iter().map(|w| w.1).sum();
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::new();
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

    /// A slow start's step at 10,000 servers: two weights, a cycle of
    /// 200,000 picks, each a server's turn in nginx's order.
    #[test]
    fn a_ramp_in_a_large_pool_keeps_the_cycle_exact() {
        let mut weights: Vec<(u32, u32)> = (0..10_000).map(|id| (id, 20)).collect();
        weights[7].1 = 3;
        let cycle = smooth_cycle(&weights);
        assert_eq!(cycle.len(), 9_999 * 20 + 3);
        let mut counts = vec![0u32; 10_000];
        for &id in &cycle {
            counts[id as usize] += 1;
        }
        assert!(
            counts
                .iter()
                .enumerate()
                .all(|(id, &count)| count == weights[id].1)
        );
        let small: Vec<(u32, u32)> = weights[..40].to_vec();
        assert_eq!(smooth_cycle(&small), reference_cycle(&small));
    }

    /// Weights adding up to more than the longest cycle are scaled down to
    /// fit; every server keeps a turn.
    #[test]
    fn huge_weights_are_scaled_to_the_longest_cycle() {
        let weights: Vec<(u32, u32)> = (0..5_000).map(|id| (id, 250 + id % 2)).collect();
        let cycle = smooth_cycle(&weights);
        assert!(cycle.len() as u64 <= MAX_CYCLE + 5_000, "{}", cycle.len());
        let mut counts = vec![0u32; 5_000];
        for &id in &cycle {
            counts[id as usize] += 1;
        }
        assert!(counts.iter().all(|&count| count > 0));
    }

    #[test]
    fn equal_weights_rotate_in_file_order() {
        assert_eq!(smooth_cycle(&[(0, 1), (1, 1), (2, 1)]), vec![0, 1, 2]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// The cycle built a weight at a time is nginx's, pick for pick.
        #[test]
        fn the_cycle_is_nginx_s(weights in proptest::collection::vec(0u32..=40, 1..30), ids in 0u32..3) {
            let weights: Vec<(u32, u32)> = weights
                .iter()
                .enumerate()
                .map(|(slot, &weight)| (slot as u32 * (ids + 1), weight))
                .collect();
            proptest::prop_assert_eq!(smooth_cycle(&weights), reference_cycle(&weights));
        }

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
