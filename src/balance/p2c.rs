//! Power of two choices (Envoy's least-request, Linkerd's P2C, HAProxy's
//! `random(2)`): draw two servers by weight and send the work to the less
//! loaded. Two draws, not a scan, so a pick costs the same at 3 servers and at
//! 10,000, and the herd effect of everybody picking the one least loaded server
//! cannot happen.
//!
//! Load is Linkerd's: `(in_flight + 1) * response_time`, for the server's weight,
//! where response time is the server's peak-EWMA (see
//! `upstream::ResponseTime`). A server that slows down is avoided from its
//! first slow answer, before work piles up on it; once avoided, its estimate
//! decays and it is tried again.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::PickContext;
use super::derived::Derived;
use super::tier::{Member, RandomSource, ThreadRandom, WeightedTier, available};
use crate::upstream::{Server, response_time};

/// Added to every estimate so that, once estimates have decayed to nothing,
/// in-flight counts still decide (microseconds).
const ESTIMATE_FLOOR_US: f64 = 1.0;

#[derive(Debug)]
pub struct P2c {
    table: Derived<WeightedTier>,
}

/// The outcome of one pick: the server chosen and the one it was weighed
/// against (none when there was nothing to compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    pub picked: usize,
    pub other: Option<usize>,
}

impl P2c {
    pub fn new(servers: &[Arc<Server>], epoch: Arc<AtomicU64>) -> P2c {
        P2c {
            table: Derived::new(epoch, || WeightedTier::build(servers)),
        }
    }

    pub fn pick(&self, servers: &[Arc<Server>], _ctx: &PickContext<'_>) -> Option<usize> {
        self.choose(servers, &mut ThreadRandom, response_time::recent_ms())
            .map(|choice| choice.picked)
    }

    pub(crate) fn choose(
        &self,
        servers: &[Arc<Server>],
        random: &mut impl RandomSource,
        now_ms: u32,
    ) -> Option<Choice> {
        let table = self.table.load(|| WeightedTier::build(servers));
        let members = &table.tier.members;
        match members.len() {
            0 => return None,
            1 => {
                let index = members[0].index;
                return available(&servers[index]).then_some(Choice {
                    picked: index,
                    other: None,
                });
            }
            _ => {}
        }
        let first = table.draw(random);
        let mut second = table.draw(random);
        if second == first {
            second = table.draw(random);
        }
        if second == first {
            // A heavy server drew twice: take any other one as the second.
            let n = members.len();
            second = (first + 1 + random.below(n as u64 - 1) as usize) % n;
        }
        let (a, b) = (&members[first], &members[second]);
        match (available(&servers[a.index]), available(&servers[b.index])) {
            (true, true) => {
                let (picked, other) = if load(b, now_ms) < load(a, now_ms) {
                    (b, a)
                } else {
                    (a, b)
                };
                Some(Choice {
                    picked: picked.index,
                    other: Some(other.index),
                })
            }
            (true, false) => Some(Choice {
                picked: a.index,
                other: None,
            }),
            (false, true) => Some(Choice {
                picked: b.index,
                other: None,
            }),
            (false, false) => {
                let start = random.below(members.len() as u64) as usize;
                table
                    .tier
                    .first_available(servers, start)
                    .map(|picked| Choice {
                        picked,
                        other: None,
                    })
            }
        }
    }
}

/// `(in_flight + 1) * estimated response time / weight`.
#[inline]
pub(crate) fn load(member: &Member, now_ms: u32) -> f64 {
    let pending = f64::from(member.state.in_flight()) + 1.0;
    let estimate = member.state.response_time().estimate_at(now_ms) + ESTIMATE_FLOOR_US;
    pending * estimate / f64::from(member.weight.max(1))
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::*;
    use crate::balance::testing::{self, Spec};
    use crate::balance::tier::Tier;
    use crate::upstream::InFlightGuard;

    fn member_load(servers: &[Arc<Server>], index: usize, now_ms: u32) -> f64 {
        let tier = Tier::build(servers);
        let member = tier.members.iter().find(|m| m.index == index).unwrap();
        load(member, now_ms)
    }

    #[test]
    fn prefers_the_faster_of_two_idle_servers() {
        let backend = testing::backend("p2c", &testing::plain(2));
        let balancer = P2c::new(&backend.servers, Arc::clone(&backend.epoch));
        backend.servers[0]
            .state
            .response_time()
            .record_at(50_000.0, 0);
        backend.servers[1]
            .state
            .response_time()
            .record_at(5_000.0, 0);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..100 {
            let choice = balancer.choose(&backend.servers, &mut rng, 0).unwrap();
            assert_eq!(choice.picked, 1);
        }
    }

    #[test]
    fn in_flight_work_outweighs_a_small_speed_edge() {
        let backend = testing::backend("p2c", &testing::plain(2));
        let balancer = P2c::new(&backend.servers, Arc::clone(&backend.epoch));
        backend.servers[0]
            .state
            .response_time()
            .record_at(10_000.0, 0);
        backend.servers[1]
            .state
            .response_time()
            .record_at(12_000.0, 0);
        let _held: Vec<InFlightGuard> = (0..3).map(|_| backend.servers[0].begin()).collect();
        let mut rng = fastrand::Rng::with_seed(3);
        // 4 * 10 ms against 1 * 12 ms.
        assert_eq!(
            balancer
                .choose(&backend.servers, &mut rng, 0)
                .unwrap()
                .picked,
            1
        );
    }

    #[test]
    fn samples_two_distinct_servers_even_when_one_is_heavy() {
        let specs = [Spec::weight(256), Spec::weight(1)];
        let backend = testing::backend("p2c", &specs);
        let balancer = P2c::new(&backend.servers, Arc::clone(&backend.epoch));
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..200 {
            let choice = balancer.choose(&backend.servers, &mut rng, 0).unwrap();
            let pair = [choice.picked, choice.other.unwrap()];
            assert!(pair.contains(&0) && pair.contains(&1));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The pick is never strictly more loaded than the other server drawn.
        #[test]
        fn never_picks_the_more_loaded_of_the_pair(
            servers in proptest::collection::vec(
                (1u32..=8, 0u32..10, proptest::option::of(100u32..200_000)),
                2..10,
            ),
            seed: u64,
            now_ms in 0u32..60_000,
        ) {
            let specs: Vec<Spec> = servers.iter().map(|&(weight, _, _)| Spec::weight(weight)).collect();
            let backend = testing::backend("p2c", &specs);
            let balancer = P2c::new(&backend.servers, Arc::clone(&backend.epoch));
            let mut held = Vec::new();
            for (server, &(_, load, estimate)) in backend.servers.iter().zip(&servers) {
                for _ in 0..load {
                    held.push(server.begin());
                }
                if let Some(us) = estimate {
                    server.state.response_time().record_at(f64::from(us), 0);
                }
            }
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..20 {
                let choice = balancer.choose(&backend.servers, &mut rng, now_ms).unwrap();
                let other = choice.other.unwrap();
                proptest::prop_assert_ne!(choice.picked, other);
                proptest::prop_assert!(
                    member_load(&backend.servers, choice.picked, now_ms)
                        <= member_load(&backend.servers, other, now_ms)
                );
                held.push(backend.servers[choice.picked].begin());
            }
        }
    }

    /// Shares of `requests` picks in a simulated run: Poisson arrivals at
    /// `per_ms`, each server answering in its fixed time, responses recorded
    /// and in-flight work released when they arrive, on a virtual clock.
    fn simulate(
        pick: &mut dyn FnMut(&[Arc<Server>], u32) -> usize,
        servers: &[Arc<Server>],
        service_ms: &[u32],
        per_ms: f64,
        requests: usize,
    ) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(42);
        let mut counts = vec![0; servers.len()];
        // (finish time, sequence) -> guard, earliest first.
        let mut pending: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut guards: Vec<Option<InFlightGuard>> = Vec::with_capacity(requests);
        let mut now_us = 0.0f64;
        for sequence in 0..requests {
            now_us += -(1.0 - rng.f64()).ln() / per_ms * 1000.0;
            let now = now_us as u64;
            while let Some(Reverse((finish, done))) = pending.peek().copied() {
                if finish > now {
                    break;
                }
                pending.pop();
                let guard = guards[done].take().unwrap();
                let index = servers
                    .iter()
                    .position(|s| Arc::ptr_eq(s, guard.server()))
                    .unwrap();
                guard.server().state.response_time().record_at(
                    f64::from(service_ms[index]) * 1000.0,
                    (finish / 1000) as u32,
                );
            }
            let index = pick(servers, (now / 1000) as u32);
            counts[index] += 1;
            guards.push(Some(servers[index].begin()));
            pending.push(Reverse((
                now + u64::from(service_ms[index]) * 1000,
                sequence,
            )));
        }
        counts
    }

    /// One server of ten answers in 100 ms instead of 10 ms: p2c sends it a small
    /// fraction of its fair tenth, where weighted random sends it the tenth.
    #[test]
    fn a_ten_times_slower_server_gets_much_less_traffic() {
        let mut service_ms = vec![10; 10];
        service_ms[0] = 100;
        let requests = 120_000;
        let per_ms = 2.0;

        let backend = testing::backend("p2c", &testing::plain(10));
        let balancer = P2c::new(&backend.servers, Arc::clone(&backend.epoch));
        let mut rng = fastrand::Rng::with_seed(5);
        let p2c = simulate(
            &mut |servers, now| balancer.choose(servers, &mut rng, now).unwrap().picked,
            &backend.servers,
            &service_ms,
            per_ms,
            requests,
        );

        let backend = testing::backend("random", &testing::plain(10));
        let random = super::super::Random::new(&backend.servers, Arc::clone(&backend.epoch));
        let mut rng = fastrand::Rng::with_seed(5);
        let uniform = simulate(
            &mut |servers, _| random.pick_with(servers, &mut rng).unwrap(),
            &backend.servers,
            &service_ms,
            per_ms,
            requests,
        );

        let backend = testing::backend("least_conn", &testing::plain(10));
        let least = super::super::LeastConn::new(&backend.servers, Arc::clone(&backend.epoch));
        let ctx = PickContext {
            client: [127, 0, 0, 1].into(),
            key: None,
        };
        let least_conn = simulate(
            &mut |servers, _| least.pick(servers, &ctx).unwrap(),
            &backend.servers,
            &service_ms,
            per_ms,
            requests,
        );

        let share = |counts: &[usize]| counts[0] as f64 / requests as f64;
        println!(
            "p2c simulation: the 10x slower server took {:.2}% of {requests} requests \
             (least_conn: {:.2}%, random: {:.2}%, fair share 10%); p2c counts {p2c:?}",
            share(&p2c) * 100.0,
            share(&least_conn) * 100.0,
            share(&uniform) * 100.0,
        );
        assert!(share(&uniform) > 0.09);
        assert!(share(&p2c) < 0.02, "slow server share {}", share(&p2c));
    }
}
