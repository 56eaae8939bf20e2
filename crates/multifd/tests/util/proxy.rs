//! A fault-injecting proxy between a real sender and a real receiver: it
//! forwards every connection and breaks one (or all) at a chosen point.

use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use multifd::Uri;
use multifd_wire::packet::{RAM_PACKET_HEADER_SIZE, RamPacketHeader};

use super::{Sock, Transport, spawn, tempdir};

/// Where the proxy breaks the migration. Connections are numbered in the
/// order the sender opens them: 0 is the main channel, 1.. the multifd
/// channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Forward everything.
    None,
    /// Close connection `conn` as soon as it is accepted.
    OnAccept { conn: usize },
    /// Close connection `conn` (both sides) after `byte` bytes of it.
    AtByte { conn: usize, byte: u64 },
    /// Close connection `conn` (a multifd channel) right after its `nth`
    /// SYNC packet (1-based).
    AfterSync { conn: usize, nth: usize },
    /// Forward the main channel except its last `hold_back` bytes, then
    /// close it (the migration breaks as it completes).
    MainTail { hold_back: usize },
    /// Close every connection once `total` bytes went through in all
    /// (the sender dies).
    All { total: u64 },
}

struct ProxyShared {
    socks: Mutex<Vec<Weak<Sock>>>,
    forwarded: AtomicU64,
    cut_done: AtomicBool,
    stop: AtomicBool,
}

impl ProxyShared {
    fn register(&self, s: &Arc<Sock>) {
        self.socks.lock().unwrap().push(Arc::downgrade(s));
    }
    fn kill_all(&self) {
        for w in self.socks.lock().unwrap().iter() {
            if let Some(s) = w.upgrade() {
                s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A forwarding proxy between a sender and a receiver that breaks one
/// connection (or all) at a chosen point. Cut connections are *closed*
/// (not only shut down), so the sender's next write fails.
pub struct Proxy {
    pub uri: Uri,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

enum PListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Proxy {
    /// Listens on `front` and forwards to `upstream`.
    pub fn start(front: Transport, upstream: Uri, cut: Cut) -> Self {
        let (listener, uri, dir) = match front {
            Transport::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let port = l.local_addr().unwrap().port();
                (
                    PListener::Tcp(l),
                    Uri::Tcp {
                        host: "127.0.0.1".into(),
                        port,
                    },
                    None,
                )
            }
            Transport::Unix => {
                let dir = tempdir();
                let path = dir.path().join("proxy.sock");
                let l = UnixListener::bind(&path).unwrap();
                (PListener::Unix(l), Uri::Unix(path), Some(dir))
            }
        };
        match &listener {
            PListener::Tcp(l) => l.set_nonblocking(true).unwrap(),
            PListener::Unix(l) => l.set_nonblocking(true).unwrap(),
        }
        let shared = Arc::new(ProxyShared {
            socks: Mutex::new(Vec::new()),
            forwarded: AtomicU64::new(0),
            cut_done: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = spawn("proxy", move || {
            let mut pumps = Vec::new();
            let mut n = 0usize;
            while !sh.stop.load(Ordering::Acquire) {
                let down = match &listener {
                    PListener::Tcp(l) => l.accept().map(|(s, _)| {
                        s.set_nonblocking(false).unwrap();
                        let _ = s.set_nodelay(true);
                        Sock::Tcp(s)
                    }),
                    PListener::Unix(l) => l.accept().map(|(s, _)| {
                        s.set_nonblocking(false).unwrap();
                        Sock::Unix(s)
                    }),
                };
                let down = match down {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(_) => break,
                };
                let i = n;
                n += 1;
                if cut == (Cut::OnAccept { conn: i }) {
                    sh.cut_done.store(true, Ordering::Release);
                    drop(down);
                    continue;
                }
                let Ok(up) = Sock::connect(&upstream) else {
                    drop(down);
                    continue;
                };
                let (down, up) = (Arc::new(down), Arc::new(up));
                sh.register(&down);
                sh.register(&up);
                if sh.stop.load(Ordering::Acquire) {
                    down.shutdown(Shutdown::Both);
                    up.shutdown(Shutdown::Both);
                }
                let sh2 = sh.clone();
                pumps.push(spawn("pump", move || pump(i, &down, &up, cut, &sh2)));
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Self {
            uri,
            shared,
            accept: Some(accept),
            _dir: dir,
        }
    }

    /// Whether the cut happened.
    pub fn cut_done(&self) -> bool {
        self.shared.cut_done.load(Ordering::Acquire)
    }

    /// Shuts every proxied connection down (a watchdog's last resort).
    pub fn kill_all(&self) {
        self.shared.kill_all();
    }

    /// Stops accepting, shuts everything down and joins all proxy threads
    /// (what dropping the proxy does).
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.kill_all();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Forwards `down` (from the sender) to `up` (to the receiver) and cuts as
/// told. Returning drops this pump's handles, which closes both sockets.
fn pump(i: usize, down: &Arc<Sock>, up: &Arc<Sock>, cut: Cut, sh: &ProxyShared) {
    let cut_here = |sh: &ProxyShared| {
        sh.cut_done.store(true, Ordering::Release);
        down.shutdown(Shutdown::Both);
        up.shutdown(Shutdown::Both);
    };
    match cut {
        Cut::AfterSync { conn, nth } if conn == i => {
            // Parse the channel: init packet, then header + payload packets.
            let mut init = [0u8; 64];
            if down.read_exact(&mut init).is_err() || up.write_all(&init).is_err() {
                return end(down, up);
            }
            sh.forwarded.fetch_add(64, Ordering::Relaxed);
            let mut syncs = 0;
            let mut hdr = vec![0u8; RAM_PACKET_HEADER_SIZE];
            loop {
                if down.read_exact(&mut hdr).is_err() || up.write_all(&hdr).is_err() {
                    return end(down, up);
                }
                let Ok(h) = RamPacketHeader::decode(&hdr) else {
                    plain(down, up, u64::MAX, sh);
                    return;
                };
                let mut payload = vec![0u8; h.next_packet_size as usize];
                if down.read_exact(&mut payload).is_err() || up.write_all(&payload).is_err() {
                    return end(down, up);
                }
                if h.is_sync() {
                    syncs += 1;
                    if syncs == nth {
                        return cut_here(sh);
                    }
                }
            }
        }
        Cut::AtByte { conn, byte } if conn == i => {
            if plain(down, up, byte, sh) {
                cut_here(sh);
            }
        }
        Cut::MainTail { hold_back } if i == 0 => {
            // Hold the last bytes back only at the very end: when the sender
            // pauses, forward them (the sender may be waiting for the
            // receiver, and holding data back mid-stream would model a
            // stalled peer, not one that dies as it completes).
            down.set_read_timeout(Some(Duration::from_millis(30)));
            let mut held: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match down.read(&mut buf) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if up.write_all(&held).is_err() {
                            return end(down, up);
                        }
                        held.clear();
                    }
                    Ok(0) => return cut_here(sh),
                    Ok(n) => {
                        held.extend_from_slice(&buf[..n]);
                        if held.len() > hold_back {
                            let k = held.len() - hold_back;
                            if up.write_all(&held[..k]).is_err() {
                                return end(down, up);
                            }
                            held.drain(..k);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return end(down, up),
                }
            }
        }
        Cut::All { total } => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match down.read(&mut buf) {
                    Ok(0) => {
                        up.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return end(down, up),
                };
                let before = sh.forwarded.fetch_add(n as u64, Ordering::AcqRel);
                let room = total.saturating_sub(before).min(n as u64) as usize;
                if up.write_all(&buf[..room]).is_err() {
                    return end(down, up);
                }
                if room < n {
                    sh.cut_done.store(true, Ordering::Release);
                    sh.kill_all();
                    return;
                }
            }
        }
        _ => {
            plain(down, up, u64::MAX, sh);
        }
    }
}

/// Forwards up to `limit` bytes; true when the limit was reached (the
/// caller cuts), false when the stream ended or failed first (handled).
fn plain(down: &Sock, up: &Sock, limit: u64, sh: &ProxyShared) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    loop {
        if done >= limit {
            return true;
        }
        let want = (limit - done).min(buf.len() as u64) as usize;
        match down.read(&mut buf[..want]) {
            Ok(0) => {
                up.shutdown(Shutdown::Write);
                return false;
            }
            Ok(n) => {
                if up.write_all(&buf[..n]).is_err() {
                    end(down, up);
                    return false;
                }
                done += n as u64;
                sh.forwarded.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                end(down, up);
                return false;
            }
        }
    }
}

fn end(down: &Sock, up: &Sock) {
    down.shutdown(Shutdown::Both);
    up.shutdown(Shutdown::Both);
}
