//! Listening sockets with accept timeouts.

use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use super::conn::Connection;
use super::sys;
use super::uri::Uri;
use crate::error::{Error, Result};

#[derive(Debug)]
enum Inner {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A listening TCP or Unix socket. A Unix socket's file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
}

impl Listener {
    /// Listens on `uri`. A stale Unix socket file at the path is replaced.
    pub fn bind(uri: &Uri) -> Result<Self> {
        let ctx = || format!("listening on {uri}");
        let inner = match uri {
            Uri::Tcp { host, port } => {
                let addr = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| Error::io(ctx(), e))?
                    .next()
                    .ok_or_else(|| Error::Config(format!("{uri}: host has no address")))?;
                Inner::Tcp(TcpListener::bind(addr).map_err(|e| Error::io(ctx(), e))?)
            }
            Uri::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    let _ = std::fs::remove_file(path);
                }
                Inner::Unix(
                    UnixListener::bind(path).map_err(|e| Error::io(ctx(), e))?,
                    path.clone(),
                )
            }
        };
        Ok(Self { inner })
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_uri(&self) -> Result<Uri> {
        match &self.inner {
            Inner::Tcp(l) => {
                let a = l
                    .local_addr()
                    .map_err(|e| Error::io("reading listener address", e))?;
                Ok(Uri::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
            Inner::Unix(_, p) => Ok(Uri::Unix(p.clone())),
        }
    }

    /// Accepts one connection, waiting at most `timeout` (forever when
    /// `None`). `Ok(None)` means the time ran out.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Option<Connection>> {
        self.accept_or_wake(timeout, None)
    }

    /// Like [`Listener::accept`], but gives up with [`Error::Aborted`] as
    /// soon as `wake` becomes readable (the abort path writes to it).
    pub fn accept_or_wake(
        &self,
        timeout: Option<Duration>,
        wake: Option<&dyn AsRawFd>,
    ) -> Result<Option<Connection>> {
        let seen = sys::poll_readable(self.as_raw_fd(), wake.map(AsRawFd::as_raw_fd), timeout)
            .map_err(|e| Error::io("waiting for a connection", e))?;
        match seen {
            sys::Readiness::Timeout => return Ok(None),
            sys::Readiness::Woken => return Err(Error::Aborted),
            sys::Readiness::Ready => {}
        }
        let conn = match &self.inner {
            Inner::Tcp(l) => l.accept().and_then(|(s, _)| Connection::from_tcp(s)),
            Inner::Unix(l, _) => l.accept().map(|(s, _)| Connection::from_unix(s)),
        };
        conn.map(Some)
            .map_err(|e: io::Error| Error::io("accepting a connection", e))
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match &self.inner {
            Inner::Tcp(l) => l.as_raw_fd(),
            Inner::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Inner::Unix(_, path) = &self.inner {
            let _ = std::fs::remove_file(path);
        }
    }
}
