//! The destination's sync barrier (QEMU: `multifd_recv_sync_main()` and the
//! channel threads' wait on `sem_sync`).
//!
//! A channel thread that reads a SYNC packet *arrives* and blocks until the
//! main loader *releases* the round; the main loader, on a MULTIFD_FLUSH
//! record (or an EOS in per-section mode), waits until all N channels have
//! arrived, then releases them all. So no channel applies a round-k+1 page
//! before every channel finished round k. Abort wakes everyone with an
//! error; a channel that ended (EOF) can never arrive, so the main loader
//! fails instead of waiting forever.

use std::sync::{Condvar, Mutex};

use crate::abort::Wake;
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    arrived: usize,
    ended: usize,
    generation: u64,
    aborted: bool,
}

/// Barrier between N channel threads and the main loader.
#[derive(Debug)]
pub(super) struct SyncBarrier {
    channels: usize,
    state: Mutex<State>,
    main_cv: Condvar,
    chan_cv: Condvar,
}

impl SyncBarrier {
    pub(super) fn new(channels: usize) -> Self {
        Self {
            channels,
            state: Mutex::new(State::default()),
            main_cv: Condvar::new(),
            chan_cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a channel thread after a SYNC packet: waits for release.
    pub(super) fn arrive_and_wait(&self) -> Result<()> {
        let mut s = self.lock();
        if s.aborted {
            return Err(Error::Aborted);
        }
        s.arrived += 1;
        let generation = s.generation;
        if s.arrived == self.channels {
            self.main_cv.notify_all();
        }
        while s.generation == generation && !s.aborted {
            s = self.chan_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.generation == generation {
            return Err(Error::Aborted);
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
        while s.arrived < self.channels && !s.aborted {
            if s.ended > 0 {
                return Err(Error::PeerClosed {
                    endpoint: crate::error::Endpoint::Unclassified,
                    when: "on a multifd channel before its SYNC packet for a flush point",
                });
            }
            s = self.main_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.aborted {
            return Err(Error::Aborted);
        }
        s.arrived = 0;
        s.generation += 1;
        self.chan_cv.notify_all();
        Ok(())
    }

    /// Channels currently waiting for a release.
    pub(super) fn waiting(&self) -> usize {
        self.lock().arrived
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

    #[test]
    fn no_channel_passes_round_k_before_all_arrived() {
        let n = 4;
        let barrier = SyncBarrier::new(n);
        let arrivals = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    for k in 0..50 {
                        arrivals.fetch_add(1, Ordering::SeqCst);
                        barrier.arrive_and_wait().unwrap();
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
            let h = s.spawn(|| barrier.arrive_and_wait());
            let m = s.spawn(|| barrier.wait_all_and_release());
            std::thread::sleep(std::time::Duration::from_millis(20));
            barrier.wake_for_abort();
            assert!(h.join().unwrap().is_err());
            assert!(m.join().unwrap().is_err());
        });
    }

    #[test]
    fn ended_channel_fails_the_main_wait() {
        let barrier = SyncBarrier::new(2);
        barrier.channel_ended();
        assert!(barrier.wait_all_and_release().is_err());
    }
}
