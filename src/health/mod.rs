//! Active health checks: one task per checked server, feeding the pure
//! [`HealthMachine`] with [`probe`] results and writing the outcome into the
//! server's live state (atomics); the request path only reads it.
//!
//! Checkers are keyed by (backend, server name) like the live state they write,
//! so a reload keeps a server's checker (and its streaks) unless the server's
//! address or check settings changed.

mod machine;
mod probe;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use machine::{HealthMachine, Transition};
pub use probe::{ProbeResult, ProbeTarget, probe};

use crate::config::CheckKind;
use crate::runtime::Runtime;
use crate::upstream::{FULL_WEIGHT, Health, ServerState};

/// How often slow start raises a returning server's weight.
const SLOW_START_STEPS: u32 = 20;

/// The checkers of every checked server in the running snapshot.
#[derive(Debug, Default)]
pub struct HealthChecks {
    checkers: HashMap<(Arc<str>, Arc<str>), Checker>,
}

#[derive(Debug)]
struct Checker {
    target: ProbeTarget,
    stop: CancellationToken,
}

impl HealthChecks {
    pub fn new() -> HealthChecks {
        HealthChecks::default()
    }

    /// Starts a checker for every checked server of `runtime` that has none (or
    /// whose address or check settings changed), and stops those of servers that
    /// left. Returns one receiver per started checker that completes when its
    /// first check has run.
    pub fn sync(&mut self, runtime: &Runtime) -> Vec<oneshot::Receiver<()>> {
        let mut first_checks = Vec::new();
        let mut wanted = HashMap::new();
        for backend in runtime.backends() {
            for server in &backend.servers {
                let key = (Arc::clone(&backend.name), Arc::clone(&server.name));
                if backend.config.health.check == CheckKind::None {
                    // Checks switched off: the server counts as up.
                    server.state.clear_check();
                    server.state.set_health(Health::Up);
                    continue;
                }
                let check = &backend.config.health;
                let mut addr = server.addr;
                if let Some(port) = check.port {
                    addr.set_port(port);
                }
                let target = ProbeTarget {
                    addr,
                    protocol: check.protocol_for(backend.config.protocol),
                    check: check.clone(),
                    tls: crate::upstream::check_tls(&backend.config, server),
                };
                wanted.insert(key, (target, Arc::clone(&server.state), server.slow_start));
            }
        }
        self.checkers.retain(|key, checker| {
            let keep = wanted
                .get(key)
                .is_some_and(|(target, _, _)| *target == checker.target);
            if !keep {
                checker.stop.cancel();
            }
            keep
        });
        for (key, (target, state, slow_start)) in wanted {
            if self.checkers.contains_key(&key) {
                continue;
            }
            let stop = CancellationToken::new();
            let (first_done, first_check) = oneshot::channel();
            first_checks.push(first_check);
            let task = CheckTask {
                name: format!("{}/{}", key.0, key.1),
                state,
                target: target.clone(),
                slow_start,
                stop: stop.clone(),
            };
            tokio::spawn(task.run(first_done));
            self.checkers.insert(key, Checker { target, stop });
        }
        first_checks
    }

    pub fn stop_all(&mut self) {
        for (_, checker) in self.checkers.drain() {
            checker.stop.cancel();
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Waits until every first check has run (each is bounded by its timeout).
pub async fn first_checks_done(first_checks: Vec<oneshot::Receiver<()>>) {
    for first in first_checks {
        // A checker stopped before its first check also counts as done.
        let _ = first.await;
    }
}

struct CheckTask {
    /// "backend/server", as transitions are logged.
    name: String,
    state: Arc<ServerState>,
    target: ProbeTarget,
    slow_start: Duration,
    stop: CancellationToken,
}

impl CheckTask {
    async fn run(self, first_done: oneshot::Sender<()>) {
        let check = &self.target.check;
        let mut machine = if self.state.check_status().status == "pending" {
            HealthMachine::new(check.rise, check.fall)
        } else {
            HealthMachine::resume(check.rise, check.fall, self.state.health() == Health::Up)
        };
        let mut first_done = Some(first_done);
        let mut ramp: Option<CancellationToken> = None;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = self.stop.cancelled() => break,
            }
            if self.state.admin_state() == crate::upstream::AdminState::Maint {
                // Maintenance stops checks; state is kept for when it ends.
                if let Some(done) = first_done.take() {
                    let _ = done.send(());
                }
                // Leaving maintenance checks at once: a server that was worked
                // on must prove itself before its old state counts again.
                while self.state.admin_state() == crate::upstream::AdminState::Maint {
                    let changed = self.state.changed().notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    if self.state.admin_state() != crate::upstream::AdminState::Maint {
                        break;
                    }
                    tokio::select! {
                        () = changed => {}
                        () = self.stop.cancelled() => return,
                    }
                }
                next = Instant::now();
                continue;
            }
            let started = Instant::now();
            let result = tokio::select! {
                result = probe(&self.target) => result,
                () = self.stop.cancelled() => break,
            };
            self.state.check_seconds().observe(started.elapsed());
            let first = first_done.is_some();
            let (ok, detail) = match result {
                Ok(detail) => (true, detail),
                Err(detail) => (false, detail),
            };
            let transition = if ok {
                machine.record_success()
            } else {
                machine.record_failure()
            };
            self.state
                .record_check(ok, detail.clone(), transition.is_some());
            match transition {
                Some(Transition::Up { checks }) => {
                    let plural = if checks == 1 { "" } else { "s" };
                    tracing::info!(
                        "{} UP after {checks} successful check{plural}: {detail}",
                        self.name
                    );
                    // A server that starts up takes full traffic at once; slow
                    // start is for servers coming back.
                    if !first && !self.slow_start.is_zero() {
                        ramp = Some(self.start_ramp());
                    }
                    self.state.set_health(Health::Up);
                }
                Some(Transition::Down { checks }) => {
                    let plural = if checks == 1 { "" } else { "s" };
                    tracing::warn!(
                        "{} DOWN after {checks} failed check{plural}: {detail}",
                        self.name
                    );
                    if let Some(ramp) = ramp.take() {
                        ramp.cancel();
                    }
                    self.state.set_weight_factor(FULL_WEIGHT);
                    self.state.set_health(Health::Down);
                }
                None if first && !ok => {
                    tracing::warn!("{} is DOWN: first check failed: {detail}", self.name);
                }
                None => {}
            }
            let interval = machine.next_interval(check);
            next = Instant::now()
                + if let Some(done) = first_done.take() {
                    let _ = done.send(());
                    // Spread the checks of many servers over the interval.
                    interval.mul_f64(random_fraction())
                } else {
                    // Up to 10% jitter keeps them spread.
                    interval.mul_f64(0.95 + random_fraction() / 10.0)
                };
        }
        if let Some(ramp) = ramp {
            ramp.cancel();
        }
    }

    /// Ramps the weight from ~0 to full over `slow_start`.
    fn start_ramp(&self) -> CancellationToken {
        let stop = self.stop.child_token();
        let (state, duration, token) = (Arc::clone(&self.state), self.slow_start, stop.clone());
        state.set_weight_factor(1);
        tokio::spawn(async move {
            let start = Instant::now();
            let step = (duration / SLOW_START_STEPS).max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    () = tokio::time::sleep(step) => {}
                    () = token.cancelled() => return,
                }
                let done = start.elapsed().as_secs_f64() / duration.as_secs_f64();
                if done >= 1.0 {
                    state.set_weight_factor(FULL_WEIGHT);
                    return;
                }
                state.set_weight_factor(((done * f64::from(FULL_WEIGHT)) as u32).max(1));
            }
        });
        stop
    }
}

/// A number in [0, 1) from the OS-seeded hasher keys; good enough for jitter.
fn random_fraction() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
