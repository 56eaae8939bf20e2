//! Convergence controls: when rounds stop shrinking, throttle the vCPUs
//! (auto-converge) and/or raise the downtime limit (a ramp).
//!
//! The trigger is QEMU's (`migration_trigger_throttle`): a sync period is
//! "dirty-rate high" when the pages dirtied during it exceed
//! `trigger_threshold`% of the pages sent in it; every second such period
//! (the count is not reset by a quiet one, as in QEMU) the throttle goes
//! up: `initial` the first time, then by `increment`, up to `max`.

use std::time::Duration;

use super::{AutoConverge, DowntimeRamp, SourceOptions};

/// The state of the convergence controls over one migration.
#[derive(Debug)]
pub(super) struct Convergence {
    auto: Option<AutoConverge>,
    ramp: Option<DowntimeRamp>,
    limit: Duration,
    high: u32,
    throttle: u8,
}

/// The throttle threshold of a period when auto-converge is off (used for
/// the downtime ramp alone): QEMU's default.
const DEFAULT_THRESHOLD: u8 = 50;

impl Convergence {
    pub(super) fn new(opts: &SourceOptions) -> Self {
        Self {
            auto: opts.auto_converge,
            ramp: opts.downtime_ramp,
            limit: opts.downtime_limit,
            high: 0,
            throttle: 0,
        }
    }

    /// The downtime limit in force.
    pub(super) fn limit(&self) -> Duration {
        self.limit
    }

    /// The current throttle, percent.
    #[cfg(test)]
    pub(super) fn throttle(&self) -> u8 {
        self.throttle
    }

    /// After a sync: `dirtied` pages were reported dirty for a period in
    /// which `sent` pages went out. Returns the new throttle when it
    /// changes.
    pub(super) fn after_sync(&mut self, dirtied: u64, sent: u64) -> Option<u8> {
        if self.auto.is_none() && self.ramp.is_none() {
            return None;
        }
        let threshold = self.auto.map_or(DEFAULT_THRESHOLD, |a| a.trigger_threshold);
        if u128::from(dirtied) * 100 <= u128::from(sent) * u128::from(threshold) {
            return None;
        }
        self.high += 1;
        if self.high < 2 {
            return None;
        }
        self.high = 0;
        if let Some(r) = self.ramp {
            self.limit = (self.limit + r.step).min(r.max.max(self.limit));
        }
        let a = self.auto?;
        let next = if self.throttle == 0 {
            a.initial
        } else {
            self.throttle.saturating_add(a.increment)
        }
        .min(a.max);
        (next != self.throttle).then(|| {
            self.throttle = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_like_qemu() {
        let opts = SourceOptions {
            auto_converge: Some(AutoConverge::default()),
            ..SourceOptions::default()
        };
        let mut c = Convergence::new(&opts);
        // Shrinking rounds: nothing.
        assert_eq!(c.after_sync(100, 1000), None);
        assert_eq!(c.after_sync(500, 1000), None);
        // Two high periods: 20%, two more: 30%, ...
        let mut seen = Vec::new();
        for _ in 0..40 {
            if let Some(t) = c.after_sync(900, 1000) {
                seen.push(t);
            }
        }
        assert_eq!(seen[..3], [20, 30, 40]);
        assert_eq!(*seen.last().unwrap(), 99);
        assert_eq!(c.throttle(), 99);
    }

    #[test]
    fn downtime_ramp_alone() {
        let opts = SourceOptions {
            downtime_limit: Duration::from_millis(100),
            downtime_ramp: Some(DowntimeRamp {
                step: Duration::from_millis(50),
                max: Duration::from_millis(220),
            }),
            ..SourceOptions::default()
        };
        let mut c = Convergence::new(&opts);
        for _ in 0..10 {
            assert_eq!(c.after_sync(10, 5), None);
        }
        assert_eq!(c.limit(), Duration::from_millis(220));
        assert_eq!(c.throttle(), 0);
    }
}
