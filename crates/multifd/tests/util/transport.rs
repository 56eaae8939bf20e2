//! Loopback endpoints: the two transports every case runs on, a bound
//! engine listener for each, and the raw client socket that scripted peers
//! and the proxy write hand-made bytes through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use multifd::{Listener, Uri};

/// Which loopback transport a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

pub const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Unix];

static SOCK_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A directory for Unix sockets and RAM files, removed at exit of the test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("multifd-test")
        .tempdir()
        .expect("tempdir")
}

/// A bound engine listener and the URI to reach it.
pub struct Bound {
    pub listener: Listener,
    pub uri: Uri,
    /// Keeps a Unix socket's directory alive.
    pub dir: Option<tempfile::TempDir>,
}

/// Binds `tcp:127.0.0.1:0` or a Unix socket in a fresh temp dir.
pub fn bind(t: Transport) -> Bound {
    match t {
        Transport::Tcp => {
            let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
            let uri = listener.local_uri().unwrap();
            Bound {
                listener,
                uri,
                dir: None,
            }
        }
        Transport::Unix => {
            let dir = tempdir();
            let n = SOCK_SEQ.fetch_add(1, Ordering::Relaxed);
            let uri = Uri::Unix(dir.path().join(format!("s{n}.sock")));
            let listener = Listener::bind(&uri).unwrap();
            Bound {
                listener,
                uri,
                dir: Some(dir),
            }
        }
    }
}

/// A raw socket of a scripted peer or of the proxy. Reads, writes and
/// shutdowns go through a shared reference, so one thread can shut down a
/// socket another one is blocked on.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn connect(uri: &Uri) -> std::io::Result<Self> {
        match uri {
            Uri::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Ok(Self::Tcp(s))
            }
            Uri::Unix(p) => UnixStream::connect(p).map(Self::Unix),
        }
    }

    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        };
    }

    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => (&*s).read(buf),
            Self::Unix(s) => (&*s).read(buf),
        }
    }

    pub fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => (&*s).write_all(buf),
            Self::Unix(s) => (&*s).write_all(buf),
        }
    }

    /// Fills `buf`; `UnexpectedEof` if the stream ends first.
    pub fn read_exact(&self, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.read(buf) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until the other side closes (or `limit` passes); true on EOF.
    pub fn wait_closed(&self, limit: Duration) -> bool {
        self.set_read_timeout(Some(limit));
        let mut buf = [0u8; 4096];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    );
                }
            }
        }
    }
}
