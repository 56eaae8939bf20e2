//! Threads whose every way of ending goes through the abort path: an error
//! is latched, and so is a panic (as [`Error::Panicked`]), so the other
//! threads are woken instead of waiting for one that is gone.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::{Scope, ScopedJoinHandle};

use super::Abort;
use crate::error::{Error, Result};

/// Runs `f` on this thread; an error or a panic in it fails the migration
/// through `abort` (a panic as [`Error::Panicked`] naming `what`). Returns
/// `f`'s value, or `None` when it failed.
pub(crate) fn catch_panic<T>(
    abort: &Abort<'_>,
    what: &str,
    f: impl FnOnce() -> Result<T>,
) -> Option<T> {
    // The state `f` shares with other threads (queues, the barrier, the
    // abort latch) stays consistent across an unwind: locks are taken with
    // poison recovery and every waiter is woken by the abort path below.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            abort.fail(e);
            None
        }
        Err(_) => {
            abort.fail(Error::Panicked(what.to_owned()));
            None
        }
    }
}

/// Spawns `f` on a scoped thread called `name`, guarded as
/// [`catch_panic`]. The handle's `join` never reports a panic: it was
/// already turned into the migration's error.
pub(crate) fn spawn<'scope, 'env, 'w, T: Send + 'scope>(
    scope: &'scope Scope<'scope, 'env>,
    name: String,
    abort: &'scope Abort<'w>,
    f: impl FnOnce() -> Result<T> + Send + 'scope,
) -> Result<ScopedJoinHandle<'scope, Option<T>>>
where
    'w: 'scope,
{
    let context = format!("spawning thread {name}");
    std::thread::Builder::new()
        .name(name.clone())
        .spawn_scoped(scope, move || catch_panic(abort, &name, f))
        .map_err(|e| Error::io(context, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Wake;
    use std::sync::{Condvar, Mutex};

    /// A waiter that blocks until woken by an abort.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        cv: Condvar,
    }

    impl Wake for Gate {
        fn wake_for_abort(&self) {
            *self.open.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }

    impl Gate {
        fn wait(&self) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
    }

    #[test]
    fn a_panicking_thread_becomes_the_error_and_wakes_the_others() {
        let gate = Gate::default();
        let abort = Abort::new();
        abort.register_waker(&gate);
        let waited = std::thread::scope(|s| {
            // This one would wait forever without the abort path.
            let waiter = spawn(s, "waiter".into(), &abort, || {
                gate.wait();
                Ok(1)
            })
            .unwrap();
            let panicker = spawn(s, "multifd-recv-3".into(), &abort, || -> Result<()> {
                panic!("injected")
            })
            .unwrap();
            assert_eq!(panicker.join().unwrap(), None);
            waiter.join().unwrap()
        });
        assert_eq!(waited, Some(1));
        assert!(matches!(
            abort.take_error(),
            Some(Error::Panicked(name)) if name == "multifd-recv-3"
        ));
    }

    #[test]
    fn an_error_is_latched_once() {
        let abort = Abort::new();
        assert_eq!(catch_panic(&abort, "x", || Ok(5)), Some(5));
        assert!(!abort.is_aborted());
        let none: Option<()> = catch_panic(&abort, "x", || Err(Error::Cancelled));
        assert!(none.is_none());
        assert!(catch_panic(&abort, "y", || -> Result<()> { panic!("later") }).is_none());
        assert!(matches!(abort.take_error(), Some(Error::Cancelled)));
    }
}
