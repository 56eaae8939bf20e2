//! Connections that arrive after a migration's own: the stray guard.
//!
//! Once the main channel and all N multifd channels are accepted, the
//! listener stays open for the rest of the migration and this guard keeps
//! accepting from it, so nothing queues up unseen. Each newcomer gets a
//! short while to show its first 4 bytes, without blocking anything else
//! (non-blocking reads, one `poll` over all of them):
//!
//! * multifd magic: the source opened more channels than we are configured
//!   for, and pages sent on them would be lost: the migration fails
//!   (QEMU's destination ignores them and finds out only when it breaks);
//! * `QEVM`: a second main channel, which fails it too;
//! * anything else, silence past the deadline, or a close: closed and
//!   logged, the migration goes on.
//!
//! At most [`MAX_PENDING`] newcomers are held at once (the oldest is closed
//! to make room), so a flood of connections cannot exhaust descriptors. At
//! the end [`StrayGuard::finish`] accepts whatever is still queued on the
//! listener and classifies it within a bounded wait: a late extra channel
//! that reached the queue before the migration ended is always seen.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use multifd_wire::packet::MULTIFD_MAGIC;
use multifd_wire::stream::QEVM_MAGIC;

use crate::error::{Error, Result};
use crate::lifecycle::Abort;
use crate::transport::{Connection, Listener, sys};

/// Newcomers held at once.
pub(super) const MAX_PENDING: usize = 64;
/// Connections accepted per wake-up (so the pending ones get read too).
const ACCEPT_BATCH: usize = 32;
/// Strays logged one by one before only every 1000th is.
const LOGGED: u64 = 10;

struct Pending {
    conn: Connection,
    head: [u8; 4],
    got: usize,
    deadline: Instant,
}

/// What became of a newcomer.
enum Verdict {
    /// Still waiting for its first bytes.
    Open,
    /// Closed: not a migration connection.
    Dropped(&'static str),
    /// A migration connection we have no place for.
    Fatal(Error),
}

/// The stray guard of one migration.
pub(super) struct StrayGuard<'l> {
    listener: &'l Listener,
    /// How long a newcomer has to show its first bytes.
    patience: Duration,
    stop_r: std::io::PipeReader,
    stop_w: std::sync::Mutex<Option<std::io::PipeWriter>>,
}

impl<'l> StrayGuard<'l> {
    pub(super) fn new(listener: &'l Listener, patience: Duration) -> Result<Self> {
        let (stop_r, stop_w) =
            std::io::pipe().map_err(|e| Error::io("creating the stray guard's pipe", e))?;
        Ok(Self {
            listener,
            patience,
            stop_r,
            stop_w: std::sync::Mutex::new(Some(stop_w)),
        })
    }

    /// Ends [`StrayGuard::run`] after its final sweep.
    pub(super) fn finish(&self) {
        // Dropping the writer makes the pipe readable (EOF).
        self.stop_w.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The guard's thread: accepts and classifies until finished (then
    /// sweeps the listener's queue) or the migration aborts. A fatal
    /// newcomer is returned as the error.
    pub(super) fn run(&self, abort: &Abort<'_>) -> Result<()> {
        let mut pending: Vec<Pending> = Vec::new();
        let mut strays = 0u64;
        let mut final_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            // Newcomers that ran out of time are closed.
            pending.retain(|p| {
                let keep = p.deadline > now;
                if !keep {
                    log_stray(&mut strays, "it sent nothing in time");
                }
                keep
            });
            if let Some(end) = final_deadline
                && (pending.is_empty() || now >= end)
            {
                return Ok(());
            }
            // [listener, stop (until it fired), abort wake (if any), newcomers...]
            let mut fds = vec![self.listener.as_raw_fd()];
            let stop_at = final_deadline.is_none().then(|| {
                fds.push(self.stop_r.as_raw_fd());
                fds.len() - 1
            });
            fds.extend(abort.wake_fd().map(|w| w.as_raw_fd()));
            let first_conn = fds.len();
            fds.extend(pending.iter().map(|p| p.conn.as_raw_fd()));
            let wait = pending
                .iter()
                .map(|p| p.deadline)
                .chain(final_deadline)
                .min()
                .map(|d| d.saturating_duration_since(now));
            let ready = sys::poll_readable_set(&fds, wait)
                .map_err(|e| Error::io("waiting for stray connections", e))?;
            if abort.is_aborted() {
                return Ok(());
            }
            // First the newcomers polled (their indices match `ready`),
            // then new ones.
            let mut kept = Vec::with_capacity(pending.len());
            for (p, &readable) in pending.drain(..).zip(&ready[first_conn..]) {
                let mut p = p;
                match if readable {
                    classify(&mut p)
                } else {
                    Verdict::Open
                } {
                    Verdict::Open => kept.push(p),
                    Verdict::Dropped(why) => log_stray(&mut strays, why),
                    Verdict::Fatal(e) => return Err(e),
                }
            }
            pending = kept;
            if stop_at.is_some_and(|i| ready[i]) {
                // The migration is over: take what is queued, then give
                // the newcomers their time, bounded.
                final_deadline = Some(Instant::now() + self.patience);
                self.accept_queued(&mut pending, &mut strays, usize::MAX)?;
            } else if ready[0] {
                self.accept_queued(&mut pending, &mut strays, ACCEPT_BATCH)?;
            }
        }
    }

    /// Accepts up to `max` queued connections without waiting.
    fn accept_queued(
        &self,
        pending: &mut Vec<Pending>,
        strays: &mut u64,
        max: usize,
    ) -> Result<()> {
        for _ in 0..max {
            let Some(conn) = self.listener.accept(Some(Duration::ZERO))? else {
                return Ok(());
            };
            if conn.set_nonblocking(true).is_err() {
                log_stray(strays, "it could not be made non-blocking");
                continue;
            }
            if pending.len() == MAX_PENDING {
                pending.remove(0);
                log_stray(
                    strays,
                    "too many connections were waiting to identify themselves",
                );
            }
            pending.push(Pending {
                conn,
                head: [0; 4],
                got: 0,
                deadline: Instant::now() + self.patience,
            });
        }
        Ok(())
    }
}

/// Reads what a newcomer has sent so far and judges it.
fn classify(p: &mut Pending) -> Verdict {
    match p.conn.read(&mut p.head[p.got..]) {
        Ok(0) => return Verdict::Dropped("it closed before identifying itself"),
        Ok(n) => p.got += n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Verdict::Open,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Verdict::Open,
        Err(_) => return Verdict::Dropped("reading its first bytes failed"),
    }
    if p.got < p.head.len() {
        return Verdict::Open;
    }
    match u32::from_be_bytes(p.head) {
        MULTIFD_MAGIC => Verdict::Fatal(Error::Mismatch(
            "the source opened more multifd channels than are configured \
             (multifd-channels differs between the sides)"
                .into(),
        )),
        QEVM_MAGIC => Verdict::Fatal(Error::Mismatch("a second main channel arrived".into())),
        _ => Verdict::Dropped("its first bytes are not a migration's"),
    }
}

fn log_stray(count: &mut u64, why: &str) {
    *count += 1;
    if *count <= LOGGED || count.is_multiple_of(1000) {
        tracing::warn!(
            strays = *count,
            "closed a connection that is not part of the migration: {why}"
        );
    }
}
