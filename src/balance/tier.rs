//! The active tier as a table: the servers that take traffic now, with what a
//! pick reads of them in one place, and an alias table to draw them by weight in
//! constant time.

use std::sync::Arc;

use super::active_tier;
use crate::upstream::{FULL_WEIGHT, Server, ServerState};

/// Steps of a slow-start ramp that balancers tell apart.
pub(crate) const RAMP_STEPS: u32 = 20;

/// The weight balancers work with: the server's weight (config or admin API)
/// times the twentieths of it that slow start lets through, so a server of
/// weight 1 ramps as smoothly as one of weight 100 (its integer weight can only
/// be 1). Without a ramp every server's is 20 times its weight, which changes
/// no share.
#[inline]
pub(crate) fn balance_weight(server: &Server) -> u32 {
    let steps = server
        .state
        .weight_factor()
        .saturating_mul(RAMP_STEPS)
        .div_ceil(FULL_WEIGHT)
        .clamp(1, RAMP_STEPS);
    server.base_weight().saturating_mul(steps)
}

/// One server of the active tier.
#[derive(Debug)]
pub(crate) struct Member {
    /// Index into the backend's servers.
    pub index: usize,
    pub weight: u32,
    /// 0 means no limit.
    pub max_connections: u32,
    /// The live state, one pointer away rather than two.
    pub state: Arc<ServerState>,
}

impl Member {
    /// Under its `max_connections` (the load is read once by the caller).
    #[inline]
    pub fn has_room(&self, in_flight: u32) -> bool {
        self.max_connections == 0 || in_flight < self.max_connections
    }
}

/// The active tier in file order.
#[derive(Debug, Default)]
pub(crate) struct Tier {
    pub members: Box<[Member]>,
    /// All weights equal and no `max_connections`: loads compare as counts.
    pub uniform: bool,
}

impl Tier {
    pub fn build(servers: &[Arc<Server>]) -> Tier {
        let members = active_tier(servers)
            .into_iter()
            .map(|index| {
                let server = &servers[index];
                Member {
                    index,
                    weight: balance_weight(server),
                    max_connections: server.max_connections,
                    state: Arc::clone(&server.state),
                }
            })
            .collect::<Box<[Member]>>();
        let uniform = members
            .iter()
            .all(|member| member.max_connections == 0 && member.weight == members[0].weight);
        Tier { members, uniform }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The first member, from `start` on and wrapping around, that can take work
    /// now, checking everything: the slow path when a table is stale or servers
    /// are full.
    pub fn first_available(&self, servers: &[Arc<Server>], start: usize) -> Option<usize> {
        let (tail, head) = self.members.split_at(start.min(self.members.len()));
        head.iter()
            .chain(tail)
            .map(|member| member.index)
            .find(|&index| available(&servers[index]))
    }
}

/// The server can take one more request or session now.
#[inline]
pub(crate) fn available(server: &Server) -> bool {
    server.is_usable() && server.has_capacity()
}

/// A source of uniform random numbers: the thread's own generator in service,
/// a seeded one in tests and simulations.
pub(crate) trait RandomSource {
    /// Uniform in `0..bound`; `bound` is above zero.
    fn below(&mut self, bound: u64) -> u64;
}

/// The calling thread's generator (fastrand's thread-local wyrand): no state
/// shared between threads, so picking in parallel contends on nothing.
pub(crate) struct ThreadRandom;

impl RandomSource for ThreadRandom {
    #[inline]
    fn below(&mut self, bound: u64) -> u64 {
        fastrand::u64(..bound)
    }
}

impl RandomSource for fastrand::Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.u64(..bound)
    }
}

/// A tier with Vose's alias table over its weights: a weighted draw is one
/// uniform slot and one uniform threshold, whatever the number of servers.
#[derive(Debug, Default)]
pub(crate) struct WeightedTier {
    pub tier: Tier,
    total_weight: u64,
    /// Per slot: keep the slot's own member when the threshold draw is below
    /// this, else take `alias`.
    keep_below: Box<[u64]>,
    alias: Box<[u32]>,
}

impl WeightedTier {
    pub fn build(servers: &[Arc<Server>]) -> WeightedTier {
        let tier = Tier::build(servers);
        let weights: Vec<u32> = tier.members.iter().map(|member| member.weight).collect();
        let (total_weight, keep_below, alias) = alias_table(&weights);
        WeightedTier {
            tier,
            total_weight,
            keep_below,
            alias,
        }
    }

    /// A member position drawn with probability weight / total weight.
    #[inline]
    pub fn draw(&self, random: &mut impl RandomSource) -> usize {
        let slot = random.below(self.keep_below.len() as u64) as usize;
        if random.below(self.total_weight) < self.keep_below[slot] {
            slot
        } else {
            self.alias[slot] as usize
        }
    }
}

/// Vose's alias method in integers: every slot holds `total` units of
/// probability mass, `weight * n` units per member spread over the slots.
fn alias_table(weights: &[u32]) -> (u64, Box<[u64]>, Box<[u32]>) {
    let n = weights.len() as u64;
    let total: u64 = weights.iter().map(|&weight| u64::from(weight)).sum();
    let mut mass: Vec<u64> = weights
        .iter()
        .map(|&weight| u64::from(weight) * n)
        .collect();
    let mut keep_below = vec![total; weights.len()];
    let mut alias: Vec<u32> = (0..weights.len() as u32).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) =
        (0..weights.len()).partition(|&slot| mass[slot] < total);
    while let (Some(&light), Some(&heavy)) = (small.last(), large.last()) {
        small.pop();
        keep_below[light] = mass[light];
        alias[light] = heavy as u32;
        mass[heavy] -= total - mass[light];
        if mass[heavy] < total {
            large.pop();
            small.push(heavy);
        }
    }
    (total, keep_below.into(), alias.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact probability (in units of total * n) the table gives each member.
    fn exact_shares(weights: &[u32]) -> Vec<u64> {
        let (total, keep_below, alias) = alias_table(weights);
        let mut shares = vec![0u64; weights.len()];
        for slot in 0..weights.len() {
            shares[slot] += keep_below[slot];
            shares[alias[slot] as usize] += total - keep_below[slot];
        }
        shares
    }

    #[test]
    fn slow_start_ramps_weight_one_servers_too() {
        use crate::balance::testing::{self, Spec};
        let backend = testing::backend("round_robin", &[Spec::weight(1), Spec::weight(3)]);
        let (one, three) = (&backend.servers[0], &backend.servers[1]);
        assert_eq!((balance_weight(one), balance_weight(three)), (20, 60));
        for (factor, steps) in [(1, 1), (50, 1), (51, 2), (100, 2), (500, 10), (999, 20)] {
            one.state.set_weight_factor(factor);
            three.state.set_weight_factor(factor);
            assert_eq!(balance_weight(one), steps, "factor {factor}");
            assert_eq!(balance_weight(three), 3 * steps, "factor {factor}");
        }
        one.state.set_weight_override(Some(0));
        assert_eq!(balance_weight(one), 0);
    }

    #[test]
    fn alias_table_gives_each_member_exactly_its_weight() {
        for weights in [
            vec![1, 1, 1],
            vec![5, 1, 1],
            vec![256, 1, 3, 0, 7],
            vec![2],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ] {
            let n = weights.len() as u64;
            let shares = exact_shares(&weights);
            for (share, &weight) in shares.iter().zip(&weights) {
                assert_eq!(*share, u64::from(weight) * n, "weights {weights:?}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn alias_table_is_exact_for_any_weights(
            weights in proptest::collection::vec(0u32..=256, 1..40)
        ) {
            proptest::prop_assume!(weights.iter().any(|&w| w > 0));
            let n = weights.len() as u64;
            let shares = exact_shares(&weights);
            for (share, &weight) in shares.iter().zip(&weights) {
                proptest::prop_assert_eq!(*share, u64::from(weight) * n);
            }
        }
    }
}
