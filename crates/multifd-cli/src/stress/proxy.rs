//! A fault-injecting proxy between a real sender and a real receiver, on
//! loopback TCP or a Unix socket. Both directions are forwarded (a TLS
//! handshake needs the server's flights back); what the sender writes can
//! be corrupted, held back, stalled or cut at a chosen point, by plan or on
//! command. Connections are numbered in the order the sender opens them:
//! 0 is the main channel, 1.. the multifd channels.
//!
//! A cut is abortive towards the sender (`SO_LINGER` 0: a TCP reset, so its
//! next write fails at once instead of landing in a buffer) and a plain
//! close towards the receiver (it reads EOF where it was). When the receiver
//! closes a connection, the sender's side is reset the same way.
//!
//! Every loop polls with a short timeout and checks a stop flag, so
//! [`Proxy::finish`] ends everything in bounded time; it also says whether
//! every connection had ended by itself (both peers closed their sockets):
//! a connection still open after both sides returned is a half-open socket
//! one of them left behind.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use multifd::Uri;

/// How often blocked proxy loops look at their flags.
const TICK: Duration = Duration::from_millis(5);

/// A flag others can wait for, with a bound.
#[derive(Default)]
pub struct Flag {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Flag {
    pub fn set(&self) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        *self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until set, at most `limit`; whether it is set.
    pub fn wait(&self, limit: Duration) -> bool {
        let g = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, limit, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// Which loopback transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

/// A raw socket; reads, writes and shutdowns through a shared reference,
/// so one thread can end a socket another one is blocked on.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn connect(uri: &Uri) -> std::io::Result<Self> {
        match uri {
            Uri::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Ok(Self::Tcp(s))
            }
            Uri::Unix(p) => UnixStream::connect(p).map(Self::Unix),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }

    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => (&*s).read(buf),
            Self::Unix(s) => (&*s).read(buf),
        }
    }

    fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => (&*s).write_all(buf),
            Self::Unix(s) => (&*s).write_all(buf),
        }
    }

    /// Closing will reset the connection (TCP) instead of ending it.
    fn abortive_close(&self) {
        if let Self::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    /// Reads return after at most `TICK` (as `WouldBlock`), so a loop
    /// blocked in one looks at its flags.
    fn tick_reads(&self) {
        let _ = match self {
            Self::Tcp(s) => s.set_read_timeout(Some(TICK)),
            Self::Unix(s) => s.set_read_timeout(Some(TICK)),
        };
    }
}

/// Whether a read error only says that nothing came within `TICK`.
fn idle(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// What the proxy does to the connections, by plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Forward everything.
    Forward,
    /// Accept `from` connections, then close the listener: later
    /// connections are refused.
    Refuse { from: usize },
    /// Never accept: the listener's backlog is full, a connect gets no
    /// answer (TCP) or would block (Unix).
    Backlog,
    /// Accept connection `conn` but never answer or forward it (read and
    /// discard what it sends until it closes).
    Silent { conn: usize },
    /// XOR byte `at` of what connection `conn` sends with `xor`.
    Corrupt { conn: usize, at: u64, xor: u8 },
    /// Stop reading (and forwarding) connection `conn` after `at` bytes:
    /// the sender's writes block, the receiver waits mid-stream.
    HoldAt { conn: usize, at: u64 },
}

/// A command to one connection's sending direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    None,
    /// Cut once this many more bytes went through.
    After(u64),
    /// From now on, hold back the last this many bytes until more come.
    Hold(usize),
    /// Forward this many of the held-back bytes, then cut.
    Tail(usize),
    /// Stop holding ([`Plan::HoldAt`]): forward again.
    Release,
}

/// One proxied connection.
struct Link {
    /// The sockets, for [`Proxy::stop`]; the pumps hold them, and the last
    /// one to end closes them.
    down: Weak<Sock>,
    up: Option<Weak<Sock>>,
    /// Bytes read from the sender.
    sent: AtomicU64,
    /// When the sender last sent something (ns since the proxy started).
    last_ns: AtomicU64,
    cmd: Mutex<Cmd>,
    /// The receiver closed its side.
    up_closed: AtomicBool,
    /// Both directions have ended.
    ended: Flag,
}

struct Shared {
    links: Mutex<Vec<Arc<Link>>>,
    accepted: AtomicU64,
    stop: AtomicBool,
    born: Instant,
    /// The planned fault (or commanded cut) happened; for a cut, set once
    /// the connection's handles are closed (the sender's next write fails).
    pub fired: Flag,
    /// A commanded cut was made (set at once, before the handles close).
    cut: Flag,
    /// The connection a `Silent`/`HoldAt` plan names is being held.
    pub holding: Flag,
}

impl Shared {
    fn link(&self, i: usize) -> Option<Arc<Link>> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .cloned()
    }
}

enum Front {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Socket(#[allow(dead_code)] socket2::Socket),
}

impl Front {
    fn accept(&self) -> std::io::Result<Sock> {
        match self {
            Self::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Sock::Tcp(s))
            }),
            Self::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Sock::Unix(s))
            }),
            Self::Socket(_) => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A running proxy.
pub struct Proxy {
    /// Where the sender connects.
    pub uri: Uri,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
    /// Connections filling a full backlog ([`Plan::Backlog`]).
    _fill: Vec<socket2::Socket>,
    _dir: Option<tempfile::TempDir>,
}

impl Proxy {
    /// Listens on `transport` and forwards to `upstream`, applying `plan`.
    pub fn start(transport: Transport, upstream: Uri, plan: Plan) -> Result<Self> {
        let (front, uri, dir, fill) = listen(transport, plan == Plan::Backlog)?;
        let shared = Arc::new(Shared {
            links: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            born: Instant::now(),
            fired: Flag::default(),
            cut: Flag::default(),
            holding: Flag::default(),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("stress-proxy".into())
            .spawn(move || accept_loop(front, &upstream, plan, &sh))
            .context("spawning the proxy thread")?;
        Ok(Self {
            uri,
            shared,
            accept: Some(accept),
            _fill: fill,
            _dir: dir,
        })
    }

    /// Whether the planned fault (or a commanded cut) happened.
    pub fn fired(&self) -> &Flag {
        &self.shared.fired
    }

    /// Whether the planned fault was put in: [`Proxy::fired`], or a cut
    /// made whose handles may still be closing (a run that the cut ended
    /// can be judged before they are).
    pub fn reached(&self) -> bool {
        self.shared.fired.is_set() || self.shared.cut.is_set()
    }

    /// Set once the connection a `Silent` or `HoldAt` plan names is held.
    pub fn holding(&self) -> &Flag {
        &self.shared.holding
    }

    /// Waits until connection `conn` exists and the sender has sent nothing
    /// on it for `quiet` (it wrote all it had), at most `limit`.
    pub fn wait_quiet(&self, conn: usize, quiet: Duration, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.shared.link(conn) {
                let now = self.shared.born.elapsed().as_nanos() as u64;
                let last = l.last_ns.load(Ordering::Acquire);
                if l.sent.load(Ordering::Acquire) > 0
                    && now.saturating_sub(last) >= quiet.as_nanos() as u64
                {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(TICK);
        }
    }

    /// Cuts connection `conn` once `bytes` more bytes of the sender's went
    /// through.
    pub fn cut_after(&self, conn: usize, bytes: u64) {
        if let Some(l) = self.shared.link(conn) {
            *l.cmd.lock().unwrap_or_else(|p| p.into_inner()) = Cmd::After(bytes);
        }
    }

    /// From now on, holds back the last `keep` bytes connection `conn`
    /// sent until more come: when it goes quiet, the end of its last
    /// packet is here (see [`Proxy::cut_tail`]).
    pub fn hold_tail(&self, conn: usize, keep: usize) {
        if let Some(l) = self.shared.link(conn) {
            *l.cmd.lock().unwrap_or_else(|p| p.into_inner()) = Cmd::Hold(keep);
        }
    }

    /// Ends the stall of a [`Plan::HoldAt`]: the connection forwards again.
    pub fn release(&self, conn: usize) {
        if let Some(l) = self.shared.link(conn) {
            *l.cmd.lock().unwrap_or_else(|p| p.into_inner()) = Cmd::Release;
        }
    }

    /// Forwards `n` of the bytes held back on connection `conn` (see
    /// [`Proxy::hold_tail`]), then cuts it.
    pub fn cut_tail(&self, conn: usize, n: usize) {
        if let Some(l) = self.shared.link(conn) {
            *l.cmd.lock().unwrap_or_else(|p| p.into_inner()) = Cmd::Tail(n);
        }
    }

    /// Waits until the proxy has taken `n` connections (forwarded them,
    /// or reset them when the receiver was gone), at most `limit`;
    /// whether it has.
    pub fn wait_accepted(&self, n: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.shared.accepted.load(Ordering::Acquire) < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The connections accepted so far.
    fn links(&self) -> Vec<Arc<Link>> {
        self.shared
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until every forwarded connection accepted so far has ended,
    /// at most `limit`; whether they all have. (A `Silent` one ends only
    /// when the sender closes it.)
    pub fn wait_all_ended(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let links = self.links();
        let ok = links.iter().filter(|l| l.up.is_some()).all(|l| {
            l.ended
                .wait(deadline.saturating_duration_since(Instant::now()))
        });
        if std::env::var_os("MULTIFD_STRESS_DEBUG").is_some() {
            for (i, l) in links.iter().enumerate() {
                eprintln!(
                    "  link {i}: sent {} up_closed {} ended {} down {} up {}",
                    l.sent.load(Ordering::Acquire),
                    l.up_closed.load(Ordering::Acquire),
                    l.ended.is_set(),
                    l.down.strong_count(),
                    l.up.as_ref().map_or(0, Weak::strong_count),
                );
            }
        }
        ok
    }

    /// Gives the connections `grace` to end by themselves, then stops and
    /// joins everything. Returns how many connections were still open
    /// after the grace (half-open sockets someone left behind).
    pub fn finish(mut self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let links = self.links();
        let open = links
            .iter()
            .filter(|l| {
                !l.ended
                    .wait(deadline.saturating_duration_since(Instant::now()))
            })
            .count();
        drop(links);
        self.stop();
        open
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for l in self
            .shared
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if let Some(d) = l.down.upgrade() {
                d.shutdown(Shutdown::Both);
            }
            if let Some(u) = l.up.as_ref().and_then(Weak::upgrade) {
                u.shutdown(Shutdown::Both);
            }
        }
        if let Some(h) = self.accept.take()
            && let Ok(pumps) = h.join()
        {
            for p in pumps {
                let _ = p.join();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

type Listening = (Front, Uri, Option<tempfile::TempDir>, Vec<socket2::Socket>);

fn listen(transport: Transport, full: bool) -> Result<Listening> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let (domain, addr, uri, dir) = match transport {
        Transport::Tcp => {
            let a: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
            (Domain::IPV4, SockAddr::from(a), None, None)
        }
        Transport::Unix => {
            let dir = tempfile::Builder::new()
                .prefix("multifd-stress")
                .tempdir()
                .context("creating a socket directory")?;
            let path = dir.path().join("proxy.sock");
            (
                Domain::UNIX,
                SockAddr::unix(&path).context("socket path")?,
                Some(Uri::Unix(path)),
                Some(dir),
            )
        }
    };
    let sock = Socket::new(domain, Type::STREAM, None).context("proxy socket")?;
    sock.bind(&addr).context("binding the proxy")?;
    sock.listen(if full { 0 } else { 128 })
        .context("listening")?;
    let local = sock.local_addr().context("proxy address")?;
    let uri = match uri {
        Some(u) => u,
        None => Uri::Tcp {
            host: "127.0.0.1".into(),
            port: local.as_socket().map_or(0, |a| a.port()),
        },
    };
    if full {
        // Fill the backlog: further connects get no answer (TCP drops
        // the SYN) or would block (Unix).
        let mut fill = Vec::new();
        for _ in 0..4 {
            let s = Socket::new(domain, Type::STREAM, None).context("filler socket")?;
            s.set_nonblocking(true).context("filler socket")?;
            let _ = s.connect(&local);
            fill.push(s);
        }
        return Ok((Front::Socket(sock), uri, dir, fill));
    }
    sock.set_nonblocking(true).context("proxy socket")?;
    let front = match transport {
        Transport::Tcp => Front::Tcp(sock.into()),
        Transport::Unix => {
            let path = match &uri {
                Uri::Unix(p) => p.clone(),
                Uri::Tcp { .. } => unreachable!("a Unix front has a path"),
            };
            Front::Unix(sock.into(), path)
        }
    };
    Ok((front, uri, dir, Vec::new()))
}

fn accept_loop(front: Front, upstream: &Uri, plan: Plan, sh: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let mut pumps = Vec::new();
    if plan == Plan::Backlog {
        sh.fired.set();
    }
    let mut front = Some(front);
    let mut n = 0usize;
    while !sh.stop.load(Ordering::Acquire) {
        let Some(f) = &front else {
            std::thread::sleep(TICK);
            continue;
        };
        if plan == (Plan::Refuse { from: n }) {
            // Later connections are refused (TCP) or find no socket (Unix).
            front = None;
            sh.fired.set();
            continue;
        }
        let down = match f.accept() {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => break,
        };
        let i = n;
        n += 1;
        down.abortive_close();
        down.tick_reads();
        let silent = plan == (Plan::Silent { conn: i });
        let up = if silent {
            None
        } else {
            match Sock::connect(upstream) {
                Ok(u) => {
                    u.tick_reads();
                    Some(Arc::new(u))
                }
                // The receiver is gone: reset the sender's connection.
                Err(_) => {
                    drop(down);
                    sh.accepted.fetch_add(1, Ordering::AcqRel);
                    continue;
                }
            }
        };
        let down = Arc::new(down);
        let link = Arc::new(Link {
            down: Arc::downgrade(&down),
            up: up.as_ref().map(Arc::downgrade),
            sent: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            cmd: Mutex::new(Cmd::None),
            up_closed: AtomicBool::new(false),
            ended: Flag::default(),
        });
        sh.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(link.clone());
        sh.accepted.fetch_add(1, Ordering::AcqRel);
        if std::env::var_os("MULTIFD_STRESS_DEBUG").is_some() {
            eprintln!("  proxy accepted {i}");
        }
        if silent {
            sh.holding.set();
            sh.fired.set();
        }
        let back = up.clone().map(|up| {
            let (sh3, l3, down3) = (sh.clone(), link.clone(), down.clone());
            std::thread::Builder::new()
                .name("stress-pump".into())
                .spawn(move || pump_back(&up, &down3, &l3, &sh3))
        });
        let (sh2, l2) = (sh.clone(), link.clone());
        let fwd = std::thread::Builder::new()
            .name("stress-pump".into())
            .spawn(move || {
                let cut = pump(i, &down, up.as_deref(), &l2, plan, &sh2);
                if cut {
                    sh2.cut.set();
                }
                // Wait for the other direction; then the last handles
                // close (a reset towards the sender).
                if let Some(Ok(b)) = back {
                    let _ = b.join();
                }
                drop((down, up));
                l2.ended.set();
                if cut {
                    // Only now: the sender's next write fails for sure.
                    sh2.fired.set();
                }
            });
        match fwd {
            Ok(h) => pumps.push(h),
            Err(_) => link.ended.set(),
        }
    }
    pumps
}

/// Receiver to sender: plain forwarding. When the receiver closes, the
/// sender's connection is reset (through the forward pump).
fn pump_back(up: &Sock, down: &Sock, l: &Link, sh: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    while !sh.stop.load(Ordering::Acquire) {
        match up.read(&mut buf) {
            Err(e) if idle(&e) => {}
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if down.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    l.up_closed.store(true, Ordering::Release);
}

/// Sender to receiver, with the fault. Returns whether it cut the
/// connection.
fn pump(i: usize, down: &Sock, up: Option<&Sock>, l: &Link, plan: Plan, sh: &Shared) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut held: Vec<u8> = Vec::new();
    let mut keep = 0;
    let mut hold_at = match plan {
        Plan::HoldAt { conn, at } if conn == i => Some(at),
        _ => None,
    };
    let silent = up.is_none();
    let mut total = 0u64;
    let mut cut_at: Option<u64> = None;
    let cut = |held_part: &[u8]| {
        if let Some(up) = up {
            let _ = up.write_all(held_part);
            up.shutdown(Shutdown::Both);
        }
        down.shutdown(Shutdown::Both);
        true
    };
    loop {
        if sh.stop.load(Ordering::Acquire) {
            break;
        }
        match std::mem::replace(
            &mut *l.cmd.lock().unwrap_or_else(|p| p.into_inner()),
            Cmd::None,
        ) {
            Cmd::None => {}
            Cmd::After(n) => cut_at = Some(total + n),
            Cmd::Hold(n) => keep = n,
            Cmd::Release => hold_at = None,
            Cmd::Tail(n) => {
                let n = n.min(held.len());
                return cut(&held[..n]);
            }
        }
        if l.up_closed.load(Ordering::Acquire) {
            // The receiver hung up: the sender's connection is reset when
            // this link's sockets close.
            break;
        }
        let holding = hold_at.is_some_and(|at| total >= at);
        if holding && !sh.holding.is_set() {
            sh.holding.set();
            sh.fired.set();
        }
        if holding {
            // Read nothing more: the link ends when the receiver closes
            // (or the proxy stops).
            std::thread::sleep(TICK);
            continue;
        }
        let mut want = buf.len() as u64;
        if let Some(at) = cut_at {
            want = want.min(at.saturating_sub(total));
        }
        if let Some(at) = hold_at {
            want = want.min(at.saturating_sub(total));
        }
        let n = match down.read(&mut buf[..want.max(1) as usize]) {
            Ok(0) => {
                if let Some(up) = up {
                    let _ = up.write_all(&held);
                    up.shutdown(Shutdown::Write);
                }
                // The receiver ends its side when it is done.
                return false;
            }
            Ok(n) => n,
            Err(e) if idle(&e) => continue,
            Err(_) => break,
        };
        if let Plan::Corrupt { conn, at, xor } = plan
            && conn == i
            && (total..total + n as u64).contains(&at)
        {
            buf[(at - total) as usize] ^= xor;
            sh.fired.set();
        }
        total += n as u64;
        l.sent.store(total, Ordering::Release);
        l.last_ns
            .store(sh.born.elapsed().as_nanos() as u64, Ordering::Release);
        if silent {
            continue;
        }
        held.extend_from_slice(&buf[..n]);
        let forward = held.len().saturating_sub(keep);
        if forward > 0 {
            let ok = up.is_some_and(|up| up.write_all(&held[..forward]).is_ok());
            held.drain(..forward);
            if !ok {
                break;
            }
        }
        if cut_at.is_some_and(|at| total >= at) {
            return cut(&held);
        }
    }
    if let Some(up) = up {
        up.shutdown(Shutdown::Both);
    }
    down.shutdown(Shutdown::Both);
    false
}
