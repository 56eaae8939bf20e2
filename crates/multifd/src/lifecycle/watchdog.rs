//! The idle timeout: a migration fails when no byte moved on any of its
//! connections for that long, whatever the threads are blocked in.
//!
//! Every [`Connection`] counts the bytes it moves and marks the blocking
//! call it is in ([`Activity`]). The watchdog thread samples the sum; when
//! it has not changed for the idle timeout it fails the migration with
//! [`Error::Stalled`] naming the connection that has been waiting longest,
//! and the abort path shuts every socket down, so reads and writes already
//! blocked return. Time spent in our own or the caller's work (mapping RAM,
//! collecting the dirty log) is not idleness: it runs under a
//! [`Watchdog::hold`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Abort;
use crate::error::{Endpoint, Error};
use crate::transport::{Activity, Connection};

/// Shortest and longest sampling period.
const MIN_PERIOD: Duration = Duration::from_millis(10);
const MAX_PERIOD: Duration = Duration::from_secs(1);

/// Watches the connections of one migration.
pub(crate) struct Watchdog {
    /// `None`: never time out.
    idle: Option<Duration>,
    conns: Mutex<Vec<(Endpoint, Arc<Activity>)>>,
    holds: AtomicUsize,
    stopped: Mutex<bool>,
    cv: Condvar,
}

/// Keeps the watchdog from counting time as idle while it lives.
pub(crate) struct Hold<'a>(&'a Watchdog);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Watchdog {
    /// A watchdog with idle timeout `idle` (`None` or zero: never).
    pub(crate) fn new(idle: Option<Duration>) -> Self {
        Self {
            idle: idle.filter(|d| !d.is_zero()),
            conns: Mutex::new(Vec::new()),
            holds: AtomicUsize::new(0),
            stopped: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    /// Adds `conn` (at `endpoint`) to the connections watched.
    pub(crate) fn watch(&self, endpoint: Endpoint, conn: &Connection) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((endpoint, Arc::clone(conn.activity())));
    }

    /// Time until this is dropped is work, not idleness.
    pub(crate) fn hold(&self) -> Hold<'_> {
        self.holds.fetch_add(1, Ordering::AcqRel);
        Hold(self)
    }

    /// Ends [`Watchdog::run`].
    pub(crate) fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Sum of bytes moved, and the endpoint that has been blocked longest.
    fn sample(&self) -> (u64, Option<Endpoint>) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let total = conns.iter().map(|(_, a)| a.bytes()).sum();
        let longest = conns
            .iter()
            .filter_map(|(ep, a)| a.waiting_for().map(|w| (w, *ep)))
            .max_by_key(|(w, _)| *w)
            .map(|(_, ep)| ep);
        (total, longest)
    }

    /// The watchdog thread's body: samples until stopped or the migration
    /// aborted; fails it through `abort` when it stalled.
    pub(crate) fn run(&self, abort: &Abort<'_>) {
        let period = self
            .idle
            .map_or(MAX_PERIOD, |d| (d / 4).clamp(MIN_PERIOD, MAX_PERIOD));
        let mut last = self.sample().0;
        let mut since = Instant::now();
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *stopped || abort.is_aborted() {
                return;
            }
            stopped = self
                .cv
                .wait_timeout(stopped, period)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            let Some(idle) = self.idle else { continue };
            let (total, longest) = self.sample();
            if total != last || self.holds.load(Ordering::Acquire) > 0 {
                last = total;
                since = Instant::now();
                continue;
            }
            let quiet = since.elapsed();
            if quiet >= idle {
                drop(stopped);
                abort.fail(Error::Stalled {
                    endpoint: longest.unwrap_or(Endpoint::Main),
                    when: "on every connection (idle timeout)",
                    after_ms: quiet.as_millis() as u64,
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, Connection) {
        let (a, b) = UnixStream::pair().unwrap();
        (a, Connection::from_unix_for_tests(b))
    }

    #[test]
    fn a_silent_peer_fails_the_migration_naming_the_blocked_connection() {
        let abort = Abort::new();
        let dog = Watchdog::new(Some(Duration::from_millis(100)));
        let (_quiet_peer, mut quiet) = pair();
        let (_other_peer, other) = pair();
        dog.watch(Endpoint::Main, &other);
        dog.watch(Endpoint::Channel(2), &quiet);
        abort.register_socket(&quiet).unwrap();
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| dog.run(&abort));
            // Blocked in a read no deadline of its own would end: the
            // watchdog's abort shuts the socket down.
            let mut buf = [0u8; 1];
            let r = std::io::Read::read(&mut quiet, &mut buf);
            assert!(matches!(r, Ok(0) | Err(_)));
        });
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        // A sanity bound only: a loaded machine may be slow to wake.
        assert!(took < Duration::from_secs(10), "{took:?}");
        match abort.take_error() {
            Some(Error::Stalled {
                endpoint: Endpoint::Channel(2),
                after_ms,
                ..
            }) => assert!(after_ms >= 100),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bytes_moving_or_a_hold_keep_it_quiet_and_stop_ends_it() {
        let abort = Abort::new();
        // Bytes move every 50 ms for 2.5 times the limit, then a hold lasts
        // more than twice the limit: without either, the watchdog would fire.
        // A gap of 20 times the byte period is tolerated, for loaded machines.
        let idle = Duration::from_secs(1);
        let dog = Watchdog::new(Some(idle));
        let (mut peer, mut conn) = pair();
        dog.watch(Endpoint::Channel(0), &conn);
        std::thread::scope(|s| {
            s.spawn(|| dog.run(&abort));
            let started = Instant::now();
            while started.elapsed() < idle * 5 / 2 {
                peer.write_all(&[1]).unwrap();
                let mut b = [0u8; 1];
                std::io::Read::read_exact(&mut conn, &mut b).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            {
                let _work = dog.hold();
                std::thread::sleep(idle * 22 / 10);
            }
            dog.stop();
        });
        assert!(abort.take_error().is_none());
    }

    #[test]
    fn zero_means_never() {
        let abort = Abort::new();
        let dog = Watchdog::new(Some(Duration::ZERO));
        std::thread::scope(|s| {
            s.spawn(|| dog.run(&abort));
            std::thread::sleep(Duration::from_millis(50));
            dog.stop();
        });
        assert!(abort.take_error().is_none());
    }
}
