//! The destination's sync barrier (QEMU: `multifd_recv_sync_main()` and the
//! channel threads' wait on `sem_sync`).
//!
//! A channel thread that reads a SYNC packet *arrives* and blocks until the
//! main loader *releases* the round; the main loader, on a MULTIFD_FLUSH
//! record (or an EOS in per-section mode), waits until all N channels have
//! arrived, then releases them all. So no channel applies a round-k+1 page
//! before every channel finished round k. Abort wakes everyone with an
//! error; a channel that ended (EOF) can never arrive, so the main loader
//! fails instead of waiting forever; and once the ram section is over (the
//! EOS of its END chunk) the barrier is *closed*: a channel that arrives
//! then (or is still waiting) sent a SYNC the main stream has no flush
//! point for, and a channel that applied pages after its last SYNC sent
//! data nothing orders: typed mismatches, instead of a wait that nothing
//! would end or a page that might be stale.

use crate::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::Wake;

#[derive(Debug, Default)]
struct State {
    /// Per channel: it began applying pages since its last SYNC.
    pages_pending: Vec<bool>,
    arrived: usize,
    ended: usize,
    generation: u64,
    aborted: bool,
    closed: bool,
    /// Whether the main loader is waiting (for tests that order events).
    main_waiting: bool,
}

/// Barrier between N channel threads and the main loader.
#[derive(Debug)]
pub(super) struct SyncBarrier {
    channels: usize,
    state: Mutex<State>,
    main_cv: Condvar,
    chan_cv: Condvar,
}

/// The error of a channel whose SYNC has no flush point.
fn extra_sync(channel: u8) -> Error {
    Error::Mismatch(format!(
        "multifd channel {channel} sent more SYNC packets than the main stream has flush \
         points (flush mode mismatch: multifd-flush-after-each-section?)"
    ))
}

/// The error of a channel whose pages come after its last SYNC.
fn late_pages(channel: u8) -> Error {
    Error::Mismatch(format!(
        "multifd channel {channel} sent pages after its last SYNC (after the main stream's \
         last flush point)"
    ))
}

impl SyncBarrier {
    pub(super) fn new(channels: usize) -> Self {
        Self {
            channels,
            state: Mutex::new(State {
                pages_pending: vec![false; channels],
                ..State::default()
            }),
            main_cv: Condvar::new(),
            chan_cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by channel `channel` after a SYNC packet: waits for release.
    pub(super) fn arrive_and_wait(&self, channel: u8) -> Result<()> {
        let mut s = self.lock();
        if s.aborted {
            return Err(Error::Aborted);
        }
        if s.closed {
            return Err(extra_sync(channel));
        }
        if let Some(p) = s.pages_pending.get_mut(usize::from(channel)) {
            *p = false;
        }
        s.arrived += 1;
        let generation = s.generation;
        if s.arrived == self.channels {
            self.main_cv.notify_all();
        }
        while s.generation == generation && !s.aborted && !s.closed {
            s = self.chan_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.generation != generation {
            Ok(())
        } else if s.aborted {
            Err(Error::Aborted)
        } else {
            Err(extra_sync(channel))
        }
    }

    /// Called by channel `channel` before it applies a packet's pages: fails
    /// once the barrier is closed (pages after the last flush point).
    pub(super) fn begin_pages(&self, channel: u8) -> Result<()> {
        let mut s = self.lock();
        if s.closed {
            return Err(late_pages(channel));
        }
        if let Some(p) = s.pages_pending.get_mut(usize::from(channel)) {
            *p = true;
        }
        Ok(())
    }

    /// Called by a channel thread that reached a clean end of its stream.
    pub(super) fn channel_ended(&self) {
        let mut s = self.lock();
        s.ended += 1;
        self.main_cv.notify_all();
    }

    /// Called by the main loader at a sync point: waits for all channels,
    /// then releases them.
    pub(super) fn wait_all_and_release(&self) -> Result<()> {
        let mut s = self.lock();
        s.main_waiting = true;
        while s.arrived < self.channels && !s.aborted {
            if s.ended > 0 {
                s.main_waiting = false;
                return Err(Error::PeerClosed {
                    endpoint: Endpoint::Unclassified,
                    when: "on a multifd channel before its SYNC packet for a flush point",
                });
            }
            s = self.main_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.main_waiting = false;
        if s.aborted {
            return Err(Error::Aborted);
        }
        s.arrived = 0;
        s.generation += 1;
        self.chan_cv.notify_all();
        Ok(())
    }

    /// The ram section is over: no flush point will come. A channel still
    /// waiting, or arriving from now on, fails with a mismatch; so does
    /// closing when a channel applied pages since its last SYNC, and a
    /// channel that begins applying pages from now on. Idempotent.
    pub(super) fn close(&self) -> Result<()> {
        let mut s = self.lock();
        s.closed = true;
        self.chan_cv.notify_all();
        match s.pages_pending.iter().position(|&p| p) {
            Some(channel) => Err(late_pages(channel as u8)),
            None => Ok(()),
        }
    }

    /// Channels waiting for a release, and whether the main loader waits.
    #[cfg(test)]
    fn waiting(&self) -> (usize, bool) {
        let s = self.lock();
        (s.arrived, s.main_waiting)
    }
}

impl Wake for SyncBarrier {
    fn wake_for_abort(&self) {
        let mut s = self.lock();
        s.aborted = true;
        self.main_cv.notify_all();
        self.chan_cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Waits (bounded) until the barrier is in state `want`: the order of
    /// events is then certain, with no guess at how long a thread takes.
    fn until(barrier: &SyncBarrier, want: (usize, bool)) {
        for _ in 0..100_000 {
            if barrier.waiting() == want {
                return;
            }
            std::thread::yield_now();
        }
        panic!("barrier never reached {want:?}: {:?}", barrier.waiting());
    }

    #[test]
    fn no_channel_passes_round_k_before_all_arrived() {
        let n = 4;
        let barrier = SyncBarrier::new(n);
        let arrivals = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for c in 0..n as u8 {
                let (barrier, arrivals) = (&barrier, &arrivals);
                s.spawn(move || {
                    for k in 0..50 {
                        arrivals.fetch_add(1, Ordering::SeqCst);
                        barrier.arrive_and_wait(c).unwrap();
                        assert!(arrivals.load(Ordering::SeqCst) >= n * (k + 1));
                    }
                });
            }
            for _ in 0..50 {
                barrier.wait_all_and_release().unwrap();
            }
        });
    }

    #[test]
    fn abort_wakes_both_sides() {
        let barrier = SyncBarrier::new(2);
        std::thread::scope(|s| {
            let h = s.spawn(|| barrier.arrive_and_wait(0));
            let m = s.spawn(|| barrier.wait_all_and_release());
            until(&barrier, (1, true));
            barrier.wake_for_abort();
            assert!(matches!(h.join().unwrap(), Err(Error::Aborted)));
            assert!(matches!(m.join().unwrap(), Err(Error::Aborted)));
        });
    }

    #[test]
    fn ended_channel_fails_the_main_wait() {
        let barrier = SyncBarrier::new(2);
        barrier.channel_ended();
        assert!(barrier.wait_all_and_release().is_err());
    }

    #[test]
    fn pages_after_the_last_sync_fail_whenever_they_come() {
        // Applied before the close: the close reports them.
        let barrier = SyncBarrier::new(2);
        barrier.begin_pages(1).unwrap();
        let err = barrier.close().unwrap_err();
        assert!(
            matches!(&err, Error::Mismatch(m) if m.contains("channel 1")),
            "{err}"
        );
        // Begun after the close: refused.
        assert!(matches!(barrier.begin_pages(0), Err(Error::Mismatch(_))));
        // Pages followed by their SYNC are in order.
        let barrier = SyncBarrier::new(1);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                barrier.begin_pages(0).unwrap();
                barrier.arrive_and_wait(0)
            });
            until(&barrier, (1, false));
            barrier.wait_all_and_release().unwrap();
            h.join().unwrap().unwrap();
        });
        barrier.close().unwrap();
    }

    #[test]
    fn closing_fails_a_waiting_channel_and_later_arrivals() {
        let barrier = SyncBarrier::new(2);
        std::thread::scope(|s| {
            let h = s.spawn(|| barrier.arrive_and_wait(1));
            until(&barrier, (1, false));
            barrier.close().unwrap();
            let err = h.join().unwrap().unwrap_err();
            assert!(
                matches!(&err, Error::Mismatch(m) if m.contains("channel 1")),
                "{err}"
            );
        });
        assert!(matches!(
            barrier.arrive_and_wait(0),
            Err(Error::Mismatch(_))
        ));
    }
}

/// Model checking of the barrier (`RUSTFLAGS="--cfg loom" cargo test -p
/// multifd --release --lib loom`).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::Arc;
    use crate::sync::model;
    use loom::thread;

    /// A round: two channels arrive, the main loader waits for both and
    /// releases them; nobody is left waiting (no lost wake-up).
    #[test]
    fn loom_a_round_releases_every_channel() {
        model(|| {
            let b = Arc::new(SyncBarrier::new(2));
            let chans: Vec<_> = (0..2u8)
                .map(|c| {
                    let b = b.clone();
                    thread::spawn(move || b.arrive_and_wait(c))
                })
                .collect();
            b.wait_all_and_release().unwrap();
            for t in chans {
                t.join().unwrap().unwrap();
            }
        });
    }

    /// Close against arrivals: a channel arriving before, during or after
    /// the close fails with a mismatch, never waits for ever.
    #[test]
    fn loom_close_fails_waiting_and_late_arrivals() {
        model(|| {
            let b = Arc::new(SyncBarrier::new(2));
            let chans: Vec<_> = (0..2u8)
                .map(|c| {
                    let b = b.clone();
                    thread::spawn(move || b.arrive_and_wait(c))
                })
                .collect();
            b.close().unwrap();
            for t in chans {
                assert!(matches!(t.join().unwrap(), Err(Error::Mismatch(_))));
            }
        });
    }

    /// Abort against a round in progress: every party returns; the main
    /// loader and the channels fail, or the round completed first.
    #[test]
    fn loom_abort_wakes_everyone_in_every_interleaving() {
        model(|| {
            let b = Arc::new(SyncBarrier::new(2));
            let c0 = {
                let b = b.clone();
                thread::spawn(move || b.arrive_and_wait(0))
            };
            let main = {
                let b = b.clone();
                thread::spawn(move || b.wait_all_and_release())
            };
            b.wake_for_abort();
            assert!(matches!(main.join().unwrap(), Err(Error::Aborted)));
            assert!(matches!(c0.join().unwrap(), Err(Error::Aborted)));
        });
    }

    /// Pages after the last SYNC against the close: one of the two sees
    /// them, whichever order they run in.
    #[test]
    fn loom_pages_after_the_last_sync_are_always_caught() {
        model(|| {
            let b = Arc::new(SyncBarrier::new(1));
            let ch = {
                let b = b.clone();
                thread::spawn(move || b.begin_pages(0))
            };
            let closed = b.close();
            let began = ch.join().unwrap();
            assert!(
                closed.is_err() || began.is_err(),
                "pages after the last flush point went unnoticed"
            );
        });
    }
}
