//! `max_bandwidth`: one token bucket shared by every channel thread and the
//! main stream.
//!
//! A writer takes tokens for what it is about to write; the bucket may go
//! into debt, and the writer then sleeps until the debt is paid back at the
//! configured rate. The bucket holds at most [`BURST`] of unused time, so
//! an idle pause cannot be spent later as a burst. Sleeping is in short
//! slices so that an aborted migration is not held up.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::lifecycle::Abort;

/// Unused time the bucket keeps (tokens for `rate * BURST` bytes).
const BURST: Duration = Duration::from_millis(10);
/// Longest single sleep before looking at the abort flag again.
const SLICE: Duration = Duration::from_millis(20);

/// A shared token bucket; [`RateLimiter::unlimited`] lets everything through.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Bytes per second; 0: unlimited.
    rate: u64,
    /// Lifted for the final round (QEMU does not limit the completion).
    lifted: AtomicBool,
    /// Tokens (bytes, negative: debt) as of the instant.
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `rate` bytes per second; `None` or 0: unlimited.
    pub(crate) fn new(rate: Option<u64>) -> Self {
        Self {
            rate: rate.unwrap_or(0),
            lifted: AtomicBool::new(false),
            bucket: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Lets everything through from now on.
    pub(super) fn lift(&self) {
        self.lifted.store(true, Ordering::Release);
    }

    /// Takes `bytes` tokens, sleeping while the bucket is in debt. Returns
    /// early when the migration is aborted (the write will fail anyway).
    pub(super) fn take(&self, bytes: u64, abort: &Abort<'_>) {
        if self.rate == 0 || self.lifted.load(Ordering::Acquire) {
            return;
        }
        let rate = self.rate as f64;
        let wait = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let burst = rate * BURST.as_secs_f64();
            let refilled = b.0 + rate * now.duration_since(b.1).as_secs_f64();
            b.0 = refilled.min(burst) - bytes as f64;
            b.1 = now;
            if b.0 < 0.0 {
                Duration::from_secs_f64(-b.0 / rate)
            } else {
                Duration::ZERO
            }
        };
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || abort.is_aborted() || self.lifted.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_across_threads() {
        let abort = Abort::new();
        let limiter = RateLimiter::new(Some(50 << 20));
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..40 {
                        limiter.take(128 << 10, &abort);
                    }
                });
            }
        });
        // 15 MiB at 50 MiB/s: 0.3 s, less the 10 ms burst. Only the lower
        // bound says the rate held; the upper one is a sanity bound a
        // loaded machine stays far below.
        let secs = t.elapsed().as_secs_f64();
        assert!((0.28..10.0).contains(&secs), "{secs} s");
        // Unlimited: 1 TiB goes at once (at 50 MiB/s it would take hours).
        let unlimited = RateLimiter::new(None);
        let t = Instant::now();
        unlimited.take(1 << 40, &abort);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
