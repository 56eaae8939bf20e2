//! One connected byte stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use super::activity::Activity;
use super::iov::{IoSlice, IoSliceMut};
use super::sys::{self, Readiness};
use super::uri::Uri;
use crate::error::{Error, Result};

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A TCP or Unix stream socket carrying one migration channel.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    activity: Arc<Activity>,
}

/// How long to wait between connection attempts while the listener is not up.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Keepalive on every TCP connection: an idle connection whose host died
/// is noticed after `KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL`
/// (25 s); a live but paused peer answers the probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;
/// `TCP_USER_TIMEOUT`: data that stays unacknowledged this long fails the
/// connection (a host that died while we were sending).
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets what every engine TCP socket has: no Nagle delay, keepalive and a
/// user timeout, so a dead host is noticed.
fn tune_tcp(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let sock = SockRef::from(s);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// How one connection attempt ended.
enum Attempt {
    Connected(Connection),
    /// Nobody listens (yet): try again until the deadline.
    Refused(io::Error),
}

impl Connection {
    /// Connects to `uri`, retrying refused connections until `timeout` has
    /// passed (a receiver started a moment later still gets the migration).
    /// A peer that does not answer at all (a host dropping SYNs) fails with
    /// [`Error::ConnectTimeout`] once `timeout` has passed. When `wake`
    /// becomes readable (the abort path writes to it) the attempt ends at
    /// once with [`Error::Aborted`].
    pub fn connect(uri: &Uri, timeout: Duration, wake: Option<&dyn AsRawFd>) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let wake = wake.map(AsRawFd::as_raw_fd);
        let timed_out = || Error::ConnectTimeout {
            address: uri.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = match uri {
                Uri::Tcp { host, port } => connect_tcp(host, *port, left, wake),
                Uri::Unix(path) => connect_unix(path),
            };
            match attempt {
                Ok(Attempt::Connected(c)) => return Ok(c),
                Ok(Attempt::Refused(e)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // A backlog that stayed full: nobody answered.
                        if e.kind() == io::ErrorKind::WouldBlock {
                            return Err(timed_out());
                        }
                        return Err(Error::io(format!("connecting to {uri}"), e));
                    }
                    // Sleep before the next attempt, unless woken.
                    if let Some(w) = wake {
                        let pause = Some(CONNECT_RETRY.min(left));
                        if sys::poll_readable(w, None, pause)
                            .map_err(|e| Error::io("waiting to connect again", e))?
                            == Readiness::Ready
                        {
                            return Err(Error::Aborted);
                        }
                    } else {
                        std::thread::sleep(CONNECT_RETRY.min(left));
                    }
                }
                Err(ConnectFailure::TimedOut) => return Err(timed_out()),
                Err(ConnectFailure::Woken) => return Err(Error::Aborted),
                Err(ConnectFailure::Os(e)) => {
                    return Err(Error::io(format!("connecting to {uri}"), e));
                }
            }
        }
    }

    pub(super) fn from_tcp(s: TcpStream) -> io::Result<Self> {
        tune_tcp(&s)?;
        Ok(Self {
            stream: Stream::Tcp(s),
            activity: Arc::default(),
        })
    }

    pub(super) fn from_unix(s: UnixStream) -> Self {
        Self {
            stream: Stream::Unix(s),
            activity: Arc::default(),
        }
    }

    /// Bytes moved and blocking state, shared with the idle watchdog.
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// A second handle to the same socket (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            stream: match &self.stream {
                Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
                Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            },
            activity: Arc::clone(&self.activity),
        })
    }

    /// Shuts both directions down: blocked reads and writes on any handle
    /// of this socket return at once. Errors (already closed) are ignored.
    pub fn shutdown(&self) {
        let _ = match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Ends our sending direction (the peer reads EOF after our last byte).
    pub fn shutdown_write(&self) {
        let _ = match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Makes reads and writes return `WouldBlock` instead of waiting.
    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// Shuts the reading direction down: a read blocked on any handle of
    /// this socket returns end-of-file at once.
    pub(crate) fn shutdown_read(&self) {
        let _ = match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// Sets (or clears) the timeout of blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Writes all bytes of `iovs` with as few system calls as possible.
    pub fn writev_all(&mut self, iovs: &mut [IoSlice<'_>]) -> io::Result<()> {
        sys::writev_all(self.as_raw_fd(), iovs, &self.activity)
    }

    /// Fills all of `iovs`. `Ok(false)`: the peer closed the connection
    /// cleanly before the first byte.
    pub fn readv_exact(&mut self, iovs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        sys::readv_exact(self.as_raw_fd(), iovs, &self.activity)
    }

    /// Fills `buf`. `Ok(false)`: clean EOF before the first byte.
    pub fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut iov = [IoSliceMut::new(buf)];
        self.readv_exact(&mut iov)
    }

    /// Reads at least `min` bytes into `buf` and more if they are already
    /// there, up to `buf.len()`; returns how many. `Ok(0)`: clean EOF before
    /// the first byte. Never waits for bytes beyond `min`, so a reader can
    /// ask for the largest thing that may come next without blocking on a
    /// smaller one (one system call per packet header instead of two).
    pub fn read_at_least(&mut self, buf: &mut [u8], min: usize) -> io::Result<usize> {
        debug_assert!(min <= buf.len());
        let mut got = 0;
        while got < min.max(1) {
            match self.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(0),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

/// Why a connection attempt failed for good.
enum ConnectFailure {
    /// No answer before the deadline.
    TimedOut,
    /// The wake descriptor became readable.
    Woken,
    /// Anything else the OS said.
    Os(io::Error),
}

/// One attempt at every address of `host:port` within `left`.
fn connect_tcp(
    host: &str,
    port: u16,
    left: Duration,
    wake: Option<RawFd>,
) -> std::result::Result<Attempt, ConnectFailure> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(ConnectFailure::Os)?
        .collect();
    let deadline = Instant::now() + left;
    let mut refused = None;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
    for addr in addrs {
        match connect_addr(addr, deadline, wake) {
            Ok(s) => {
                let conn = Connection::from_tcp(s).map_err(ConnectFailure::Os)?;
                return Ok(Attempt::Connected(conn));
            }
            Err(ConnectFailure::Os(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused = Some(e);
            }
            Err(ConnectFailure::Os(e)) => last = e,
            Err(other) => return Err(other),
        }
    }
    match refused {
        Some(e) => Ok(Attempt::Refused(e)),
        None => Err(ConnectFailure::Os(last)),
    }
}

/// One attempt at a Unix socket. Non-blocking, so a listener whose backlog
/// is full (which would block a plain connect for as long as it stays
/// full) counts as refused for now and is retried until the deadline.
fn connect_unix(path: &std::path::Path) -> std::result::Result<Attempt, ConnectFailure> {
    let os = ConnectFailure::Os;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(os)?;
    sock.set_nonblocking(true).map_err(os)?;
    let addr = socket2::SockAddr::unix(path).map_err(os)?;
    match sock.connect(&addr) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::NotFound
                    | io::ErrorKind::WouldBlock
            ) =>
        {
            return Ok(Attempt::Refused(e));
        }
        Err(e) => return Err(os(e)),
    }
    sock.set_nonblocking(false).map_err(os)?;
    Ok(Attempt::Connected(Connection::from_unix(
        std::os::fd::OwnedFd::from(sock).into(),
    )))
}

/// A non-blocking connect to `addr`, waited for until `deadline` or `wake`.
fn connect_addr(
    addr: SocketAddr,
    deadline: Instant,
    wake: Option<RawFd>,
) -> std::result::Result<TcpStream, ConnectFailure> {
    let os = ConnectFailure::Os;
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(os)?;
    sock.set_nonblocking(true).map_err(os)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let left = deadline.saturating_duration_since(Instant::now());
            match sys::poll_writable(sock.as_raw_fd(), wake, Some(left)).map_err(os)? {
                Readiness::Timeout => return Err(ConnectFailure::TimedOut),
                Readiness::Woken => return Err(ConnectFailure::Woken),
                Readiness::Ready => {}
            }
            if let Some(e) = sock.take_error().map_err(os)? {
                return Err(os(e));
            }
        }
        Err(e) => return Err(os(e)),
    }
    sock.set_nonblocking(false).map_err(os)?;
    Ok(sock.into())
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        match &self.stream {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.activity.waiting(|| match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        })?;
        self.activity.moved(n);
        Ok(n)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.activity.waiting(|| match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        })?;
        self.activity.moved(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Connection {
    /// Wraps one end of a socket pair (tests).
    pub(crate) fn from_unix_for_tests(s: UnixStream) -> Self {
        Self::from_unix(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, Connection) {
        let (a, b) = UnixStream::pair().unwrap();
        (a, Connection::from_unix_for_tests(b))
    }

    #[test]
    fn read_at_least_takes_what_is_there_without_waiting_for_more() {
        let (mut tx, mut rx) = pair();
        tx.write_all(&[7u8; 12]).unwrap();
        // Nothing more will come until we answer: the call must return
        // after the 12 bytes, not wait to fill the 1344-byte buffer.
        let mut buf = [0u8; 1344];
        assert_eq!(rx.read_at_least(&mut buf, 12).unwrap(), 12);
        tx.write_all(&[1u8; 100]).unwrap();
        assert_eq!(rx.read_at_least(&mut buf, 12).unwrap(), 100);
    }

    #[test]
    fn read_at_least_waits_for_the_minimum_and_reports_eof() {
        let (mut tx, mut rx) = pair();
        let writer = std::thread::spawn(move || {
            for chunk in [&[1u8; 5][..], &[2u8; 9][..]] {
                tx.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut buf = [0u8; 64];
        let got = rx.read_at_least(&mut buf, 12).unwrap();
        assert_eq!(got, 14);
        assert_eq!(&buf[..14], &[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
        writer.join().unwrap();
        // A close before the minimum: an error.
        let (mut tx, mut rx) = pair();
        tx.write_all(&[3u8; 3]).unwrap();
        drop(tx);
        let err = rx.read_at_least(&mut buf, 12).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // A close between packets is a clean end.
        let (tx, mut rx) = pair();
        drop(tx);
        assert_eq!(rx.read_at_least(&mut buf, 12).unwrap(), 0);
    }
}
