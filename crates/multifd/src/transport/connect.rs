//! Connecting: non-blocking, with a deadline, woken by the abort path, and
//! with what every engine TCP socket gets (no Nagle delay, keepalive, a
//! user timeout).

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, TcpKeepalive, Type};

use super::socket::Socket;
use super::sys::{self, Readiness};
use super::uri::Uri;
use crate::error::{Error, Result};

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

/// Sets what every engine TCP socket has: no Nagle delay (also before a
/// TLS handshake, whose last flight must not wait for an ACK), keepalive
/// and a user timeout, so a dead host is noticed.
pub(super) fn tune_tcp(s: &TcpStream) -> io::Result<()> {
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
    Connected(Socket),
    /// Nobody listens (yet), or its backlog is full: try again until the
    /// deadline.
    Refused(io::Error),
}

/// Why a connection attempt failed for good.
enum Failure {
    /// No answer before the deadline.
    TimedOut,
    /// The wake descriptor became readable.
    Woken,
    /// Anything else the OS said.
    Os(io::Error),
}

/// Connects to `uri`, retrying refused connections until `timeout` has
/// passed (a receiver started a moment later still gets the migration). A
/// peer that does not answer at all fails with [`Error::ConnectTimeout`]
/// once `timeout` has passed; when `wake` becomes readable the attempt
/// ends at once with [`Error::Aborted`].
pub(super) fn connect(uri: &Uri, timeout: Duration, wake: Option<&dyn AsRawFd>) -> Result<Socket> {
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
            Ok(Attempt::Connected(s)) => return Ok(s),
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
                let pause = Some(CONNECT_RETRY.min(left));
                match wake {
                    Some(w) => {
                        let seen = sys::poll_readable(w, None, pause)
                            .map_err(|e| Error::io("waiting to connect again", e))?;
                        if seen == Readiness::Ready {
                            return Err(Error::Aborted);
                        }
                    }
                    None => std::thread::sleep(CONNECT_RETRY.min(left)),
                }
            }
            Err(Failure::TimedOut) => return Err(timed_out()),
            Err(Failure::Woken) => return Err(Error::Aborted),
            Err(Failure::Os(e)) => return Err(Error::io(format!("connecting to {uri}"), e)),
        }
    }
}

/// One attempt at every address of `host:port` within `left`.
fn connect_tcp(
    host: &str,
    port: u16,
    left: Duration,
    wake: Option<RawFd>,
) -> std::result::Result<Attempt, Failure> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(Failure::Os)?
        .collect();
    let deadline = Instant::now() + left;
    let mut refused = None;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
    for addr in addrs {
        match connect_addr(addr, deadline, wake) {
            Ok(s) => {
                tune_tcp(&s).map_err(Failure::Os)?;
                return Ok(Attempt::Connected(Socket::Tcp(s)));
            }
            Err(Failure::Os(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused = Some(e);
            }
            Err(Failure::Os(e)) => last = e,
            Err(other) => return Err(other),
        }
    }
    match refused {
        Some(e) => Ok(Attempt::Refused(e)),
        None => Err(Failure::Os(last)),
    }
}

/// One attempt at a Unix socket. Non-blocking, so a listener whose backlog
/// is full (which would block a plain connect for as long as it stays
/// full) counts as refused for now and is retried until the deadline.
fn connect_unix(path: &Path) -> std::result::Result<Attempt, Failure> {
    let os = Failure::Os;
    let sock = socket2::Socket::new(Domain::UNIX, Type::STREAM, None).map_err(os)?;
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
    let stream: UnixStream = std::os::fd::OwnedFd::from(sock).into();
    Ok(Attempt::Connected(Socket::Unix(stream)))
}

/// A non-blocking connect to `addr`, waited for until `deadline` or `wake`.
fn connect_addr(
    addr: SocketAddr,
    deadline: Instant,
    wake: Option<RawFd>,
) -> std::result::Result<TcpStream, Failure> {
    let os = Failure::Os;
    let sock = socket2::Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(os)?;
    sock.set_nonblocking(true).map_err(os)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let left = deadline.saturating_duration_since(Instant::now());
            match sys::poll_writable(sock.as_raw_fd(), wake, Some(left)).map_err(os)? {
                Readiness::Timeout => return Err(Failure::TimedOut),
                Readiness::Woken => return Err(Failure::Woken),
                Readiness::Ready => {}
            }
            if let Some(e) = sock.take_error().map_err(os)? {
                return Err(os(e));
            }
        }
        Err(e) => return Err(os(e)),
    }
    // Retrying a refused loopback port in the ephemeral range can end in a
    // TCP simultaneous open with ourselves: a connection to no one.
    let local = sock.local_addr().map_err(os)?;
    if local.as_socket() == Some(addr) {
        return Err(os(io::ErrorKind::ConnectionRefused.into()));
    }
    sock.set_nonblocking(false).map_err(os)?;
    Ok(sock.into())
}
