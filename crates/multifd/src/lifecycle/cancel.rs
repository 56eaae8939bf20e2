//! Cancelling a running migration from another thread.

use crate::sync::{Condvar, Mutex};

/// A handle that stops a migration from outside. Cancelling takes the same
/// path as an error: every socket is shut down, every thread joined, and
/// the migration returns [`Error::Cancelled`](crate::error::Error::Cancelled)
/// promptly, even if it was blocked in a write, a read, an accept or a
/// barrier.
///
/// Put an `Arc<Cancel>` into the options of a migration and call
/// [`Cancel::cancel`] from any thread.
#[derive(Debug)]
pub struct Cancel {
    state: Mutex<State>,
    cv: Condvar,
}

impl Default for Cancel {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    cancelled: bool,
    /// Bumped when a migration using this handle ends, to release its watcher.
    ends: u64,
}

impl Cancel {
    /// A handle that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation. Idempotent.
    pub fn cancel(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.cancelled = true;
        self.cv.notify_all();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancelled
    }

    /// The current end count, taken by a watcher before it waits.
    pub(crate) fn epoch(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).ends
    }

    /// Blocks until cancelled (returns true) or until a migration ended
    /// after `epoch` was taken (returns false).
    pub(crate) fn wait(&self, epoch: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !s.cancelled && s.ends == epoch {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.cancelled
    }

    /// Releases the watchers of migrations that have ended.
    pub(crate) fn migration_ended(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.ends += 1;
        self.cv.notify_all();
    }
}

/// Runs `body` with a watcher thread that turns a cancellation into
/// `on_cancel()`, and releases the watcher when `body` returns.
pub(crate) fn watched<T>(
    cancel: Option<&Cancel>,
    on_cancel: impl FnOnce() + Send,
    body: impl FnOnce() -> T,
) -> T {
    let Some(cancel) = cancel else {
        return body();
    };
    /// Releases the watcher on every way out of the body, a panic included
    /// (the scope would otherwise wait for the watcher forever).
    struct EndOnDrop<'c>(&'c Cancel);
    impl Drop for EndOnDrop<'_> {
        fn drop(&mut self) {
            self.0.migration_ended();
        }
    }
    let epoch = cancel.epoch();
    std::thread::scope(|s| {
        let watcher = std::thread::Builder::new()
            .name("multifd-cancel".into())
            .spawn_scoped(s, move || {
                if cancel.wait(epoch) {
                    on_cancel();
                }
            });
        let ended = EndOnDrop(cancel);
        let out = body();
        drop(ended);
        if let Ok(w) = watcher {
            let _ = w.join();
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn watcher_fires_on_cancel_and_leaves_on_end() {
        let c = Cancel::new();
        let fired = std::sync::atomic::AtomicBool::new(false);
        watched(
            Some(&c),
            || fired.store(true, std::sync::atomic::Ordering::SeqCst),
            || (),
        );
        assert!(!fired.load(std::sync::atomic::Ordering::SeqCst));
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                c.cancel();
            });
            watched(
                Some(&c),
                move || tx.send(()).unwrap(),
                || {
                    rx.recv_timeout(Duration::from_secs(5)).unwrap();
                },
            );
        });
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(c.is_cancelled());
    }
}

/// Model checking of cancellation (`RUSTFLAGS="--cfg loom" cargo test -p
/// multifd --release --lib loom`): the watcher's protocol of [`watched`]
/// (epoch, wait, end) against a cancel and the migration's end.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::Arc;
    use crate::sync::model;
    use loom::thread;

    /// The watcher always returns (teardown completes); it reports a cancel
    /// that came before the end, and never one that did not happen.
    #[test]
    fn loom_the_watcher_ends_with_the_migration_or_the_cancel() {
        model(|| {
            let c = Arc::new(Cancel::new());
            let epoch = c.epoch();
            let w = c.clone();
            let watcher = thread::spawn(move || w.wait(epoch));
            let k = c.clone();
            let canceller = thread::spawn(move || k.cancel());
            c.migration_ended();
            let fired = watcher.join().unwrap();
            canceller.join().unwrap();
            assert!(c.is_cancelled());
            // Ended first: the watcher may have left without firing.
            let _ = fired;
        });
        model(|| {
            let c = Arc::new(Cancel::new());
            let epoch = c.epoch();
            let w = c.clone();
            let watcher = thread::spawn(move || w.wait(epoch));
            c.migration_ended();
            assert!(!watcher.join().unwrap(), "fired without a cancel");
        });
    }

    /// A second migration on the same handle: a watcher taken after the
    /// first ended waits for its own end, not the old one.
    #[test]
    fn loom_an_old_end_does_not_release_a_new_watcher() {
        model(|| {
            let c = Arc::new(Cancel::new());
            c.migration_ended();
            let epoch = c.epoch();
            let w = c.clone();
            let watcher = thread::spawn(move || w.wait(epoch));
            let k = c.clone();
            let canceller = thread::spawn(move || k.cancel());
            assert!(watcher.join().unwrap(), "released by an old end");
            canceller.join().unwrap();
        });
    }
}
