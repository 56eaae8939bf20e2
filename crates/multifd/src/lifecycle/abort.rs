//! The one way a migration stops early: record the first error, shut every
//! socket down so blocked I/O returns, wake every waiter.

use std::io::{PipeReader, PipeWriter, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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
    pub(crate) fn register_waker(&self, w: &'w dyn Wake) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_aborted() {
            w.wake_for_abort();
        }
        wakers.push(w);
    }

    /// Records `err` (if it is the first real error) and stops everything.
    /// Idempotent; later errors are only logged.
    pub(crate) fn fail(&self, err: Error) {
        {
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
        }
        if self.aborted.swap(true, Ordering::AcqRel) {
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
