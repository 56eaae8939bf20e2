//! One stress run: a real receiver and a real sender in this process, over
//! loopback TCP or a Unix socket, TLS or not, directly or through the
//! fault-injecting [`Proxy`], with a scripted source VM whose gates put a
//! fault at a chosen transition; then the verdict: how each side ended,
//! how long it took, whether the source's RAM is untouched and whether a
//! connection was left half-open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::ValueEnum;
use multifd::{
    Cancel, Error, GuestRam, Incoming, Listener, MigrationConfig, Progress, RamBlock, RamBlockInfo,
    RamProvider, ReceiveOptions, SourceOptions, SourceVm, TlsClient, TlsServer, Uri,
};

use super::proxy::{Flag, Plan, Proxy, Transport};

/// The points where a migration is broken (`--fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Fault {
    /// Connection k (0 = main) is refused: the listener closed.
    ConnectRefused,
    /// Connection k never completes: a full backlog (k = 0) or a peer that
    /// accepts and never answers.
    ConnectStall,
    /// The TLS handshake of connection k fails (its ClientHello is
    /// corrupted on the way). TLS only.
    TlsHandshake,
    /// A bad initial packet on channel k (a corrupted byte; over TLS, a
    /// source with another UUID).
    BadInit,
    /// Channel k is cut in the middle of a packet, mid-migration.
    CloseMidPacket,
    /// Channel k is cut inside its SYNC packet, while the receiver waits at
    /// the barrier.
    CloseDuringSync,
    /// The main channel is cut inside its last section, as the source
    /// completes.
    CloseAtCompletion,
    /// The source fails at completion (saving device state).
    ErrorAtCompletion,
    /// Cancel (sender, receiver or both) while connections are set up.
    CancelSetup,
    /// Cancel while a channel is blocked mid-stream.
    CancelActive,
    /// Cancel while the receiver waits at a sync point.
    CancelSync,
    /// Cancel during completion (the source paused for the final round,
    /// or saving device state), before the point of no return.
    CancelCompletion,
}

impl Fault {
    pub fn all() -> Vec<Fault> {
        Fault::value_variants().to_vec()
    }

    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    fn tls_only(self) -> bool {
        self == Fault::TlsHandshake
    }

    /// Whether this fault applies with or without TLS.
    pub fn applies(self, tls: bool) -> bool {
        tls || !self.tls_only()
    }
}

/// What one run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A verifying TLS receiver, a sender without a client certificate.
    RejectAnon,
    /// A migration that must succeed, byte-identical.
    Clean,
    /// A migration broken at a fault point.
    Fault(Fault),
}

/// Which side(s) a cancel fault cancels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sides {
    Sender,
    Receiver,
    Both,
}

impl Sides {
    fn sender(self) -> bool {
        matches!(self, Self::Sender | Self::Both)
    }
    fn receiver(self) -> bool {
        matches!(self, Self::Receiver | Self::Both)
    }
}

/// One run's parameters (all derived from its seed but the case).
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub kind: Kind,
    pub tls: bool,
    pub channels: u8,
    pub transport: Transport,
    pub seed: u64,
}

/// A small PRNG (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The fault's parameters, drawn from the run's seed.
#[derive(Debug, Clone, Copy)]
struct Params {
    /// The connection the fault hits (0 = main).
    conn: usize,
    plan: Plan,
    sides: Sides,
    /// A random amount (bytes to pass before a cut, held bytes to forward).
    amount: u64,
}

impl Params {
    fn draw(spec: &Spec) -> Self {
        let mut rng = Rng::new(spec.seed);
        let n = u64::from(spec.channels);
        let any = rng.below(n + 1) as usize;
        let chan = 1 + rng.below(n) as usize;
        let sides = [Sides::Sender, Sides::Receiver, Sides::Both][rng.below(3) as usize];
        let amount = rng.next();
        let xor = 1 + rng.below(255) as u8;
        let (conn, plan) = match spec.kind {
            Kind::RejectAnon | Kind::Clean => (0, Plan::Forward),
            Kind::Fault(f) => match f {
                Fault::ConnectRefused => (any, Plan::Refuse { from: any }),
                Fault::ConnectStall if any == 0 => (0, Plan::Backlog),
                Fault::ConnectStall => (any, Plan::Silent { conn: any }),
                // The ClientHello's random (record header 5, handshake
                // header 4, version 2): a transcript the server does not share.
                Fault::TlsHandshake => (
                    any,
                    Plan::Corrupt {
                        conn: any,
                        at: 11 + amount % 32,
                        xor,
                    },
                ),
                // Magic, version, UUID and id of the initial packet.
                Fault::BadInit if !spec.tls => (
                    chan,
                    Plan::Corrupt {
                        conn: chan,
                        at: amount % 25,
                        xor,
                    },
                ),
                Fault::BadInit => (chan, Plan::Forward),
                Fault::CloseMidPacket => (chan, Plan::Forward),
                Fault::CloseDuringSync | Fault::CancelSync => (chan, Plan::Forward),
                Fault::CloseAtCompletion => (0, Plan::Forward),
                Fault::CancelSetup => (any, Plan::Silent { conn: any }),
                // Past the TLS handshake and the initial packet, inside the
                // setup SYNC or the first data packet.
                Fault::CancelActive => (
                    chan,
                    Plan::HoldAt {
                        conn: chan,
                        at: if spec.tls { 2048 } else { 64 } + amount % 4096,
                    },
                ),
                Fault::ErrorAtCompletion | Fault::CancelCompletion => (0, Plan::Forward),
            },
        };
        Self {
            conn,
            plan,
            sides,
            amount,
        }
    }
}

/// Bytes held back on a channel for a cut inside its SYNC packet (a SYNC
/// is 1344 bytes, 1366 as a TLS record).
const SYNC_TAIL: usize = 1300;
/// Bytes held back on the main channel for a cut inside its last section.
const MAIN_TAIL: usize = 16;
/// A connection is between bursts once nothing came for this long.
const QUIET: Duration = Duration::from_millis(25);

/// What every run shares: credentials, the source RAM and its checksum.
pub struct Env {
    pub server: TlsServer,
    pub client: TlsClient,
    pub anon: TlsClient,
    pub source: GuestRam,
    pub checksum: u64,
    /// Longest a side may take to end.
    pub bound: Duration,
}

/// Source RAM of `mib` MiB in two blocks: a third of the pages zero, the
/// rest patterned from `seed`.
pub fn source_ram(mib: u64, seed: u64) -> Result<GuestRam> {
    let mut ram = GuestRam::new();
    let mut rng = Rng::new(seed);
    for (name, pages) in [("pc.ram", mib * 256), ("vga.vram", 64)] {
        let block = RamBlock::anonymous(name, pages * 4096)?;
        let mut page = [0u8; 4096];
        for p in 0..pages {
            if rng.below(3) == 0 {
                continue;
            }
            for w in page.chunks_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
            block.write_page(p * 4096, &page)?;
        }
        ram.push(block)?;
    }
    Ok(ram)
}

/// A 64-bit checksum of every page of `ram`.
pub fn checksum(ram: &GuestRam) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut page = [0u8; 4096];
    for b in ram.blocks() {
        for p in 0..b.pages() {
            b.read_page(p * 4096, &mut page)?;
            for w in page.chunks_exact(8) {
                let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
            }
        }
    }
    Ok(h)
}

/// Whether `got` holds exactly `want`'s blocks and bytes; the first
/// difference otherwise.
fn same_ram(want: &GuestRam, got: &GuestRam) -> Result<Option<String>> {
    if want.blocks().len() != got.blocks().len() {
        return Ok(Some("block count differs".into()));
    }
    let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
    for (x, y) in want.blocks().iter().zip(got.blocks()) {
        if x.name() != y.name() || x.len() != y.len() {
            return Ok(Some(format!(
                "block {:?} differs in name or size",
                x.name()
            )));
        }
        for p in 0..x.pages() {
            x.read_page(p * 4096, &mut a)?;
            y.read_page(p * 4096, &mut b)?;
            if a != b {
                return Ok(Some(format!("block {:?} page {p} differs", x.name())));
            }
        }
    }
    Ok(None)
}

/// Anonymous destination RAM for whatever the source announces.
struct AnonRam;

impl RamProvider for AnonRam {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
        }
        Ok(ram)
    }
}

/// The short name of an error for tallies: its variant, and for I/O
/// errors the OS error kind.
pub fn variant(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => format!("Io({:?})", source.kind()),
        e => {
            let s = format!("{e:?}");
            s.split([' ', '{', '(']).next().unwrap_or("").to_owned()
        }
    }
}

/// The error with its causes, as one line.
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

/// How one side ended.
#[derive(Debug, Clone)]
pub enum End {
    Ok,
    Err {
        variant: String,
        message: String,
    },
    /// Still running after the bound (a hang).
    Hung,
}

impl End {
    pub fn label(&self) -> String {
        match self {
            Self::Ok => "Ok".into(),
            Self::Err { variant, .. } => variant.clone(),
            Self::Hung => "HUNG".into(),
        }
    }
}

/// The verdict on one run.
#[derive(Debug)]
pub struct Outcome {
    pub sender: End,
    pub receiver: End,
    /// The whole run, setup to teardown.
    pub took: Duration,
    /// What was wrong; empty for a good run.
    pub problems: Vec<String>,
    /// The run could not be brought to an end: the process must stop.
    pub fatal: bool,
}

/// The choreography of a run: shared by the harness, the scripted source
/// VM and the result collectors.
struct Ctl<'a> {
    spec: Spec,
    params: Params,
    proxy: Option<&'a Proxy>,
    bound: Duration,
    recv_done: Flag,
    send_cancel: Arc<Cancel>,
    recv_cancel: Arc<Cancel>,
    /// A gate of the scripted VM or the harness did its part.
    fired: AtomicBool,
    /// The harness (or a gate) cancelled.
    cancelled: Flag,
    /// The receiver's progress: its sync points say where it is.
    recv_progress: Progress,
    /// Gates that waited in vain (the run did not go as planned).
    missed: Mutex<Vec<&'static str>>,
}

impl Ctl<'_> {
    fn fault(&self) -> Option<Fault> {
        match self.spec.kind {
            Kind::Fault(f) => Some(f),
            _ => None,
        }
    }

    fn miss(&self, what: &'static str) {
        self.missed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    fn cancel(&self, sides: Sides) {
        if sides.sender() {
            self.send_cancel.cancel();
        }
        if sides.receiver() {
            self.recv_cancel.cancel();
        }
        self.fired.store(true, Ordering::Release);
        self.cancelled.set();
    }

    /// Cancels, and waits until the cancel took effect: the receiver
    /// returned, or the sender shut its connections down.
    fn cancel_and_wait(&self, gate: &'static str) {
        debug(&format!("{gate}: cancel {:?}", self.params.sides));
        self.cancel(self.params.sides);
        if self.params.sides.receiver() {
            self.wait_receiver_gone(gate);
        } else if let Some(p) = self.proxy
            && !p.wait_all_ended(self.bound)
        {
            self.miss(gate);
        }
    }

    /// Waits until the receiver returned and the proxy passed its hang-up
    /// on to the sender, so the sender's next write fails.
    fn wait_receiver_gone(&self, what: &'static str) {
        if !self.recv_done.wait(self.bound) {
            return self.miss(what);
        }
        debug("receiver returned");
        if let Some(p) = self.proxy
            && !p.wait_all_ended(Duration::from_secs(2))
        {
            self.miss(what);
        }
        debug("links ended");
    }

    /// Waits until the proxy has taken every connection of the run (the
    /// main one and each channel's) and every forwarded one has ended.
    fn wait_all_taken(&self, what: &'static str) {
        let Some(p) = self.proxy else { return };
        let conns = 1 + u64::from(self.spec.channels);
        if !p.wait_accepted(conns, self.bound) || !p.wait_all_ended(Duration::from_secs(2)) {
            self.miss(what);
        }
    }

    /// Waits until the receiver passed `n` sync points (the setup's is the
    /// first), at most the bound: the source runs ahead of it by its queues
    /// and the socket buffers, and a fault "at round k" is meant for both.
    fn wait_rounds(&self, n: u64, what: &'static str) -> bool {
        let deadline = Instant::now() + self.bound;
        while self.recv_progress.rounds.load(Ordering::Acquire) < n {
            if Instant::now() >= deadline || self.recv_done.is_set() {
                self.miss(what);
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn wait_quiet(&self, conn: usize, what: &'static str) -> bool {
        let ok = self
            .proxy
            .is_some_and(|p| p.wait_quiet(conn, QUIET, self.bound));
        if !ok {
            self.miss(what);
        }
        ok
    }

    fn wait_fired(&self, what: &'static str) {
        if !self
            .proxy
            .is_some_and(|p| p.fired().wait(Duration::from_secs(2)))
        {
            self.miss(what);
        }
    }

    /// The harness's part, on the calling thread, while both sides run.
    fn harness(&self) {
        if let Some(Fault::CancelSetup | Fault::CancelActive) = self.fault() {
            if self.proxy.is_some_and(|p| p.holding().wait(self.bound)) {
                self.cancel(self.params.sides);
                // The stall ends: what the sender wrote (and its
                // close) reaches the receiver.
                if let Some(p) = self.proxy {
                    p.release(self.params.conn);
                }
            } else {
                self.miss("harness: the held connection never came");
            }
        }
    }

    /// Gate A: the source VM after round 1, before it reports the pages
    /// that make round 2.
    fn after_round_one(&self) {
        let Some(f) = self.fault() else { return };
        let conn = self.params.conn;
        match f {
            Fault::ConnectRefused | Fault::ConnectStall | Fault::TlsHandshake | Fault::BadInit => {
                self.wait_receiver_gone("gate A: receiver failing first");
            }
            Fault::CloseMidPacket
                if self.wait_rounds(2, "gate A: receiver past round 1")
                    && self.wait_quiet(conn, "gate A: channel quiet") =>
            {
                let r = 1 + self.params.amount % 1344;
                if let Some(p) = self.proxy {
                    p.cut_after(conn, r);
                }
            }
            Fault::CloseDuringSync | Fault::CancelSync => {
                // Round 2's SYNC, the last thing channel k writes before
                // the pause, will end up held back.
                if let Some(p) = self.proxy {
                    p.hold_tail(conn, SYNC_TAIL);
                }
            }
            Fault::CancelSetup | Fault::CancelActive => {
                // The harness cancels once the connection is held; a
                // source quicker than that waits for it here.
                if !self.cancelled.wait(self.bound) {
                    self.miss("gate A: the harness's cancel");
                } else if self.params.sides.receiver() {
                    self.wait_receiver_gone("gate A: cancelled receiver");
                    // Connections the sender made after the receiver
                    // returned wait in the proxy's backlog until it takes
                    // (and resets) them: until then a source whose pages
                    // fit in the socket buffers writes them all and ends
                    // successfully (there is no return path; 1 run in
                    // 1,000 did).
                    self.wait_all_taken("gate A: sender's connections reset");
                }
            }
            _ => {}
        }
    }

    /// Gate B: the source VM is paused for the final round (before the
    /// point of no return).
    fn at_pause(&self) {
        let conn = self.params.conn;
        match self.fault() {
            Some(Fault::CloseMidPacket) => self.wait_fired("gate B: cut mid-packet"),
            Some(Fault::CloseDuringSync)
                if self.wait_rounds(2, "gate B: receiver past round 1")
                    && self.wait_quiet(conn, "gate B: SYNC held") =>
            {
                if let Some(p) = self.proxy {
                    p.cut_tail(conn, (self.params.amount % SYNC_TAIL as u64) as usize);
                }
                self.wait_fired("gate B: SYNC cut");
            }
            Some(Fault::CancelSync)
                if self.wait_rounds(2, "gate B: receiver past round 1")
                    && self.wait_quiet(conn, "gate B: SYNC held") =>
            {
                self.cancel(self.params.sides);
                if self.params.sides.receiver() {
                    self.wait_receiver_gone("gate B: cancelled receiver");
                }
            }
            Some(Fault::CloseAtCompletion) => {
                // The final round's END section will end up held back.
                if let Some(p) = self.proxy {
                    p.hold_tail(0, MAIN_TAIL);
                }
            }
            Some(Fault::CancelCompletion)
                if self.params.amount.is_multiple_of(2)
                    && self.wait_rounds(3, "gate B: receiver past round 2") =>
            {
                self.cancel_and_wait("gate B");
            }
            _ => {}
        }
    }

    /// Gate C: the source VM saves device state (after the point of no
    /// return).
    fn at_device_state(&self) -> multifd::Result<Vec<u8>> {
        match self.fault() {
            Some(Fault::ErrorAtCompletion) => {
                self.fired.store(true, Ordering::Release);
                return Err(Error::io(
                    "saving device state (injected fault)",
                    std::io::Error::other("injected"),
                ));
            }
            Some(Fault::CloseAtCompletion)
                if self.wait_rounds(3, "gate C: receiver past round 2")
                    && self.wait_quiet(0, "gate C: main channel quiet") =>
            {
                if let Some(p) = self.proxy {
                    p.cut_tail(0, (self.params.amount % MAIN_TAIL as u64) as usize);
                }
                self.wait_fired("gate C: main cut");
            }
            Some(Fault::CancelCompletion)
                if self.params.amount % 2 == 1
                    && self.wait_rounds(3, "gate C: receiver past round 2") =>
            {
                self.cancel_and_wait("gate C");
            }
            _ => {}
        }
        Ok(Vec::new())
    }
}

/// Prints `what` when `MULTIFD_STRESS_DEBUG` is set.
fn debug(what: &str) {
    if std::env::var_os("MULTIFD_STRESS_DEBUG").is_some() {
        eprintln!("  [{:?}] {what}", std::time::SystemTime::now());
    }
}

/// A source VM whose RAM does not change, with a second round (part of the
/// pages reported dirty, rewritten by nobody) and the gates of [`Ctl`].
struct Scripted<'a, 'c> {
    ctl: &'a Ctl<'c>,
    calls: u32,
}

impl SourceVm for Scripted<'_, '_> {
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        self.calls += 1;
        if self.calls == 1 {
            self.ctl.after_round_one();
            for (b, block) in ram.blocks().iter().enumerate() {
                dirty[b].extend((0..block.pages().min(512)).map(|p| p * 4096));
            }
        }
        Ok(())
    }

    fn pause(&mut self) -> multifd::Result<()> {
        self.ctl.at_pause();
        Ok(())
    }

    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        self.ctl.at_device_state()
    }
}

fn config(spec: &Spec) -> MigrationConfig {
    let faults = matches!(spec.kind, Kind::Fault(_));
    MigrationConfig {
        channels: spec.channels,
        handshake_timeout: handshake_timeout(spec),
        connect_timeout: if faults {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        },
        ..MigrationConfig::default()
    }
}

/// How long a connection has to identify itself (and the receiver to see
/// its first one). A stalled connection ends its run only through this
/// timeout, so it is short there; every other run gets enough for TLS
/// handshakes on a loaded 2-core machine (600 ms was not: under a load
/// average of 8 a handshake outlasted it a few times in a thousand, ending
/// the run before its fault), and still well inside the run's bound.
fn handshake_timeout(spec: &Spec) -> Duration {
    match spec.kind {
        Kind::Fault(Fault::ConnectStall) => Duration::from_millis(600),
        Kind::Fault(_) => Duration::from_secs(2),
        _ => Duration::from_secs(5),
    }
}

fn bind(transport: Transport) -> Result<(Listener, Uri, Option<tempfile::TempDir>)> {
    match transport {
        Transport::Tcp => {
            let l = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
            let uri = l.local_uri()?;
            Ok((l, uri, None))
        }
        Transport::Unix => {
            let dir = tempfile::Builder::new()
                .prefix("multifd-stress")
                .tempdir()?;
            let uri = Uri::Unix(dir.path().join("recv.sock"));
            let l = Listener::bind(&uri)?;
            Ok((l, uri, Some(dir)))
        }
    }
}

/// Runs one migration as `spec` says and judges it.
pub fn run(env: &Env, spec: Spec) -> Result<Outcome> {
    let started = Instant::now();
    let params = Params::draw(&spec);
    let fault = match spec.kind {
        Kind::Fault(f) => Some(f),
        _ => None,
    };
    let (listener, uri, dir) = bind(spec.transport)?;
    let proxy = match fault {
        Some(_) => Some(Proxy::start(spec.transport, uri.clone(), params.plan)?),
        None => None,
    };
    let target = proxy
        .as_ref()
        .map_or_else(|| uri.clone(), |p| p.uri.clone());
    debug(&format!("receiver at {uri}, sender to {target}"));
    let recv_cfg = config(&spec);
    let mut send_cfg = recv_cfg.clone();
    if fault == Some(Fault::BadInit) && spec.tls {
        send_cfg.uuid = [0x5a; 16];
    }
    let ctl = Ctl {
        spec,
        params,
        proxy: proxy.as_ref(),
        bound: env.bound,
        recv_done: Flag::default(),
        send_cancel: Arc::new(Cancel::new()),
        recv_cancel: Arc::new(Cancel::new()),
        // A source with another UUID is the fault itself.
        fired: AtomicBool::new(fault == Some(Fault::BadInit) && spec.tls),
        cancelled: Flag::default(),
        recv_progress: Progress::default(),
        missed: Mutex::new(Vec::new()),
    };
    let ropts = ReceiveOptions {
        config: recv_cfg,
        accept_timeout: Some(if fault.is_some() {
            handshake_timeout(&spec)
        } else {
            Duration::from_secs(10)
        }),
        cancel: Some(ctl.recv_cancel.clone()),
        tls: spec.tls.then(|| env.server.clone()),
        ..ReceiveOptions::default()
    };
    let sopts = SourceOptions {
        config: send_cfg,
        downtime_limit: Duration::ZERO,
        max_rounds: 4,
        cancel: Some(ctl.send_cancel.clone()),
        tls: match (spec.kind, spec.tls) {
            (Kind::RejectAnon, _) => Some(env.anon.clone()),
            (_, true) => Some(env.client.clone()),
            (_, false) => None,
        },
        ..SourceOptions::default()
    };
    let (rtx, rrx) = mpsc::channel::<(multifd::Result<Incoming>, Duration)>();
    let (stx, srx) = mpsc::channel::<(multifd::Result<multifd::Stats>, Duration)>();
    let mut outcome = std::thread::scope(|s| -> Result<Outcome> {
        let ctl = &ctl;
        let recv = std::thread::Builder::new()
            .name("stress-recv".into())
            .spawn_scoped(s, move || {
                let t = Instant::now();
                let r = multifd::receive(&listener, &ropts, &mut AnonRam, &ctl.recv_progress);
                // A receiver closes its listener when it is done (the
                // connections queued there are reset).
                drop(listener);
                let _ = rtx.send((r, t.elapsed()));
                ctl.recv_done.set();
            })?;
        let send = std::thread::Builder::new()
            .name("stress-send".into())
            .spawn_scoped(s, || {
                let t = Instant::now();
                let mut vm = Scripted { ctl, calls: 0 };
                let r =
                    multifd::migrate(&target, &env.source, &mut vm, &sopts, &Progress::default());
                let _ = stx.send((r, t.elapsed()));
            })?;
        ctl.harness();
        // Each side has the bound from its start; a little slack for the
        // start itself.
        let deadline = started + env.bound + Duration::from_millis(500);
        let left = || deadline.saturating_duration_since(Instant::now());
        let sent = srx.recv_timeout(left()).ok();
        let got = rrx.recv_timeout(left()).ok();
        let hung = sent.is_none() || got.is_none();
        let (sent, got) = if hung {
            // Unblock what is stuck (the outcome is a failure already),
            // then give it a last, bounded chance.
            ctl.send_cancel.cancel();
            ctl.recv_cancel.cancel();
            let sent = sent.or_else(|| srx.recv_timeout(Duration::from_secs(10)).ok());
            let got = got.or_else(|| rrx.recv_timeout(Duration::from_secs(10)).ok());
            if sent.is_none() || got.is_none() {
                super::fatal(&format!(
                    "{}: sender {}, receiver {}: still running after both were cancelled",
                    describe(&ctl.spec),
                    if sent.is_none() { "hangs" } else { "returned" },
                    if got.is_none() { "hangs" } else { "returned" },
                ));
            }
            (sent, got)
        } else {
            (sent, got)
        };
        let (sent, sent_took) = sent.expect("checked");
        let (got, got_took) = got.expect("checked");
        let _ = send.join();
        let _ = recv.join();
        let mut problems = Vec::new();
        if hung {
            problems.push(format!(
                "a side did not end within {:?} (sender {sent_took:?}, receiver {got_took:?})",
                env.bound
            ));
        }
        for (who, took) in [("sender", sent_took), ("receiver", got_took)] {
            if took > env.bound {
                problems.push(format!("{who} took {took:?}"));
            }
        }
        let sender = end_of(sent.as_ref().err());
        let receiver = end_of(got.as_ref().err());
        judge(ctl, env, &sent, &got, &mut problems)?;
        drop(got);
        Ok(Outcome {
            sender,
            receiver,
            took: Duration::ZERO,
            problems,
            fatal: false,
        })
    })?;
    if let Some(p) = proxy {
        let open = p.finish(Duration::from_secs(2));
        if open > 0 && !outcome.fatal {
            outcome
                .problems
                .push(format!("{open} proxied connection(s) left half-open"));
        }
    }
    drop(dir);
    if checksum(&env.source)? != env.checksum {
        outcome.problems.push("the source's RAM changed".into());
    }
    outcome.took = started.elapsed();
    Ok(outcome)
}

fn end_of(r: Option<&Error>) -> End {
    match r {
        None => End::Ok,
        Some(e) => End::Err {
            variant: variant(e),
            message: message(e),
        },
    }
}

/// Errors that are not a typed cause: a lost first error, a panic, a bug.
fn untyped(e: &Error) -> bool {
    matches!(e, Error::Aborted | Error::Panicked(_) | Error::Internal(_))
}

fn judge(
    ctl: &Ctl<'_>,
    env: &Env,
    sent: &multifd::Result<multifd::Stats>,
    got: &multifd::Result<Incoming>,
    problems: &mut Vec<String>,
) -> Result<()> {
    for (who, e) in [
        ("sender", sent.as_ref().err()),
        ("receiver", got.as_ref().err()),
    ] {
        if let Some(e) = e
            && untyped(e)
        {
            problems.push(format!("{who}: untyped error {}", message(e)));
        }
    }
    if let Ok(inc) = got
        && let Some(d) = same_ram(&env.source, &inc.ram)?
    {
        problems.push(format!("receiver succeeded with different RAM: {d}"));
    }
    let missed = ctl.missed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for m in missed {
        problems.push(format!("did not go as planned: {m}"));
    }
    match ctl.spec.kind {
        Kind::Clean => {
            for (who, e) in [
                ("sender", sent.as_ref().err()),
                ("receiver", got.as_ref().err()),
            ] {
                if let Some(e) = e {
                    problems.push(format!("{who} failed: {}", message(e)));
                }
            }
        }
        Kind::RejectAnon => {
            match got {
                Ok(_) => problems.push("the receiver accepted an anonymous client".into()),
                Err(Error::Tls { .. }) => {}
                Err(e) => problems.push(format!("receiver: not a TLS error: {}", message(e))),
            }
            match sent {
                Ok(_) => problems.push("the sender succeeded without a certificate".into()),
                Err(Error::Tls { .. } | Error::Io { .. } | Error::PeerClosed { .. }) => {}
                Err(e) => problems.push(format!("sender: unexpected {}", message(e))),
            }
        }
        Kind::Fault(f) => {
            if sent.is_ok() {
                problems.push("the sender succeeded".into());
            }
            if got.is_ok() {
                problems.push("the receiver succeeded".into());
            }
            let reached =
                ctl.fired.load(Ordering::Acquire) || ctl.proxy.is_some_and(Proxy::reached);
            if !reached {
                problems.push("the fault was never injected".into());
            }
            if matches!(
                f,
                Fault::CancelSetup
                    | Fault::CancelActive
                    | Fault::CancelSync
                    | Fault::CancelCompletion
            ) {
                let sides = ctl.params.sides;
                let cancelled = |r: Option<&Error>| matches!(r, Some(Error::Cancelled));
                let (s, r) = (
                    cancelled(sent.as_ref().err()),
                    cancelled(got.as_ref().err()),
                );
                let ok = match sides {
                    Sides::Sender => s,
                    Sides::Receiver => r,
                    Sides::Both => s || r,
                };
                if !ok {
                    problems.push(format!("cancelled {sides:?} but no Cancelled error there"));
                }
            }
        }
    }
    Ok(())
}

/// A description of the run for a failure report.
pub fn describe(spec: &Spec) -> String {
    let p = Params::draw(spec);
    format!(
        "kind={:?} tls={} channels={} transport={} run-seed={} (conn {} plan {:?} cancel {:?})",
        spec.kind,
        spec.tls,
        spec.channels,
        spec.transport.name(),
        spec.seed,
        p.conn,
        p.plan,
        p.sides
    )
}
