//! Shared helpers of the integration tests: leak checks (threads, file
//! descriptors), listeners on loopback TCP and Unix sockets, RAM providers,
//! hand-made wire bytes, a receiver run on a watched thread, and a fault
//! injecting proxy that sits between a real sender and a real receiver.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd::SourceVm;
use multifd::{Compression, Error, MigrationConfig, Progress};
use multifd::{GuestRam, RamBlock};
use multifd::{Incoming, RamProvider, ReceiveOptions};
use multifd::{Listener, Uri};
use multifd_wire::packet::{InitPacket, RAM_PACKET_HEADER_SIZE, RamPacketEncoder, RamPacketHeader};
use multifd_wire::stream::{Configuration, RamBlockInfo, encode};
use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

/// Every bound asserted by the tests: an error must surface within this.
pub const FAST: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Serialisation and leak checks

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary, so that thread and fd counts of the
/// process only move because of the test holding the guard. Declare the
/// guard first in a test so it is dropped last.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names (`comm`) of the threads of this process.
pub fn thread_names() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push(comm.trim_end().to_owned());
        }
    }
    out
}

/// Number of threads of this process (entries of /proc/self/task).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open file descriptors of this process, with what they point at.
pub fn fds() -> BTreeSet<(i32, String)> {
    let mut out = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            // The directory handle of this very listing.
            if target.starts_with("/proc/") && target.ends_with("/fd") {
                continue;
            }
            out.insert((n, target));
        }
    }
    out
}

/// Threads the engine names (`multifd-send-N`, `multifd-recv-N`) or the
/// tests' own helpers (`hp-...`) that are still alive.
pub fn helper_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|n| n.starts_with("multifd-") || n.starts_with("hp-"))
        .collect()
}

/// Thread and fd counts taken before a case.
#[derive(Debug)]
pub struct Baseline {
    threads: usize,
    fds: BTreeSet<(i32, String)>,
}

impl Baseline {
    /// Takes the baseline. Waits a moment first, so the test that held the
    /// serial guard before has finished and the harness has started its
    /// next thread (the harness spawns one only when a test ends).
    pub fn take() -> Self {
        std::thread::sleep(Duration::from_millis(25));
        Self {
            threads: thread_count(),
            fds: fds(),
        }
    }

    /// Asserts no engine or helper thread is alive and the thread and fd
    /// counts are back at the baseline. The engine joins its threads and
    /// closes its sockets before it returns, so nothing should need time;
    /// a short grace period only absorbs the test harness's own threads.
    pub fn check(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let helpers = helper_threads();
            let threads = thread_count();
            let now = fds();
            let extra_fds: Vec<_> = now.difference(&self.fds).cloned().collect();
            let fd_ok = now.len() <= self.fds.len() && extra_fds.is_empty();
            if helpers.is_empty() && threads <= self.threads && fd_ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: resources left behind: helper/engine threads {helpers:?}, \
                     threads {threads} (baseline {}), all threads {:?}, \
                     fds {} (baseline {}), new fds {extra_fds:?}",
                    self.threads,
                    thread_names(),
                    now.len(),
                    self.fds.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Spawns a named helper thread (names start with `hp-`).
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(format!("hp-{name}"))
        .spawn(f)
        .expect("spawning a helper thread")
}

// ---------------------------------------------------------------------------
// Listeners

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

// ---------------------------------------------------------------------------
// RAM

/// Gives anonymous, zero-filled blocks for whatever the source announces.
#[derive(Debug, Default)]
pub struct AnonRam;

impl RamProvider for AnonRam {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
        }
        Ok(ram)
    }
}

/// Gives blocks backed by (shared-mapped) files in a directory, so a test
/// can inspect what was written into guest RAM after a failed migration
/// dropped the mapping. Only announced blocks of `expect` are accepted.
#[derive(Debug)]
pub struct FileRam {
    pub dir: PathBuf,
}

impl FileRam {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ram"))
    }

    /// The whole contents of block `name` as it is now.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("block file")
    }
}

impl RamProvider for FileRam {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::create_file(
                &b.idstr,
                &self.path(&b.idstr),
                b.used_length,
            )?)?;
        }
        Ok(ram)
    }
}

/// Deterministic page contents: every third page zero, the rest patterned.
pub fn pattern_page(page: u64, seed: u64) -> Option<[u8; PAGE_SIZE]> {
    if (page + seed).is_multiple_of(3) {
        return None;
    }
    let mut p = [0u8; PAGE_SIZE];
    let mut x =
        page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1;
    for chunk in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    Some(p)
}

/// Anonymous block with every page non-zero (cheap fill: the sender must
/// move real payload, so socket buffers fill up).
pub fn dense_block(name: &str, pages: u64) -> RamBlock {
    let b = RamBlock::anonymous(name, pages * PAGE_SIZE_U64).unwrap();
    let mut data = [0u8; PAGE_SIZE];
    for p in 0..pages {
        data[..8].copy_from_slice(&p.to_le_bytes());
        data[8..].fill((p as u8) | 1);
        b.write_page(p * PAGE_SIZE_U64, &data).unwrap();
    }
    b
}

/// Source RAM: anonymous blocks filled with [`pattern_page`], except
/// blocks whose name starts with `zero`, which stay all zero.
pub fn source_ram(blocks: &[(&str, u64)], seed: u64) -> GuestRam {
    let mut ram = GuestRam::new();
    for (i, &(name, pages)) in blocks.iter().enumerate() {
        let b = RamBlock::anonymous(name, pages * PAGE_SIZE_U64).unwrap();
        let fill = if name.starts_with("zero") { 0 } else { pages };
        for p in 0..fill {
            if let Some(data) = pattern_page(p, seed + i as u64 * 1000) {
                b.write_page(p * PAGE_SIZE_U64, &data).unwrap();
            }
        }
        ram.push(b).unwrap();
    }
    ram
}

/// Compares two RAMs page by page; describes the first difference.
pub fn ram_diff(a: &GuestRam, b: &GuestRam) -> Option<String> {
    if a.blocks().len() != b.blocks().len() {
        return Some(format!(
            "{} vs {} blocks",
            a.blocks().len(),
            b.blocks().len()
        ));
    }
    let mut pa = [0u8; PAGE_SIZE];
    let mut pb = [0u8; PAGE_SIZE];
    for (x, y) in a.blocks().iter().zip(b.blocks()) {
        if x.name() != y.name() || x.len() != y.len() {
            return Some(format!(
                "block {:?}/{} vs {:?}/{}",
                x.name(),
                x.len(),
                y.name(),
                y.len()
            ));
        }
        let mut bad = 0u64;
        let mut first = None;
        for p in 0..x.pages() {
            x.read_page(p * PAGE_SIZE_U64, &mut pa).unwrap();
            y.read_page(p * PAGE_SIZE_U64, &mut pb).unwrap();
            if pa != pb {
                bad += 1;
                first.get_or_insert(p);
            }
        }
        if let Some(first) = first {
            return Some(format!(
                "block {:?}: {bad} of {} pages differ, first at page {first}",
                x.name(),
                x.pages()
            ));
        }
    }
    None
}

/// A source whose guest writes some pages between rounds (and once more
/// after the pause), and reports them dirty: the migration then has several
/// rounds and SYNC points, and the receiver must end with the final state.
#[derive(Debug)]
pub struct Dirtier {
    pub calls: u64,
    pub seed: u64,
    /// Pages written per call.
    pub per_call: u64,
    /// Stop dirtying after this many calls (`u64::MAX`: never).
    pub calls_limit: u64,
}

impl SourceVm for Dirtier {
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        self.calls += 1;
        if self.calls > self.calls_limit {
            return Ok(());
        }
        for (b, block) in ram.blocks().iter().enumerate() {
            let pages = block.pages();
            for k in 0..self.per_call.min(pages) {
                let p = (self.calls * 7919 + k * 31 + self.seed) % pages;
                let off = p * PAGE_SIZE_U64;
                let mut data =
                    pattern_page(p, self.seed + self.calls * 77 + 1).unwrap_or([0; PAGE_SIZE]);
                data[0] = self.calls as u8;
                block.write_page(off, &data)?;
                if !dirty[b].contains(&off) {
                    dirty[b].push(off);
                }
            }
        }
        Ok(())
    }

    fn pause(&mut self) -> multifd::Result<()> {
        Ok(())
    }

    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

// ---------------------------------------------------------------------------
// Hand-made wire bytes

pub const RAM_SECTION: u32 = 1;

/// Main stream up to the end of the `ram` START section: header,
/// configuration (`none`), START, MEM_SIZE, FLUSH (per-round), EOS, footer.
pub fn main_setup(blocks: &[(&str, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    encode::header(&mut out);
    encode::configuration(
        &mut out,
        &Configuration {
            machine: "none".into(),
            ..Configuration::default()
        },
    )
    .unwrap();
    encode::section_start(&mut out, RAM_SECTION, "ram", 0, 4).unwrap();
    let infos: Vec<RamBlockInfo> = blocks
        .iter()
        .map(|&(n, len)| RamBlockInfo {
            idstr: n.into(),
            used_length: len,
        })
        .collect();
    encode::mem_size(&mut out, &infos).unwrap();
    encode::flush(&mut out);
    encode::eos(&mut out);
    encode::section_footer(&mut out, RAM_SECTION);
    out
}

/// A PART section holding one FLUSH.
pub fn main_part() -> Vec<u8> {
    let mut out = Vec::new();
    encode::section_part(&mut out, RAM_SECTION);
    encode::flush(&mut out);
    encode::eos(&mut out);
    encode::section_footer(&mut out, RAM_SECTION);
    out
}

/// END section with one FLUSH, then EOF and a vmdesc.
pub fn main_end() -> Vec<u8> {
    let mut out = Vec::new();
    encode::section_end(&mut out, RAM_SECTION);
    encode::flush(&mut out);
    encode::eos(&mut out);
    encode::section_footer(&mut out, RAM_SECTION);
    encode::eof(&mut out);
    encode::vmdesc(&mut out, br#"{"page_size": 4096, "devices": []}"#).unwrap();
    out
}

pub fn init_packet(uuid: [u8; 16], id: u8) -> Vec<u8> {
    InitPacket { uuid, id }.encode().to_vec()
}

/// A RAM packet header: `offsets[..normal]` normal, the rest zero pages.
pub fn ram_header(
    compression: Compression,
    block: &str,
    offsets: &[u64],
    normal: usize,
    payload: u32,
    packet_num: u64,
) -> Vec<u8> {
    let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
    RamPacketEncoder {
        compression,
        sync: false,
        packet_num,
        ramblock: block,
        offsets,
        normal_pages: normal,
        next_packet_size: payload,
    }
    .encode(&mut buf)
    .unwrap();
    buf.to_vec()
}

/// An uncompressed data packet with `normal` pages of `fill` bytes.
pub fn nocomp_packet(
    block: &str,
    offsets: &[u64],
    normal: usize,
    fill: u8,
    packet_num: u64,
) -> Vec<u8> {
    let mut out = ram_header(
        Compression::None,
        block,
        offsets,
        normal,
        (normal * PAGE_SIZE) as u32,
        packet_num,
    );
    out.resize(out.len() + normal * PAGE_SIZE, fill);
    out
}

pub fn sync_packet(packet_num: u64) -> Vec<u8> {
    let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
    RamPacketEncoder {
        compression: Compression::None,
        sync: true,
        packet_num,
        ramblock: "",
        offsets: &[],
        normal_pages: 0,
        next_packet_size: 0,
    }
    .encode(&mut buf)
    .unwrap();
    buf.to_vec()
}

/// Overwrites a big-endian u32 field of a packet.
pub fn set_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Overwrites a big-endian u64 field of a packet.
pub fn set_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Byte offsets of RAM packet header fields (QEMU's `MultiFDPacket_t`).
pub mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 8;
    pub const PAGES_ALLOC: usize = 12;
    pub const NORMAL_PAGES: usize = 16;
    pub const NEXT_PACKET_SIZE: usize = 20;
    pub const ZERO_PAGES: usize = 32;
    pub const RAMBLOCK: usize = 64;
    pub const OFFSET: usize = 320;
}

// ---------------------------------------------------------------------------
// Scripted hostile peer

/// How a scripted connection ends after its bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Close at once (the peer dies right after these bytes).
    Close,
    /// Keep the connection open, silent, until the receiver closes it.
    Hold,
}

/// One connection of a scripted peer: bytes written first (before any
/// other connection's `body`), bytes written after all connections are up,
/// and how it ends.
#[derive(Debug, Clone)]
pub struct Conn {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    pub end: End,
}

impl Conn {
    pub fn new(head: Vec<u8>, body: Vec<u8>, end: End) -> Self {
        Self { head, body, end }
    }
}

/// A raw client socket of the scripted peer.
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

    pub fn read_exact(&self, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = self.read(buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut buf[n..];
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

/// What a scripted peer observed.
#[derive(Debug)]
pub struct PeerReport {
    /// Every held connection saw the receiver close it.
    pub all_closed_by_receiver: bool,
}

/// Runs a scripted peer on a helper thread: connects each connection in
/// order and writes its head, then writes the bodies in order, then closes
/// or holds each as scripted. Write errors (the receiver gave up) end the
/// writing quietly.
pub fn scripted_peer(uri: Uri, conns: Vec<Conn>) -> JoinHandle<PeerReport> {
    spawn("peer", move || {
        let mut socks = Vec::new();
        for c in &conns {
            let s = match Sock::connect(&uri) {
                Ok(s) => s,
                Err(_) => break,
            };
            let _ = s.write_all(&c.head);
            if c.end == End::Close && c.body.is_empty() {
                drop(s);
                continue;
            }
            socks.push((s, c));
        }
        let mut held = Vec::new();
        for (s, c) in socks {
            let _ = s.write_all(&c.body);
            match c.end {
                End::Close => drop(s),
                End::Hold => held.push(s),
            }
        }
        let mut all = true;
        for s in &held {
            all &= s.wait_closed(Duration::from_secs(10));
        }
        PeerReport {
            all_closed_by_receiver: all,
        }
    })
}

// ---------------------------------------------------------------------------
// Receiver on a watched thread

pub type RecvResult = (multifd::Result<Incoming>, Duration);

/// A receiver running on a helper thread.
pub struct Receiving {
    pub handle: JoinHandle<()>,
    pub rx: mpsc::Receiver<RecvResult>,
    pub progress: Arc<Progress>,
}

/// Starts `receive` on a helper thread.
pub fn start_receiver(
    listener: Listener,
    opts: ReceiveOptions,
    mut provider: Box<dyn RamProvider + Send>,
) -> Receiving {
    let (tx, rx) = mpsc::channel();
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let handle = spawn("recv", move || {
        let t = Instant::now();
        let r = multifd::receive(&listener, &opts, provider.as_mut(), &p);
        let _ = tx.send((r, t.elapsed()));
        drop(listener);
    });
    Receiving {
        handle,
        rx,
        progress,
    }
}

impl Receiving {
    /// Waits for the result at most `limit`; `None` if the receiver hangs.
    pub fn wait(&self, limit: Duration) -> Option<RecvResult> {
        self.rx.recv_timeout(limit).ok()
    }
}

/// Receive options for hostile cases: small timeouts, `channels` channels.
pub fn recv_opts(channels: u8, handshake: Duration) -> ReceiveOptions {
    ReceiveOptions {
        config: MigrationConfig {
            channels,
            handshake_timeout: handshake,
            connect_timeout: Duration::from_secs(2),
            ..MigrationConfig::default()
        },
        accept_timeout: Some(Duration::from_secs(3)),
        ..ReceiveOptions::default()
    }
}

/// Short description of an error variant, for messages.
/// The error with its causes, as the CLI prints it (`a: b: c`): what a
/// user reads, so what message assertions check.
pub fn message(e: &Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

pub fn variant(e: &Error) -> String {
    let s = format!("{e:?}");
    s.split([' ', '{', '(']).next().unwrap_or("").to_owned()
}

// ---------------------------------------------------------------------------
// Fault-injecting proxy

/// A socket of the proxy, shared between its pump and the kill switch.
enum PSock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl PSock {
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
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        };
    }
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
}

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
    socks: Mutex<Vec<Weak<PSock>>>,
    forwarded: AtomicU64,
    cut_done: AtomicBool,
    stop: AtomicBool,
}

impl ProxyShared {
    fn register(&self, s: &Arc<PSock>) {
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
                        PSock::Tcp(s)
                    }),
                    PListener::Unix(l) => l.accept().map(|(s, _)| {
                        s.set_nonblocking(false).unwrap();
                        PSock::Unix(s)
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
                let Ok(up) = PSock::connect(&upstream) else {
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

    /// Stops accepting, shuts everything down and joins all proxy threads.
    pub fn finish(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.kill_all();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
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
fn pump(i: usize, down: &Arc<PSock>, up: &Arc<PSock>, cut: Cut, sh: &ProxyShared) {
    let cut_here = |sh: &ProxyShared| {
        sh.cut_done.store(true, Ordering::Release);
        down.shutdown(Shutdown::Both);
        up.shutdown(Shutdown::Both);
    };
    match cut {
        Cut::AfterSync { conn, nth } if conn == i => {
            // Parse the channel: init packet, then header + payload packets.
            let mut init = [0u8; 64];
            if read_full(down, &mut init).is_err() || up.write_all(&init).is_err() {
                return end(down, up);
            }
            sh.forwarded.fetch_add(64, Ordering::Relaxed);
            let mut syncs = 0;
            let mut hdr = vec![0u8; RAM_PACKET_HEADER_SIZE];
            loop {
                if read_full(down, &mut hdr).is_err() || up.write_all(&hdr).is_err() {
                    return end(down, up);
                }
                let Ok(h) = RamPacketHeader::decode(&hdr) else {
                    plain(down, up, u64::MAX, sh);
                    return;
                };
                let mut payload = vec![0u8; h.next_packet_size as usize];
                if read_full(down, &mut payload).is_err() || up.write_all(&payload).is_err() {
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
fn plain(down: &PSock, up: &PSock, limit: u64, sh: &ProxyShared) -> bool {
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

fn end(down: &PSock, up: &PSock) {
    down.shutdown(Shutdown::Both);
    up.shutdown(Shutdown::Both);
}

fn read_full(s: &PSock, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Small PRNG (no extra dependency); seeds are printed on failure.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x2545_F491_4F6C_DD1D | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed for randomised tests: `MULTIFD_TEST_SEED` or the clock.
pub fn seed() -> u64 {
    std::env::var("MULTIFD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}
