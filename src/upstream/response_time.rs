//! A server's response time as a peak-EWMA (Finagle's and Linkerd's estimator):
//! a slower sample than the estimate is taken at once, a faster one only pulls
//! the estimate down as time passes, and with no samples at all the estimate
//! decays towards zero. So a server that turns slow is avoided at its first slow
//! answer, and one that was avoided is tried again after a while.
//!
//! The estimate and the time of its last update are packed into one `AtomicU64`
//! (an `f32` of microseconds and a `u32` of milliseconds on a process clock), so
//! writers update both with one compare-and-swap and readers never lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

/// How fast old samples fade: after `DECAY_MS` without news, an estimate keeps
/// 1/e of its weight (Linkerd's default decay).
pub const DECAY_MS: f64 = 10_000.0;

/// What a server that never answered counts as. Any first sample replaces it.
pub const UNMEASURED_US: f64 = 30_000.0;

/// Packed "no sample yet": a negative estimate never comes from a sample.
const UNMEASURED: u64 = (((-1.0f32).to_bits()) as u64) << 32;

/// The latest [`clock_ms`] any thread read, in full (it never wraps).
static RECENT_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds on a clock shared by the whole process, as stamps hold them
/// (wrapping after 49 days; see [`elapsed_ms`]).
pub fn clock_ms() -> u32 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let now = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
    // At most one write per millisecond and thread: no contention to speak of.
    if RECENT_MS.load(Ordering::Relaxed) < now {
        RECENT_MS.fetch_max(now, Ordering::Relaxed);
    }
    now as u32
}

/// The clock as of the latest response recorded anywhere in the process: one
/// relaxed load, where reading the clock costs tens of nanoseconds. A pick
/// decays estimates to this time; after a quiet spell the first pick sees
/// estimates a little fresher than they are, and the next one is exact again.
#[inline]
pub fn recent_ms() -> u32 {
    RECENT_MS.load(Ordering::Relaxed) as u32
}

/// Milliseconds from `stamp` to `now`; zero when `now` is behind (another
/// thread's clock read was newer), or the stamp is more than 24 days old.
#[inline]
pub fn elapsed_ms(now: u32, stamp: u32) -> u32 {
    match now.wrapping_sub(stamp) {
        behind if behind > u32::MAX / 2 => 0,
        elapsed => elapsed,
    }
}

#[derive(Debug)]
pub struct ResponseTime {
    packed: AtomicU64,
}

impl Default for ResponseTime {
    fn default() -> Self {
        ResponseTime::new()
    }
}

impl ResponseTime {
    pub fn new() -> ResponseTime {
        ResponseTime {
            packed: AtomicU64::new(UNMEASURED),
        }
    }

    /// Records how long one response took (send to response head), now.
    pub fn record(&self, sample: Duration) {
        self.record_at(sample.as_secs_f64() * 1e6, clock_ms());
    }

    /// Records a sample of `sample_us` microseconds taken at `now_ms`.
    pub fn record_at(&self, sample_us: f64, now_ms: u32) {
        let sample_us = sample_us.max(0.0);
        let mut current = self.packed.load(Ordering::Relaxed);
        loop {
            let next = match unpack(current) {
                None => sample_us,
                Some((estimate, stamp)) if sample_us < estimate => {
                    let decay = decay(elapsed_ms(now_ms, stamp));
                    estimate * decay + sample_us * (1.0 - decay)
                }
                // Peak: a slower answer than expected is believed at once.
                Some(_) => sample_us,
            };
            match self.packed.compare_exchange_weak(
                current,
                pack(next, now_ms),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// The estimate in microseconds as of now.
    pub fn estimate_us(&self) -> f64 {
        self.estimate_at(clock_ms())
    }

    /// The estimate in microseconds as of `now_ms`: the last one, decayed for
    /// the time since (as if a zero-time sample arrived now, as Linkerd does).
    #[inline]
    pub fn estimate_at(&self, now_ms: u32) -> f64 {
        match unpack(self.packed.load(Ordering::Relaxed)) {
            None => UNMEASURED_US,
            Some((estimate, stamp)) => match elapsed_ms(now_ms, stamp) {
                0 => estimate,
                elapsed => estimate * decay(elapsed),
            },
        }
    }
}

/// `exp(-elapsed / DECAY_MS)`: from two tables (256 ms steps times 1 ms steps)
/// up to 65 s, which is most of the cost of weighing a server in a pick.
#[inline]
fn decay(elapsed_ms: u32) -> f64 {
    static TABLES: LazyLock<([f64; 256], [f64; 256])> = LazyLock::new(|| {
        let table = |step: f64| std::array::from_fn(|i| (-(i as f64) * step / DECAY_MS).exp());
        (table(256.0), table(1.0))
    });
    match elapsed_ms {
        0 => 1.0,
        1..65_536 => {
            let (coarse, fine) = &*TABLES;
            coarse[(elapsed_ms >> 8) as usize] * fine[(elapsed_ms & 0xff) as usize]
        }
        _ => (-f64::from(elapsed_ms) / DECAY_MS).exp(),
    }
}

fn pack(estimate_us: f64, stamp_ms: u32) -> u64 {
    (u64::from((estimate_us as f32).to_bits()) << 32) | u64::from(stamp_ms)
}

#[inline]
fn unpack(packed: u64) -> Option<(f64, u32)> {
    let estimate = f32::from_bits((packed >> 32) as u32);
    (estimate >= 0.0).then_some((f64::from(estimate), packed as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 1e-3 + 1e-3
    }

    #[test]
    fn unmeasured_until_the_first_sample_which_replaces_the_default() {
        let rtt = ResponseTime::new();
        assert_eq!(rtt.estimate_at(5), UNMEASURED_US);
        rtt.record_at(1_000.0, 5);
        assert!(close(rtt.estimate_at(5), 1_000.0));
    }

    #[test]
    fn a_slower_sample_is_taken_at_once() {
        let rtt = ResponseTime::new();
        rtt.record_at(1_000.0, 0);
        rtt.record_at(50_000.0, 1);
        assert!(close(rtt.estimate_at(1), 50_000.0));
    }

    #[test]
    fn a_faster_sample_pulls_down_by_elapsed_time() {
        let rtt = ResponseTime::new();
        rtt.record_at(10_000.0, 0);
        // Same millisecond: no time has passed, the peak stands.
        rtt.record_at(1_000.0, 0);
        assert!(close(rtt.estimate_at(0), 10_000.0));
        // One decay period later the old estimate keeps 1/e of its weight.
        rtt.record_at(1_000.0, DECAY_MS as u32);
        let e = (-1.0f64).exp();
        assert!(close(
            rtt.estimate_at(DECAY_MS as u32),
            10_000.0 * e + 1_000.0 * (1.0 - e)
        ));
    }

    #[test]
    fn an_idle_estimate_decays_towards_zero() {
        let rtt = ResponseTime::new();
        rtt.record_at(8_000.0, 100);
        assert!(close(
            rtt.estimate_at(100 + DECAY_MS as u32),
            8_000.0 * (-1.0f64).exp()
        ));
        assert!(rtt.estimate_at(100 + 10 * DECAY_MS as u32) < 1.0);
    }

    #[test]
    fn decay_tables_match_exp() {
        for elapsed in (0..200_000).step_by(37).chain([255, 256, 65_535, 65_536]) {
            let exact = (-f64::from(elapsed) / DECAY_MS).exp();
            assert!((decay(elapsed) - exact).abs() <= exact * 1e-12, "{elapsed}");
        }
    }

    #[test]
    fn a_stamp_ahead_of_now_is_not_decayed() {
        let rtt = ResponseTime::new();
        rtt.record_at(4_000.0, 1_000);
        assert_eq!(rtt.estimate_at(999), rtt.estimate_at(1_000));
    }

    #[test]
    fn the_clock_wraps_without_harm() {
        let rtt = ResponseTime::new();
        rtt.record_at(4_000.0, u32::MAX - 10);
        // 20 ms later, across the wrap.
        assert!(close(rtt.estimate_at(9), 4_000.0 * decay(20)));
    }
}
