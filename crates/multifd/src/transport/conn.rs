//! One connected byte stream: a plain socket, or a TLS session over one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use super::activity::Activity;
use super::connect;
use super::iov::{IoSlice, IoSliceMut};
use super::socket::Socket;
use super::sys;
use super::tls::{ClientKind, ServerKind, TlsClient, TlsServer, alert_meaning, take_denied};
use super::uri::Uri;
use crate::error::{Endpoint, Error, Result};

/// Plaintext staged at once for a TLS write: six 16 KiB records per system
/// call. rustls allocates every record it encrypts and frees it once
/// written; with 1 MiB batches glibc gave each batch's memory back to the
/// kernel and faulted it in again for the next (page faults, clearing,
/// TLB shootdowns across the sending threads): 30% of the sender's CPU in
/// a 2 GiB migration (1.16 s, now 0.80 s). A batch below glibc's trim
/// threshold (128 KiB) keeps it, and its copy stays in the cache.
const TLS_STAGE: usize = 96 << 10;

/// The TLS session of a connection.
enum Session {
    Client(rustls::ClientConnection),
    Server(rustls::ServerConnection),
    #[cfg(feature = "tls-psk")]
    OpenSsl(openssl::ssl::SslStream<Socket>),
}

/// A TCP or Unix stream socket carrying one migration channel, in the
/// clear or over TLS.
pub struct Connection {
    sock: Socket,
    tls: Option<Box<Session>>,
    /// A TLS peer may end without close_notify (the main channel: QEMU
    /// sends none there); otherwise that is an error, not an end.
    relaxed_eof: bool,
    /// Plaintext bounce buffer of a TLS connection's vectored I/O.
    staging: Vec<u8>,
    activity: Arc<Activity>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("sock", &self.sock)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The error of a TLS handshake or session on `endpoint`.
fn tls_error(endpoint: Endpoint, reason: impl std::fmt::Display) -> Error {
    Error::Tls {
        endpoint,
        reason: reason.to_string(),
    }
}

/// Who is at the other end of a TLS session, for messages.
#[derive(Clone, Copy)]
enum Peer {
    /// We are the client (a migration source).
    Destination,
    /// We are the server (a migration destination).
    Source,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Destination => "the destination",
            Self::Source => "the source",
        })
    }
}

/// Says what a rustls error means for a migration.
fn explain_rustls(peer: Peer, e: &rustls::Error) -> String {
    use rustls::{CertificateError, Error as E};
    match e {
        E::AlertReceived(alert) => format!(
            "{peer} refused the TLS session: {} (it sent the alert {alert:?})",
            alert_meaning(*alert)
        ),
        E::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            match take_denied() {
                Some(dn) => format!("the client {dn:?} is not in the authorization list"),
                None => format!("{peer}'s certificate is not authorized"),
            }
        }
        E::NoCertificatesPresented => {
            format!("{peer} sent no client certificate, and client certificates are required")
        }
        E::InvalidCertificate(_) => format!("{peer}'s certificate: {e}"),
        _ => e.to_string(),
    }
}

/// Maps an I/O error out of a TLS handshake: a timeout is the handshake's,
/// a close or reset says the peer refused us (QEMU closes without an
/// alert), anything rustls or OpenSSL reports is a TLS error.
fn handshake_error(endpoint: Endpoint, peer: Peer, timeout: Duration, e: io::Error) -> Error {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return tls_error(endpoint, explain_rustls(peer, tls));
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::HandshakeTimeout {
            endpoint,
            timeout_ms: timeout.as_millis() as u64,
        },
        io::ErrorKind::InvalidData | io::ErrorKind::Other => tls_error(endpoint, e),
        _ => tls_error(
            endpoint,
            format!("{peer} ended the TLS handshake ({e}); it may have refused our credentials"),
        ),
    }
}

/// The error for a peer that closed a TLS connection right after the
/// handshake without an alert: how a QEMU peer refuses credentials (it
/// checks them after GnuTLS's handshake, and says why only in its log).
fn silent_refusal(endpoint: Endpoint, peer: Peer) -> Error {
    let why = match peer {
        Peer::Destination => {
            "a QEMU destination does this when it refuses our client certificate (none, \
             one from a CA it does not trust, or a name its authorization list does not \
             hold), and says why only in its own log; any destination when the migration \
             parameters differ (see its error)"
        }
        Peer::Source => {
            "a QEMU source does this when it refuses our certificate (one from a CA it \
             does not trust, or not naming the host it connected to or its tls-hostname), \
             and says why in its own error"
        }
    };
    tls_error(
        endpoint,
        format!(
            "{peer} closed the connection right after the TLS handshake, before sending \
             anything and without an alert: {why}"
        ),
    )
}

impl Connection {
    fn plain(sock: Socket) -> Self {
        Self {
            sock,
            tls: None,
            relaxed_eof: false,
            staging: Vec::new(),
            activity: Arc::default(),
        }
    }

    /// Connects to `uri`, retrying refused connections until `timeout` has
    /// passed (a receiver started a moment later still gets the migration).
    /// A peer that does not answer at all (a host dropping SYNs) fails with
    /// [`Error::ConnectTimeout`] once `timeout` has passed. When `wake`
    /// becomes readable (the abort path writes to it) the attempt ends at
    /// once with [`Error::Aborted`].
    pub fn connect(uri: &Uri, timeout: Duration, wake: Option<&dyn AsRawFd>) -> Result<Self> {
        connect::connect(uri, timeout, wake).map(Self::plain)
    }

    pub(super) fn from_tcp(s: TcpStream) -> io::Result<Self> {
        connect::tune_tcp(&s)?;
        Ok(Self::plain(Socket::Tcp(s)))
    }

    pub(super) fn from_unix(s: UnixStream) -> Self {
        Self::plain(Socket::Unix(s))
    }

    /// Bytes moved and blocking state, shared with the idle watchdog.
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Lets a TLS peer end this connection without close_notify (QEMU's
    /// main channel ends so).
    pub(crate) fn allow_eof_without_close_notify(&mut self) {
        self.relaxed_eof = true;
    }

    /// Runs a TLS handshake as the client, within `timeout`: the session
    /// is complete (our last flight written) when it returns, so a
    /// connection made after it is seen after it by the server. The
    /// server's certificate must match `uri`'s host (or the configured
    /// host name).
    pub(crate) fn start_tls_client(
        mut self,
        tls: &TlsClient,
        uri: &Uri,
        endpoint: Endpoint,
        timeout: Duration,
    ) -> Result<Self> {
        self.set_io_timeouts(Some(timeout))?;
        let session = match tls.kind() {
            ClientKind::X509(config) => {
                let host = match uri {
                    Uri::Tcp { host, .. } => host.as_str(),
                    Uri::Unix(_) => "localhost",
                };
                let name = tls.server_name(host)?;
                let mut conn = rustls::ClientConnection::new(Arc::clone(config), name)
                    .map_err(|e| tls_error(endpoint, e))?;
                while conn.is_handshaking() || conn.wants_write() {
                    conn.complete_io(&mut self.sock)
                        .map_err(|e| handshake_error(endpoint, Peer::Destination, timeout, e))?;
                }
                Session::Client(conn)
            }
            #[cfg(feature = "tls-psk")]
            ClientKind::Psk(ctx) => {
                let ssl = openssl::ssl::Ssl::new(&ctx.ctx).map_err(|e| tls_error(endpoint, e))?;
                let sock = self
                    .sock
                    .try_clone()
                    .map_err(|e| Error::io("duplicating a socket handle", e))?;
                let stream = ssl.connect(sock).map_err(|e| {
                    openssl_handshake_error(endpoint, Peer::Destination, timeout, e)
                })?;
                Session::OpenSsl(stream)
            }
        };
        self.finish_handshake(session)
    }

    /// Runs a TLS handshake as the server, within `timeout`, then checks
    /// the client's distinguished name against the authorization list.
    pub(crate) fn start_tls_server(
        mut self,
        tls: &TlsServer,
        endpoint: Endpoint,
        timeout: Duration,
    ) -> Result<Self> {
        self.set_io_timeouts(Some(timeout))?;
        let session = match tls.kind() {
            ServerKind::X509 { config, .. } => {
                // The authorization list is checked by the certificate
                // verifier, inside the handshake.
                let mut conn = rustls::ServerConnection::new(Arc::clone(config))
                    .map_err(|e| tls_error(endpoint, e))?;
                while conn.is_handshaking() || conn.wants_write() {
                    conn.complete_io(&mut self.sock)
                        .map_err(|e| handshake_error(endpoint, Peer::Source, timeout, e))?;
                }
                Session::Server(conn)
            }
            #[cfg(feature = "tls-psk")]
            ServerKind::Psk(ctx) => {
                let ssl = openssl::ssl::Ssl::new(&ctx.ctx).map_err(|e| tls_error(endpoint, e))?;
                let sock = self
                    .sock
                    .try_clone()
                    .map_err(|e| Error::io("duplicating a socket handle", e))?;
                let stream = ssl
                    .accept(sock)
                    .map_err(|e| openssl_handshake_error(endpoint, Peer::Source, timeout, e))?;
                Session::OpenSsl(stream)
            }
        };
        self.finish_handshake(session)
    }

    /// Whether the peer of this TLS connection has refused it since the
    /// handshake: over TLS 1.3 a client's handshake is complete before the
    /// server has checked the client's certificate, so a refusal (an alert,
    /// or from QEMU a bare close) arrives afterwards, on a connection a
    /// source never reads. Looks without waiting; `None`: nothing there (or
    /// not TLS).
    pub(crate) fn peer_refusal(&mut self, endpoint: Endpoint) -> Option<Error> {
        let peer = match self.tls.as_deref() {
            Some(Session::Client(_)) => Peer::Destination,
            Some(Session::Server(_)) => Peer::Source,
            #[cfg(feature = "tls-psk")]
            // A PSK peer refuses inside the handshake (the binder).
            Some(Session::OpenSsl(_)) => return None,
            None => return None,
        };
        let ready = sys::poll_readable(self.sock.as_raw_fd(), None, Some(Duration::ZERO)).ok()?;
        if ready != sys::Readiness::Ready {
            return None;
        }
        self.sock.set_nonblocking(true).ok()?;
        let found = match self.tls.as_deref_mut() {
            Some(Session::Client(conn)) => rustls_refusal(conn, &mut self.sock, endpoint, peer),
            Some(Session::Server(conn)) => rustls_refusal(conn, &mut self.sock, endpoint, peer),
            _ => None,
        };
        let _ = self.sock.set_nonblocking(false);
        found
    }

    /// The error for a TLS peer that ended the connection right after the
    /// handshake, before its first byte of data.
    pub(crate) fn closed_after_handshake(&self, endpoint: Endpoint) -> Option<Error> {
        match self.tls.as_deref() {
            Some(Session::Client(_)) => Some(silent_refusal(endpoint, Peer::Destination)),
            Some(Session::Server(_)) => Some(silent_refusal(endpoint, Peer::Source)),
            _ => None,
        }
    }

    fn finish_handshake(mut self, mut session: Session) -> Result<Self> {
        // Whole batches of records per write (measured: 2.6 GB/s instead
        // of 1.7 with the default 64 KiB limit).
        match &mut session {
            Session::Client(c) => c.set_buffer_limit(None),
            Session::Server(c) => c.set_buffer_limit(None),
            #[cfg(feature = "tls-psk")]
            Session::OpenSsl(_) => {}
        }
        self.tls = Some(Box::new(session));
        self.set_io_timeouts(None)?;
        Ok(self)
    }

    fn set_io_timeouts(&self, t: Option<Duration>) -> Result<()> {
        self.sock
            .set_read_timeout(t)
            .and_then(|()| self.sock.set_write_timeout(t))
            .map_err(|e| Error::io("setting the handshake timeout", e))
    }

    /// A second handle to the same socket, to shut it down or watch it
    /// from another thread. It carries no TLS session: reading or writing
    /// through it would bypass TLS.
    pub fn try_clone(&self) -> io::Result<Self> {
        let mut clone = Self::plain(self.sock.try_clone()?);
        clone.activity = Arc::clone(&self.activity);
        Ok(clone)
    }

    /// Shuts both directions down: blocked reads and writes on any handle
    /// of this socket return at once. Errors (already closed) are ignored.
    pub fn shutdown(&self) {
        self.sock.shutdown(Shutdown::Both);
    }

    /// Ends our sending direction (the peer reads EOF after our last
    /// byte); over TLS, close_notify goes first.
    pub fn shutdown_write(&mut self) {
        match self.tls.as_deref_mut() {
            Some(Session::Client(conn)) => rustls_close(conn, &mut self.sock),
            Some(Session::Server(conn)) => rustls_close(conn, &mut self.sock),
            #[cfg(feature = "tls-psk")]
            Some(Session::OpenSsl(stream)) => {
                let _ = stream.shutdown();
            }
            None => {}
        }
        self.sock.shutdown(Shutdown::Write);
    }

    /// Makes reads and writes return `WouldBlock` instead of waiting.
    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.sock.set_nonblocking(nonblocking)
    }

    /// Shuts the reading direction down: a read blocked on any handle of
    /// this socket returns end-of-file at once.
    pub(crate) fn shutdown_read(&self) {
        self.sock.shutdown(Shutdown::Read);
    }

    /// Sets (or clears) the timeout of blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Writes all bytes of `iovs` with as few system calls as possible
    /// (over TLS: copied into batches that are encrypted and sent whole).
    pub fn writev_all(&mut self, iovs: &mut [IoSlice<'_>]) -> io::Result<()> {
        if self.tls.is_none() {
            return sys::writev_all(self.as_raw_fd(), iovs, &self.activity);
        }
        let mut staging = std::mem::take(&mut self.staging);
        let mut result = Ok(());
        let mut iovs = iovs.iter().peekable();
        while iovs.peek().is_some() && result.is_ok() {
            staging.clear();
            while let Some(iov) =
                iovs.next_if(|v| staging.is_empty() || staging.len() + v.len() <= TLS_STAGE)
            {
                let at = staging.len();
                staging.resize(at + iov.len(), 0);
                iov.copy_to(&mut staging[at..]);
            }
            result = self.write_all(&staging);
        }
        self.staging = staging;
        result
    }

    /// Fills all of `iovs`. `Ok(false)`: the peer closed the connection
    /// cleanly before the first byte.
    pub fn readv_exact(&mut self, iovs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        if self.tls.is_none() {
            return sys::readv_exact(self.as_raw_fd(), iovs, &self.activity);
        }
        let relaxed = self.relaxed_eof;
        let activity = Arc::clone(&self.activity);
        match self.tls.as_deref_mut() {
            // Decrypted records are copied straight where they belong.
            Some(Session::Client(conn)) => {
                rustls_readv(conn, &mut self.sock, iovs, relaxed, &activity)
            }
            Some(Session::Server(conn)) => {
                rustls_readv(conn, &mut self.sock, iovs, relaxed, &activity)
            }
            _ => {
                let total: usize = iovs.iter().map(IoSliceMut::len).sum();
                let mut staging = std::mem::take(&mut self.staging);
                staging.resize(total, 0);
                let got = self.read_exact_or_eof_plain(&mut staging);
                if let Ok(true) = got {
                    let mut at = 0;
                    for iov in iovs.iter_mut() {
                        let n = iov.len();
                        iov.copy_from(&staging[at..at + n]);
                        at += n;
                    }
                }
                self.staging = staging;
                got
            }
        }
    }

    /// Fills `buf` through `Read`; `Ok(false)` on EOF before the first byte.
    fn read_exact_or_eof_plain(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.read(&mut buf[got..]) {
                Ok(0) if got == 0 && !buf.is_empty() => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
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

    /// Reads plaintext from the TLS session: `Ok(0)` at close_notify (or at
    /// a bare EOF where that is allowed).
    fn read_tls(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let relaxed = self.relaxed_eof;
        let no_close_notify = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection without TLS close_notify",
            )
        };
        match self.tls.as_deref_mut() {
            Some(Session::Client(conn)) => {
                rustls_read(conn, &mut self.sock, buf, relaxed, no_close_notify)
            }
            Some(Session::Server(conn)) => {
                rustls_read(conn, &mut self.sock, buf, relaxed, no_close_notify)
            }
            #[cfg(feature = "tls-psk")]
            Some(Session::OpenSsl(stream)) => match stream.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    let notified = stream
                        .get_shutdown()
                        .contains(openssl::ssl::ShutdownState::RECEIVED);
                    if notified || relaxed {
                        Ok(0)
                    } else {
                        Err(no_close_notify())
                    }
                }
                other => other,
            },
            None => self.sock.read(buf),
        }
    }

    /// Writes plaintext through the TLS session and flushes its records.
    fn write_tls(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            Some(Session::Client(conn)) => rustls_write(conn, &mut self.sock, buf),
            Some(Session::Server(conn)) => rustls_write(conn, &mut self.sock, buf),
            #[cfg(feature = "tls-psk")]
            Some(Session::OpenSsl(stream)) => {
                stream.write_all(buf)?;
                Ok(buf.len())
            }
            None => self.sock.write(buf),
        }
    }
}

/// Reads plaintext from a rustls session over `sock`; a bare EOF is an end
/// only when `relaxed`.
fn rustls_read<C, S>(
    conn: &mut C,
    sock: &mut Socket,
    buf: &mut [u8],
    relaxed: bool,
    no_close_notify: impl FnOnce() -> io::Error,
) -> io::Result<usize>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    match rustls::Stream::new(conn, sock).read(buf) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            if relaxed {
                Ok(0)
            } else {
                Err(no_close_notify())
            }
        }
        other => other,
    }
}

/// Reads what a rustls session's peer sent without waiting (the socket is
/// non-blocking): an alert is a refusal, and so is a bare close.
fn rustls_refusal<C, S>(
    conn: &mut C,
    sock: &mut Socket,
    endpoint: Endpoint,
    peer: Peer,
) -> Option<Error>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    // Bounded: a refusal is an alert of a few bytes; a peer that streams
    // data at us is not refusing (and not a migration peer either).
    for _ in 0..16 {
        match conn.read_tls(sock) {
            Ok(0) => return Some(silent_refusal(endpoint, peer)),
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    return Some(tls_error(endpoint, explain_rustls(peer, &e)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Some(tls_error(
                    endpoint,
                    format!("{peer} reset the connection right after the TLS handshake ({e})"),
                ));
            }
        }
    }
    None
}

/// Fills all of `iovs` with plaintext from a rustls session over `sock`,
/// copying each decrypted record from rustls's buffer straight into the
/// vectors (no bounce buffer). `Ok(false)`: the session ended cleanly
/// (close_notify, or a bare EOF where `relaxed`) before the first byte.
fn rustls_readv<C, S>(
    conn: &mut C,
    sock: &mut Socket,
    iovs: &mut [IoSliceMut<'_>],
    relaxed: bool,
    activity: &Activity,
) -> io::Result<bool>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let total: usize = iovs.iter().map(IoSliceMut::len).sum();
    let (mut done, mut i, mut at) = (0usize, 0usize, 0usize);
    while done < total {
        let mut reader = conn.reader();
        let chunk = match std::io::BufRead::fill_buf(&mut reader) {
            Ok([]) if done == 0 => return Ok(false),
            Ok([]) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // No plaintext buffered: read and decrypt more records.
                // (At EOF rustls notes it: the next look says how it ended.)
                loop {
                    match activity.waiting(|| conn.read_tls(sock)) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other.map(drop)?,
                    }
                }
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return if relaxed && done == 0 {
                    Ok(false)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without TLS close_notify",
                    ))
                };
            }
            Err(e) => return Err(e),
        };
        // Copy as much of this chunk as the vectors take.
        let mut used = 0;
        while used < chunk.len() && i < iovs.len() {
            let room = iovs[i].len() - at;
            let n = room.min(chunk.len() - used);
            iovs[i].copy_from_at(at, &chunk[used..used + n]);
            used += n;
            at += n;
            if at == iovs[i].len() {
                i += 1;
                at = 0;
            }
        }
        std::io::BufRead::consume(&mut reader, used);
        done += used;
        activity.moved(used);
    }
    Ok(true)
}

/// Encrypts `buf` and writes every record out.
fn rustls_write<C, S>(conn: &mut C, sock: &mut Socket, buf: &[u8]) -> io::Result<usize>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let mut stream = rustls::Stream::new(conn, sock);
    stream.write_all(buf)?;
    stream.flush()?;
    Ok(buf.len())
}

/// Sends close_notify and writes it out (best effort: the peer may be gone).
fn rustls_close<C, S>(conn: &mut C, sock: &mut Socket)
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    conn.send_close_notify();
    while conn.wants_write() {
        if conn.write_tls(sock).is_err() {
            break;
        }
    }
}

#[cfg(feature = "tls-psk")]
fn openssl_handshake_error<S>(
    endpoint: Endpoint,
    peer: Peer,
    timeout: Duration,
    e: openssl::ssl::HandshakeError<S>,
) -> Error {
    let timed_out = || Error::HandshakeTimeout {
        endpoint,
        timeout_ms: timeout.as_millis() as u64,
    };
    match e {
        openssl::ssl::HandshakeError::Failure(mid) => {
            let err = mid.into_error();
            if let Some(io) = err.io_error()
                && matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                )
            {
                return timed_out();
            }
            tls_error(endpoint, explain_openssl(peer, &err))
        }
        openssl::ssl::HandshakeError::WouldBlock(_) => timed_out(),
        openssl::ssl::HandshakeError::SetupFailure(e) => tls_error(endpoint, e),
    }
}

/// Says what an OpenSSL (PSK) handshake failure means for a migration.
#[cfg(feature = "tls-psk")]
fn explain_openssl(peer: Peer, err: &openssl::ssl::Error) -> String {
    let reasons: Vec<&str> = err
        .ssl_error()
        .map(|s| s.errors().iter().filter_map(|e| e.reason()).collect())
        .unwrap_or_default();
    let has = |what: &str| reasons.iter().any(|r| r.contains(what));
    if has("binder does not verify") {
        return format!(
            "{peer} uses another pre-shared key for its identity (the PSK binder does not verify)"
        );
    }
    if has("alert illegal parameter") || has("alert decrypt error") {
        return format!(
            "{peer} refused our pre-shared key (it sent a TLS alert: {})",
            reasons.join(", ")
        );
    }
    if has("alert") {
        return format!("{peer} refused the TLS session ({})", reasons.join(", "));
    }
    if err.code() == openssl::ssl::ErrorCode::SYSCALL && err.io_error().is_none() {
        // EOF in the handshake: a QEMU peer closes without an alert when
        // it does not know our identity or key.
        return format!(
            "{peer} ended the TLS handshake without an alert: a QEMU peer does this when \
             it refuses our pre-shared key or identity; its own log says why"
        );
    }
    if reasons.is_empty() {
        return err.to_string();
    }
    reasons.join(", ")
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let activity = Arc::clone(&self.activity);
        let n = activity.waiting(|| self.read_tls(buf))?;
        activity.moved(n);
        Ok(n)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let activity = Arc::clone(&self.activity);
        let n = activity.waiting(|| self.write_tls(buf))?;
        activity.moved(n);
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

    /// Credentials for one x509 session, server for `localhost`.
    fn pki(dir: &std::path::Path) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
        for (role, names) in [("server", vec!["localhost".to_owned()]), ("client", vec![])] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem()).unwrap();
        }
    }

    /// Both ends of a socket pair after an x509 handshake: (client, server).
    fn tls_pair() -> (Connection, Connection) {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let server = TlsServer::x509(dir.path(), true, None).unwrap();
        let client = TlsClient::x509(dir.path(), None).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let t = Duration::from_secs(5);
        let serving = std::thread::spawn(move || {
            Connection::from_unix(b)
                .start_tls_server(&server, Endpoint::Unclassified, t)
                .unwrap()
        });
        let uri = Uri::Unix("unused".into());
        let c = Connection::from_unix(a)
            .start_tls_client(&client, &uri, Endpoint::Main, t)
            .unwrap();
        (c, serving.join().unwrap())
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Reads `sizes` with one vectored read; returns the bytes, or how it ended.
    fn readv(conn: &mut Connection, sizes: &[usize]) -> io::Result<Option<Vec<u8>>> {
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let mut iovs: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        if !conn.readv_exact(&mut iovs)? {
            return Ok(None);
        }
        drop(iovs);
        Ok(Some(bufs.concat()))
    }

    #[test]
    fn tls_vectored_reads_span_records_and_tell_close_notify_from_a_bare_eof() {
        // Vectors that start and end inside records (16 KiB each) and
        // inside rustls's reads.
        let sizes = [1, 4095, 16384, 50_000, 3, 20_000];
        let total: usize = sizes.iter().sum();
        let data = pattern(total * 2);
        let (mut c, mut s) = tls_pair();
        c.write_all(&data[..total]).unwrap();
        c.writev_all(&mut [IoSlice::new(&data[total..])]).unwrap();
        assert_eq!(readv(&mut s, &sizes).unwrap().unwrap(), data[..total]);
        assert_eq!(readv(&mut s, &sizes).unwrap().unwrap(), data[total..]);
        // close_notify, then EOF: a clean end.
        c.shutdown_write();
        assert_eq!(readv(&mut s, &sizes).unwrap(), None);

        // A bare EOF between packets: an error, unless allowed.
        for relaxed in [false, true] {
            let (c, mut s) = tls_pair();
            if relaxed {
                s.allow_eof_without_close_notify();
            }
            drop(c);
            match readv(&mut s, &sizes) {
                Ok(None) => assert!(relaxed),
                Err(e) => {
                    assert!(!relaxed, "{e}");
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                }
                Ok(Some(_)) => panic!("data from nowhere"),
            }
        }
        // A bare EOF inside a packet: always an error.
        let (mut c, mut s) = tls_pair();
        s.allow_eof_without_close_notify();
        c.write_all(&data[..100]).unwrap();
        drop(c);
        let e = readv(&mut s, &sizes).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
