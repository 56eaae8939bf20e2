//! The one way a migration stops early: record the first error, shut every
//! socket down so blocked I/O returns, wake every waiter.

use std::io::{PipeReader, PipeWriter, Write};

use crate::sync::{AtomicBool, Mutex, Ordering};

use crate::error::Error;
use crate::transport::Connection;

/// Something that must be woken when the migration aborts (a barrier, a queue).
pub(crate) trait Wake: Sync {
    /// Wakes every thread waiting on it; later waits must fail at once.
    fn wake_for_abort(&self);
}

/// First-error latch plus the handles needed to stop everything.
pub(crate) struct Abort<'w> {
    aborted: AtomicBool,
    /// Set once the migration finished; a cancel after that is too late.
    completed: AtomicBool,
    first: Mutex<Option<Error>>,
    sockets: Mutex<Vec<Connection>>,
    wakers: Mutex<Vec<&'w dyn Wake>>,
    /// Readable once aborted: lets a wait on a listening socket end.
    pipe: Option<(PipeReader, Mutex<PipeWriter>)>,
}

impl<'w> Abort<'w> {
    pub(crate) fn new() -> Self {
        Self {
            aborted: AtomicBool::new(false),
            completed: AtomicBool::new(false),
            first: Mutex::new(None),
            sockets: Mutex::new(Vec::new()),
            wakers: Mutex::new(Vec::new()),
            pipe: std::io::pipe().ok().map(|(r, w)| (r, Mutex::new(w))),
        }
    }

    /// A descriptor that becomes readable when the migration aborts.
    pub(crate) fn wake_fd(&self) -> Option<&dyn std::os::fd::AsRawFd> {
        self.pipe
            .as_ref()
            .map(|(r, _)| r as &dyn std::os::fd::AsRawFd)
    }

    /// True once any part of the migration failed.
    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Keeps a handle of `conn` to shut it down on abort. A socket registered
    /// after the abort is shut down at once.
    pub(crate) fn register_socket(&self, conn: &Connection) -> Result<(), Error> {
        let clone = conn
            .try_clone()
            .map_err(|e| Error::io("duplicating a socket handle", e))?;
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_aborted() {
            clone.shutdown();
        }
        sockets.push(clone);
        Ok(())
    }

    /// Descriptors of the registered sockets, in registration order. They
    /// stay open until [`Abort::close_sockets`].
    pub(crate) fn socket_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    /// Shuts down the `index`-th registered socket (in registration order).
    pub(crate) fn shutdown_socket(&self, index: usize) {
        if let Some(s) = self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
        {
            s.shutdown();
        }
    }

    /// Adds a waiter to wake on abort.
    /// A waiter registered after the abort is woken at once (and only
    /// then: the abort path will not see it), so every waiter is woken
    /// exactly once.
    pub(crate) fn register_waker(&self, w: &'w dyn Wake) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_aborted() {
            w.wake_for_abort();
            return;
        }
        wakers.push(w);
    }

    /// Records `err` (if it is the first real error) and stops everything.
    /// Idempotent; later errors are only logged.
    pub(crate) fn fail(&self, err: Error) {
        // The latch, the abort flag and `complete` share one lock: a cancel
        // and the point of no return are ordered, never both taken (the
        // flag used to be set after the lock was released, so `complete`
        // could say yes to a migration a cancel had already failed; found
        // by the loom model of completion against cancel).
        let first_abort = {
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(err, Error::Cancelled) && self.completed.load(Ordering::Acquire) {
                return;
            }
            match (&*first, &err) {
                (None, Error::Aborted) => {}
                (None, _) => *first = Some(err),
                (Some(_), Error::Aborted) => {}
                (Some(_), _) => tracing::debug!("later error after abort: {err}"),
            }
            !self.aborted.swap(true, Ordering::AcqRel)
        };
        if !first_abort {
            return;
        }
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s.shutdown();
        }
        for w in self.wakers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            w.wake_for_abort();
        }
        if let Some((_, w)) = &self.pipe {
            let _ = w.lock().unwrap_or_else(|p| p.into_inner()).write_all(&[1]);
        }
    }

    /// Marks the point of no return, unless the migration already failed:
    /// from now on a cancel is too late (other errors still count).
    /// Returns whether it was marked.
    pub(crate) fn complete(&self) -> bool {
        let _first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_aborted() {
            return false;
        }
        self.completed.store(true, Ordering::Release);
        true
    }

    /// The first error, if any part failed.
    pub(crate) fn take_error(&self) -> Option<Error> {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        match first.take() {
            Some(e) => Some(e),
            None if self.is_aborted() => Some(Error::Aborted),
            None => None,
        }
    }

    /// Shuts down every registered socket (also used at the normal end).
    pub(crate) fn close_sockets(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            s.shutdown();
        }
    }
}

/// Model checking of the abort latch (`RUSTFLAGS="--cfg loom" cargo test
/// -p multifd --release --lib loom`).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::Arc;
    use crate::sync::model;
    use loom::sync::atomic::AtomicUsize;
    use loom::thread;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake_for_abort(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Two errors race, a waiter registers meanwhile: one of the errors is
    /// kept (the first to take the latch), and every waiter is woken
    /// exactly once, whether it registered before or after the abort.
    #[test]
    fn loom_the_first_error_wins_and_every_waiter_wakes_once() {
        model(|| {
            let early: &'static Counter = Box::leak(Box::default());
            let late: &'static Counter = Box::leak(Box::default());
            let abort: Arc<Abort<'static>> = Arc::new(Abort::new());
            abort.register_waker(early);
            let a = abort.clone();
            let t1 = thread::spawn(move || a.fail(Error::Config("one".into())));
            let a = abort.clone();
            let t2 = thread::spawn(move || a.fail(Error::Config("two".into())));
            let a = abort.clone();
            let t3 = thread::spawn(move || a.register_waker(late));
            t1.join().unwrap();
            t2.join().unwrap();
            t3.join().unwrap();
            assert!(abort.is_aborted());
            assert_eq!(early.0.load(Ordering::SeqCst), 1);
            assert_eq!(late.0.load(Ordering::SeqCst), 1);
            match abort.take_error() {
                Some(Error::Config(m)) => assert!(m == "one" || m == "two"),
                other => panic!("{other:?}"),
            }
        });
    }

    /// An error that merely reports the abort never hides the cause.
    #[test]
    fn loom_a_consequence_never_replaces_the_cause() {
        model(|| {
            let abort: Arc<Abort<'static>> = Arc::new(Abort::new());
            let a = abort.clone();
            let t = thread::spawn(move || a.fail(Error::Aborted));
            abort.fail(Error::Cancelled);
            t.join().unwrap();
            assert!(matches!(abort.take_error(), Some(Error::Cancelled)));
        });
    }

    /// Completion against cancel: either the cancel wins (the migration
    /// fails with `Cancelled`, and `complete` said no) or completion wins
    /// (the cancel is ignored: no error, nothing shut down). Never both.
    #[test]
    fn loom_completion_and_cancel_do_not_both_win() {
        model(|| {
            let abort: Arc<Abort<'static>> = Arc::new(Abort::new());
            let a = abort.clone();
            let t = thread::spawn(move || a.fail(Error::Cancelled));
            let completed = abort.complete();
            t.join().unwrap();
            let aborted = abort.is_aborted();
            let error = abort.take_error();
            if completed {
                assert!(!aborted, "aborted after the point of no return");
                assert!(error.is_none(), "{error:?} after the point of no return");
            } else {
                assert!(aborted);
                assert!(matches!(error, Some(Error::Cancelled)), "{error:?}");
            }
        });
    }
}
