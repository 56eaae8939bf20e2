//! Lifecycle stress: many loopback migrations, clean or broken at a random
//! point, each required to end (never hang) with success or a typed error,
//! with the process's thread and fd counts back at their baseline after
//! every run.
//!
//! A real sender (`migrate`) talks to a real receiver (`receive`) through a
//! fault-injecting proxy (see `util::Proxy`) that closes a connection as
//! it is accepted, inside an initial packet, in the middle of the stream,
//! right after a SYNC packet, just before the main stream completes, or
//! everything at once; or the sender or the receiver is cancelled after a
//! random delay.
//!
//! Seeds: `MULTIFD_TEST_SEED=<n>` replays a run sequence; the seed is
//! printed on failure. Counts: `MULTIFD_STRESS_RUNS` (fault runs, default
//! 520) and `MULTIFD_CLEAN_RUNS` (default 100).

mod util;

use std::collections::BTreeMap;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use multifd::ReceiveOptions;
use multifd::{
    Cancel, Compression, Error, FlushMode, MethodConfig, MigrationConfig, Progress,
    ZeroPageDetection,
};
use multifd::{SourceOptions, migrate};
use util::*;

/// Longest a single run may take before it counts as a hang.
const RUN_LIMIT: Duration = Duration::from_secs(10);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One migration's parameters.
#[derive(Debug, Clone)]
struct Plan {
    transport: Transport,
    channels: u8,
    compression: Compression,
    zero: ZeroPageDetection,
    flush: FlushMode,
    blocks: Vec<(String, u64)>,
    dirty_calls: u64,
    per_call: u64,
    handshake: Duration,
    cut: Cut,
    cancel_after: Option<Duration>,
    /// Cancel the receiver (`ReceiveOptions::cancel`) after this long.
    cancel_receiver_after: Option<Duration>,
    seed: u64,
}

impl Plan {
    fn random(rng: &mut Rng, max_channels: u8) -> Self {
        let blocks = (0..1 + rng.below(3))
            .map(|i| (format!("blk{i}"), 1 + rng.below(200)))
            .collect();
        Self {
            transport: if rng.below(2) == 0 {
                Transport::Tcp
            } else {
                Transport::Unix
            },
            channels: 1 + rng.below(u64::from(max_channels)) as u8,
            compression: [Compression::None, Compression::Zlib, Compression::Zstd]
                [rng.below(3) as usize],
            zero: [
                ZeroPageDetection::Multifd,
                ZeroPageDetection::Legacy,
                ZeroPageDetection::None,
            ][rng.below(3) as usize],
            flush: if rng.below(4) == 0 {
                FlushMode::PerSection
            } else {
                FlushMode::PerRound
            },
            blocks,
            dirty_calls: rng.below(4),
            per_call: 1 + rng.below(24),
            handshake: Duration::from_secs(5),
            cut: Cut::None,
            cancel_after: None,
            cancel_receiver_after: None,
            seed: rng.next(),
        }
    }

    fn config(&self) -> MigrationConfig {
        MigrationConfig {
            channels: self.channels,
            method: MethodConfig {
                compression: self.compression,
                ..MethodConfig::default()
            },
            zero_page_detection: self.zero,
            flush_mode: self.flush,
            uuid: [0x42; 16],
            handshake_timeout: self.handshake,
            connect_timeout: Duration::from_secs(2),
            ..MigrationConfig::default()
        }
    }

    fn total_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.1).sum()
    }
}

/// What one run ended with.
struct Ran {
    sent: multifd::Result<multifd::Stats>,
    received: multifd::Result<multifd::Incoming>,
    source: Arc<multifd::GuestRam>,
    took: Duration,
    cut_done: bool,
}

/// Runs one migration, through a proxy breaking it as planned when there is
/// a cut (directly otherwise). `Err` on a
/// hang (a side still running after `RUN_LIMIT`).
fn run(plan: &Plan) -> Result<Ran, String> {
    let blocks: Vec<(&str, u64)> = plan.blocks.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let source = Arc::new(source_ram(&blocks, plan.seed));
    let bound = bind(plan.transport);
    let Bound { listener, uri, dir } = bound;
    let recv_cancel = Arc::new(multifd::Cancel::new());
    let receiving = start_receiver(
        listener,
        ReceiveOptions {
            config: plan.config(),
            accept_timeout: Some(Duration::from_secs(3)),
            cancel: Some(recv_cancel.clone()),
            ..ReceiveOptions::default()
        },
        Box::new(AnonRam),
    );
    let proxy =
        (plan.cut != Cut::None).then(|| Proxy::start(plan.transport, uri.clone(), plan.cut));
    let target = proxy.as_ref().map_or(uri, |p| p.uri.clone());
    let cancel = Arc::new(Cancel::new());
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let sender = {
        let source = source.clone();
        let opts = SourceOptions {
            config: plan.config(),
            downtime_limit: Duration::ZERO,
            max_rounds: 6,
            on_limit: multifd::OnLimit::Switchover,
            cancel: Some(cancel.clone()),
            ..SourceOptions::default()
        };
        let mut vm = Dirtier {
            calls: 0,
            seed: plan.seed,
            per_call: plan.per_call,
            calls_limit: plan.dirty_calls,
        };
        spawn("send", move || {
            let r = migrate(&target, &source, &mut vm, &opts, &Progress::default());
            let _ = tx.send(r);
        })
    };
    if let Some(after) = plan.cancel_after {
        std::thread::sleep(after);
        cancel.cancel();
    }
    if let Some(after) = plan.cancel_receiver_after {
        std::thread::sleep(after);
        recv_cancel.cancel();
    }
    let deadline = started + RUN_LIMIT;
    let sent = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let received = receiving.wait(deadline.saturating_duration_since(Instant::now()));
    let took = started.elapsed();
    let (sent, received) = match (sent, received) {
        (Ok(s), Some((r, _))) => (s, r),
        (s, r) => {
            let hung = format!(
                "HANG after {took:?}: sender {}, receiver {}",
                if s.is_ok() {
                    "returned"
                } else {
                    "still running"
                },
                if r.is_some() {
                    "returned"
                } else {
                    "still running"
                },
            );
            // Unblock whatever is stuck so the process can go on.
            if let Some(p) = &proxy {
                p.kill_all();
            }
            let s2 = s
                .ok()
                .or_else(|| rx.recv_timeout(Duration::from_secs(10)).ok());
            let r2 = r.or_else(|| receiving.wait(Duration::from_secs(10)));
            return Err(format!(
                "{hung}; after closing the proxy's sockets: sender {:?}, receiver {:?}",
                s2.map(|r| r.map(|_| ())),
                r2.map(|(r, _)| r.map(|_| ()))
            ));
        }
    };
    let cut_done = proxy.as_ref().is_some_and(Proxy::cut_done);
    if let Some(p) = proxy {
        p.finish();
    }
    sender
        .join()
        .map_err(|_| "sender thread panicked".to_string())?;
    receiving
        .handle
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?;
    drop(dir);
    Ok(Ran {
        sent,
        received,
        source,
        took,
        cut_done,
    })
}

/// Checks one run's outcome against the main-stream tail of a clean run;
/// returns a label for the tally.
fn judge(plan: &Plan, ran: &Ran, clean_tail: &[u8]) -> Result<String, String> {
    let sender_ok = match &ran.sent {
        Ok(_) => true,
        Err(Error::Io { .. } | Error::PeerClosed { .. } | Error::Cancelled) => false,
        Err(e) => return Err(format!("sender: unexpected error {e:?}")),
    };
    // Cuts that can end the main stream inside its opaque tail.
    let tail_cut = matches!(
        plan.cut,
        Cut::MainTail { .. } | Cut::AtByte { conn: 0, .. } | Cut::All { .. }
    );
    let receiver_ok = match &ran.received {
        Ok(inc) => {
            if let Some(d) = ram_diff(&ran.source, &inc.ram) {
                return Err(format!("receiver succeeded with different RAM: {d}"));
            }
            // A success has the whole tail: a stream cut inside it (even
            // inside the vmdesc's length) is a failure, never a success.
            if inc.tail != clean_tail {
                return Err(format!(
                    "receiver succeeded with tail {:02x?}, a clean run has {:02x?}",
                    inc.tail, clean_tail
                ));
            }
            true
        }
        Err(Error::PeerClosed { .. } | Error::Io { .. } | Error::HandshakeTimeout { .. }) => false,
        Err(Error::Cancelled) if plan.cancel_receiver_after.is_some() => false,
        // A connection closed on accept leaves a channel missing: the
        // receiver names the channels that never identified themselves.
        Err(Error::Mismatch(m))
            if matches!(plan.cut, Cut::OnAccept { .. })
                && m.contains("multifd channels connected") =>
        {
            false
        }
        // The device-state tail is opaque: a cut inside it is only seen as a
        // tail that does not end properly.
        Err(Error::Wire {
            endpoint: multifd::Endpoint::Main,
            source: multifd_wire::WireError::BadTail { .. },
        }) if tail_cut => false,
        Err(e) => return Err(format!("receiver: unexpected error {e:?}")),
    };
    if receiver_ok && !sender_ok {
        return Err(format!(
            "receiver completed but the sender failed: {:?}",
            ran.sent.as_ref().err()
        ));
    }
    if plan.cancel_after.is_some() && receiver_ok != sender_ok {
        return Err("cancelled run with one side successful".into());
    }
    let kind = match plan.cut {
        Cut::None if plan.cancel_after.is_some() => "cancel",
        Cut::None if plan.cancel_receiver_after.is_some() => "recv cancel",
        Cut::None => "none",
        Cut::OnAccept { .. } => "connect",
        Cut::AtByte { byte, conn } if conn > 0 && byte < 64 => "init packet",
        Cut::AtByte { .. } => "mid-stream",
        Cut::AfterSync { .. } => "at a SYNC",
        Cut::MainTail { .. } => "at completion",
        Cut::All { .. } => "kill all",
    };
    let side = |ok: bool, e: Option<&Error>| {
        if ok {
            "Ok".to_string()
        } else {
            variant(e.expect("error"))
        }
    };
    Ok(format!(
        "{kind:<13} cut={} sender={} receiver={}",
        if ran.cut_done { "y" } else { "n" },
        side(sender_ok, ran.sent.as_ref().err()),
        side(receiver_ok, ran.received.as_ref().err()),
    ))
}

/// Clean loopback migrations: random channel counts (1-16), methods, zero
/// page modes, flush modes, block layouts, transports and dirtying; every
/// one must succeed on both sides with byte-identical RAM.
#[test]
fn clean_runs_are_byte_identical() {
    let _g = serial();
    let seed = seed();
    let runs = env_count("MULTIFD_CLEAN_RUNS", 100);
    let mut rng = Rng::new(seed);
    let base = Baseline::take();
    let started = Instant::now();
    let mut pages = 0;
    for i in 0..runs {
        let plan = Plan::random(&mut rng, 16);
        pages += plan.total_pages();
        let ran = run(&plan).unwrap_or_else(|e| panic!("seed {seed} run {i} {plan:?}: {e}"));
        if let Err(e) = &ran.sent {
            panic!("seed {seed} run {i} {plan:?}: sender: {e}");
        }
        match &ran.received {
            Ok(inc) => {
                if let Some(d) = ram_diff(&ran.source, &inc.ram) {
                    panic!("seed {seed} run {i} {plan:?}: RAM differs: {d}");
                }
            }
            Err(e) => panic!("seed {seed} run {i} {plan:?}: receiver: {e}"),
        }
        assert!(ran.took < FAST, "seed {seed} run {i}: took {:?}", ran.took);
        drop(ran);
        base.check(&format!("seed {seed} clean run {i}"));
    }
    eprintln!(
        "{runs} clean runs ({pages} pages) in {:?}, seed {seed}",
        started.elapsed()
    );
}

/// Random faults: every run ends in time with success or a typed error;
/// a receiver that reports success has exactly the source's RAM; no
/// thread or fd is left behind.
#[test]
fn fault_injection_stress() {
    let _g = serial();
    let seed = seed();
    let runs = env_count("MULTIFD_STRESS_RUNS", 520);
    let mut rng = Rng::new(seed);
    let base = Baseline::take();
    let started = Instant::now();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    // The tail every run's receiver must deliver (no device state).
    let clean_tail = {
        let mut plan = Plan::random(&mut rng, 4);
        plan.cut = Cut::None;
        let ran = run(&plan).unwrap_or_else(|e| panic!("seed {seed} reference run: {e}"));
        let inc = ran
            .received
            .unwrap_or_else(|e| panic!("seed {seed} reference run: {e}"));
        inc.tail.clone()
    };
    base.check("reference run");
    for i in 0..runs {
        let mut plan = Plan::random(&mut rng, 4);
        // Small RAM, short handshake: faults in the accept phase then cost
        // a fraction of a second each.
        plan.handshake = Duration::from_millis(150);
        let n = u64::from(plan.channels);
        let per_conn = plan.total_pages() * 4096 / n + 4096;
        match rng.below(8) {
            0 => {
                plan.cut = Cut::OnAccept {
                    conn: rng.below(n + 1) as usize,
                }
            }
            1 => {
                plan.cut = Cut::AtByte {
                    conn: 1 + rng.below(n) as usize,
                    byte: rng.below(64),
                }
            }
            2 => {
                plan.cut = Cut::AtByte {
                    conn: rng.below(n + 1) as usize,
                    byte: if rng.below(2) == 0 {
                        rng.below(400)
                    } else {
                        64 + rng.below(per_conn)
                    },
                }
            }
            3 => {
                plan.cut = Cut::AfterSync {
                    conn: 1 + rng.below(n) as usize,
                    nth: 1 + rng.below(plan.dirty_calls + 3) as usize,
                }
            }
            4 => {
                plan.cut = Cut::MainTail {
                    hold_back: 1 + rng.below(64) as usize,
                }
            }
            5 => plan.cancel_after = Some(Duration::from_micros(rng.below(30_000))),
            6 => plan.cancel_receiver_after = Some(Duration::from_micros(rng.below(30_000))),
            _ => {
                plan.cut = Cut::All {
                    total: rng.below(per_conn * n),
                }
            }
        }
        match run(&plan) {
            Err(hang) => {
                failures.push(format!("run {i} {plan:?}: {hang}"));
                // A hung run may leave threads behind; stop here.
                break;
            }
            Ok(ran) => {
                if ran.took >= FAST {
                    failures.push(format!("run {i} {plan:?}: took {:?}", ran.took));
                }
                match judge(&plan, &ran, &clean_tail) {
                    Ok(label) => {
                        if ran.took > slowest.0 {
                            slowest = (ran.took, label.clone());
                        }
                        *tally.entry(label).or_default() += 1;
                    }
                    Err(e) => failures.push(format!("run {i} {plan:?}: {e}")),
                }
            }
        }
        base.check(&format!("seed {seed} fault run {i} {plan:?}"));
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{runs} fault runs in {elapsed:?} (slowest {:?}: {}), seed {seed}:",
        slowest.0, slowest.1
    );
    for (label, count) in &tally {
        eprintln!("  {count:4}  {label}");
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failing runs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A batch of 128 pages that are all zero becomes a packet without normal
/// pages, which must carry no payload (`next_packet_size` 0: QEMU asserts
/// it, our receiver refuses anything else), with every method, whether the
/// zero-only packet is a channel's first or follows data.
#[test]
fn zero_only_packets_carry_no_payload() {
    let _g = serial();
    let base = Baseline::take();
    for compression in [Compression::None, Compression::Zlib, Compression::Zstd] {
        for zero_first in [true, false] {
            let mut blocks = vec![("zeros".to_string(), 256), ("data".to_string(), 8)];
            if !zero_first {
                blocks.reverse();
            }
            let plan = Plan {
                transport: Transport::Unix,
                channels: 1,
                compression,
                zero: ZeroPageDetection::Multifd,
                flush: FlushMode::PerRound,
                blocks,
                dirty_calls: 0,
                per_call: 1,
                handshake: Duration::from_secs(5),
                cut: Cut::None,
                cancel_after: None,
                cancel_receiver_after: None,
                seed: 0,
            };
            let ran = run(&plan).unwrap_or_else(|e| panic!("{compression:?}: {e}"));
            let what = format!("{compression:?}, zero-only packet first: {zero_first}");
            match (&ran.sent, &ran.received) {
                (Ok(_), Ok(inc)) => {
                    assert_eq!(ram_diff(&ran.source, &inc.ram), None, "{what}");
                }
                (s, r) => panic!(
                    "{what}: sender {:?}, receiver {:?}",
                    s.as_ref().map(|_| ()),
                    r.as_ref().map(|_| ())
                ),
            }
        }
    }
    base.check("zero-only packets");
}
