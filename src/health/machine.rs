//! The inter/fall/rise state machine, with HAProxy's semantics and no I/O.
//!
//! A server starts down and unchecked; its first successful check brings it up
//! at once (so flowgate never starts with an empty pool), a first failure leaves
//! it down until `rise` consecutive successes. From then on `fall` consecutive
//! failures take it down and `rise` consecutive successes bring it back. Which
//! interval applies next follows HAProxy: `interval` while steady,
//! `fast_interval` while a transition is under way, `down_interval` while down.

use std::time::Duration;

use crate::config::HealthCheck;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The server went up; `checks` successful checks in a row did it.
    Up { checks: u32 },
    /// The server went down; `checks` failed checks in a row did it.
    Down { checks: u32 },
}

#[derive(Debug, Clone)]
pub struct HealthMachine {
    rise: u32,
    fall: u32,
    up: bool,
    /// No check has completed yet.
    unchecked: bool,
    /// Consecutive successes while down, or failures while up.
    streak: u32,
}

impl HealthMachine {
    /// A machine for a server not checked yet (down).
    pub fn new(rise: u32, fall: u32) -> HealthMachine {
        HealthMachine {
            rise: rise.max(1),
            fall: fall.max(1),
            up: false,
            unchecked: true,
            streak: 0,
        }
    }

    /// A machine that continues from a known state (a server kept by a reload).
    pub fn resume(rise: u32, fall: u32, up: bool) -> HealthMachine {
        HealthMachine {
            unchecked: false,
            up,
            ..HealthMachine::new(rise, fall)
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn record_success(&mut self) -> Option<Transition> {
        if self.up {
            self.streak = 0;
            return None;
        }
        if self.unchecked {
            self.unchecked = false;
            self.up = true;
            self.streak = 0;
            return Some(Transition::Up { checks: 1 });
        }
        self.streak += 1;
        if self.streak >= self.rise {
            let checks = self.streak;
            self.up = true;
            self.streak = 0;
            return Some(Transition::Up { checks });
        }
        None
    }

    pub fn record_failure(&mut self) -> Option<Transition> {
        self.unchecked = false;
        if !self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak >= self.fall {
            let checks = self.streak;
            self.up = false;
            self.streak = 0;
            return Some(Transition::Down { checks });
        }
        None
    }

    /// How long to wait before the next check.
    pub fn next_interval(&self, check: &HealthCheck) -> Duration {
        if self.streak > 0 {
            check.fast_interval
        } else if self.up {
            check.interval
        } else {
            check.down_interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> HealthCheck {
        HealthCheck {
            interval: Duration::from_secs(2),
            fast_interval: Duration::from_millis(500),
            down_interval: Duration::from_secs(5),
            ..HealthCheck::default()
        }
    }

    #[test]
    fn first_success_brings_a_new_server_up_at_once() {
        let mut machine = HealthMachine::new(2, 3);
        assert!(!machine.is_up());
        assert_eq!(machine.record_success(), Some(Transition::Up { checks: 1 }));
        assert!(machine.is_up());
    }

    #[test]
    fn first_failure_needs_rise_successes() {
        let mut machine = HealthMachine::new(2, 3);
        assert_eq!(machine.record_failure(), None);
        assert_eq!(machine.record_success(), None);
        assert_eq!(machine.record_success(), Some(Transition::Up { checks: 2 }));
    }

    #[test]
    fn fall_consecutive_failures_take_it_down_and_a_success_resets() {
        let mut machine = HealthMachine::resume(2, 3, true);
        assert_eq!(machine.record_failure(), None);
        assert_eq!(machine.record_failure(), None);
        assert_eq!(machine.record_success(), None);
        assert_eq!(machine.record_failure(), None);
        assert_eq!(machine.record_failure(), None);
        assert_eq!(
            machine.record_failure(),
            Some(Transition::Down { checks: 3 })
        );
        assert!(!machine.is_up());
        assert_eq!(machine.record_success(), None);
        assert_eq!(machine.record_failure(), None);
        assert_eq!(machine.record_success(), None);
        assert_eq!(machine.record_success(), Some(Transition::Up { checks: 2 }));
    }

    #[test]
    fn intervals_follow_inter_fastinter_downinter() {
        let check = check();
        let mut machine = HealthMachine::resume(2, 3, true);
        assert_eq!(machine.next_interval(&check), check.interval);
        machine.record_failure();
        assert_eq!(machine.next_interval(&check), check.fast_interval);
        machine.record_failure();
        machine.record_failure();
        assert_eq!(machine.next_interval(&check), check.down_interval);
        machine.record_success();
        assert_eq!(machine.next_interval(&check), check.fast_interval);
    }

    /// Exhaustive over short check sequences: transitions happen exactly when a
    /// streak reaches rise or fall, never otherwise.
    #[test]
    fn transitions_only_at_exact_streaks() {
        for rise in 1..=3u32 {
            for fall in 1..=3u32 {
                for bits in 0u32..(1 << 10) {
                    let mut machine = HealthMachine::resume(rise, fall, true);
                    let (mut up, mut streak) = (true, 0u32);
                    for step in 0..10 {
                        let success = bits & (1 << step) != 0;
                        let result = if success {
                            machine.record_success()
                        } else {
                            machine.record_failure()
                        };
                        if success == up {
                            streak = 0;
                            assert_eq!(result, None);
                        } else {
                            streak += 1;
                            let limit = if up { fall } else { rise };
                            if streak == limit {
                                up = !up;
                                streak = 0;
                                assert!(result.is_some());
                            } else {
                                assert_eq!(result, None);
                            }
                        }
                        assert_eq!(machine.is_up(), up);
                    }
                }
            }
        }
    }
}
