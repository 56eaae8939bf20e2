//! One connected byte stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::iov::{IoSlice, IoSliceMut};
use super::sys;
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
}

/// How long to wait between connection attempts while the listener is not up.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

impl Connection {
    /// Connects to `uri`, retrying refused connections until `timeout` has
    /// passed (a receiver started a moment later still gets the migration).
    pub fn connect(uri: &Uri, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = match uri {
                Uri::Tcp { host, port } => connect_tcp(host, *port),
                Uri::Unix(path) => UnixStream::connect(path).map(|s| Self {
                    stream: Stream::Unix(s),
                }),
            };
            match attempt {
                Ok(c) => return Ok(c),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                        ) =>
                {
                    std::thread::sleep(CONNECT_RETRY);
                }
                Err(e) => return Err(Error::io(format!("connecting to {uri}"), e)),
            }
        }
    }

    pub(super) fn from_tcp(s: TcpStream) -> io::Result<Self> {
        s.set_nodelay(true)?;
        Ok(Self {
            stream: Stream::Tcp(s),
        })
    }

    pub(super) fn from_unix(s: UnixStream) -> Self {
        Self {
            stream: Stream::Unix(s),
        }
    }

    /// A second handle to the same socket (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            stream: match &self.stream {
                Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
                Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            },
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

    /// Sets (or clears) the timeout of blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Writes all bytes of `iovs` with as few system calls as possible.
    pub fn writev_all(&mut self, iovs: &mut [IoSlice<'_>]) -> io::Result<()> {
        sys::writev_all(self.as_raw_fd(), iovs)
    }

    /// Fills all of `iovs`. `Ok(false)`: the peer closed the connection
    /// cleanly before the first byte.
    pub fn readv_exact(&mut self, iovs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        sys::readv_exact(self.as_raw_fd(), iovs)
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

fn connect_tcp(host: &str, port: u16) -> io::Result<Connection> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect(addr) {
            Ok(s) => return Connection::from_tcp(s),
            Err(e) => last = e,
        }
    }
    Err(last)
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
        match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
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
