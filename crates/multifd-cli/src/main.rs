//! `multifd`: send, receive, benchmark and inspect QEMU-compatible multifd
//! migrations.

mod bench;
mod demo;
mod image;
mod inspect;
mod progress;
mod rss;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use multifd::snapshot::{self, FileRamProvider};
use multifd::{
    Access, Compression, FlushMode, GuestRam, Listener, MethodConfig, MigrationConfig, Progress,
    RamBlock, RamBlockInfo, RamProvider, ReceiveOptions, SourceOptions, StaticRam, StreamPlan, Uri,
    ZeroPageDetection,
};

/// QEMU 10.0-compatible multifd live migration of guest RAM.
#[derive(Parser, Debug)]
#[command(name = "multifd", version, about, long_about = None)]
struct Cli {
    /// Log filter (e.g. `info`, `multifd=debug`); also `RUST_LOG`.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Migrate RAM images or a stored snapshot to a receiver (ours or a QEMU destination).
    Send(SendArgs),
    /// Receive one migration (from our sender or a QEMU source).
    Receive(ReceiveArgs),
    /// The built-in default job: generate an image, migrate it over loopback, verify it.
    Demo(demo::DemoArgs),
    /// Benchmark a loopback migration of a generated image against a raw TCP blast.
    Bench(bench::BenchArgs),
    /// The sending half of `bench`'s raw TCP blast.
    #[command(hide = true)]
    RawSend(bench::RawArgs),
    /// The receiving half of `bench`'s raw TCP blast.
    #[command(hide = true)]
    RawReceive(bench::RawArgs),
    /// Decode a snapshot directory or a captured stream into a summary.
    Inspect {
        /// Snapshot directory, main-stream capture or multifd-channel capture.
        path: PathBuf,
    },
    /// Write a deterministic guest-RAM-like image (40% zero, 40% compressible, 20% random pages).
    GenImage {
        /// Output file.
        path: PathBuf,
        /// Size, e.g. 512MiB or 4GiB.
        #[arg(long, default_value = "1GiB")]
        size: bytesize::ByteSize,
        /// Seed of the page mix.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressionArg {
    None,
    Zlib,
    Zstd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ZeroArg {
    Multifd,
    Legacy,
    None,
}

/// Parameters both sides must agree on, named like QEMU's.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Number of multifd channels (QEMU `multifd-channels`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// Payload method (QEMU `multifd-compression`).
    #[arg(long, value_enum, default_value = "none")]
    compression: CompressionArg,
    /// zlib level 0-9 (QEMU `multifd-zlib-level`).
    #[arg(long, default_value_t = 1)]
    zlib_level: u32,
    /// zstd level 0-20 (QEMU `multifd-zstd-level`).
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    /// Zero-page detection (QEMU `zero-page-detection`).
    #[arg(long, value_enum, default_value = "multifd")]
    zero_page_detection: ZeroArg,
    /// Sync after every ram section instead of once per round
    /// (QEMU `multifd-flush-after-each-section=on`).
    #[arg(long)]
    flush_after_each_section: bool,
    /// The destination VM's UUID (QEMU `-uuid`); all-zero by default.
    #[arg(long)]
    uuid: Option<String>,
    /// Seconds a connection may take to identify itself.
    #[arg(long, default_value_t = 5.0)]
    handshake_timeout: f64,
    /// Print final statistics as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

impl Common {
    fn config(&self) -> Result<MigrationConfig> {
        let cfg = MigrationConfig {
            channels: self.channels,
            method: MethodConfig {
                compression: match self.compression {
                    CompressionArg::None => Compression::None,
                    CompressionArg::Zlib => Compression::Zlib,
                    CompressionArg::Zstd => Compression::Zstd,
                },
                zlib_level: self.zlib_level,
                zstd_level: self.zstd_level,
            },
            zero_page_detection: match self.zero_page_detection {
                ZeroArg::Multifd => ZeroPageDetection::Multifd,
                ZeroArg::Legacy => ZeroPageDetection::Legacy,
                ZeroArg::None => ZeroPageDetection::None,
            },
            flush_mode: if self.flush_after_each_section {
                FlushMode::PerSection
            } else {
                FlushMode::PerRound
            },
            uuid: match &self.uuid {
                Some(u) => multifd::parse_uuid(u)?,
                None => [0; 16],
            },
            handshake_timeout: Duration::from_secs_f64(self.handshake_timeout),
            connect_timeout: Duration::from_secs(10),
            ..MigrationConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Receiver: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    /// RAM block images, IDSTR=FILE (repeat or comma-separate). With
    /// --snapshot: the files of blocks received outside its directory.
    #[arg(long, value_delimiter = ',', required_unless_present = "snapshot")]
    ram: Vec<String>,
    /// Replay a snapshot directory stored by `receive --snapshot`.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Machine type named in the configuration section (without --snapshot).
    #[arg(long, default_value = "none")]
    machine: String,
    /// Leave out SWITCHOVER_START (for machine types <= 9.2).
    #[arg(long)]
    no_switchover_start: bool,
    /// Seconds to keep retrying a refused connection.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    listen: String,
    /// Put these blocks in these files (mapped shared), IDSTR=FILE.
    #[arg(long, value_delimiter = ',')]
    ram: Vec<String>,
    /// Store the migration here (other blocks as sparse files, manifest, device state).
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Seconds to wait for the first connection (default: forever).
    #[arg(long)]
    accept_timeout: Option<f64>,
    /// Zero and fault in existing --ram files before listening, so zero
    /// pages need no work during the migration (QEMU assumes fresh RAM is zero).
    #[arg(long)]
    prefault: bool,
    #[command(flatten)]
    common: Common,
}

fn parse_ram_args(args: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    for a in args {
        let (id, file) = a
            .split_once('=')
            .with_context(|| format!("--ram {a:?}: expected IDSTR=FILE"))?;
        if id.is_empty() || file.is_empty() {
            bail!("--ram {a:?}: expected IDSTR=FILE");
        }
        if map.insert(id.to_owned(), PathBuf::from(file)).is_some() {
            bail!("--ram names block {id:?} twice");
        }
    }
    Ok(map)
}

/// Runs `work` while a thread draws progress and samples memory.
pub(crate) fn with_progress<T>(
    quiet: bool,
    total: u64,
    f: impl FnOnce(&Progress, &AtomicU64) -> T,
) -> (T, f64) {
    let progress = Progress::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let total = AtomicU64::new(total);
    let rss = rss::RssMeter::default();
    let out = std::thread::scope(|s| {
        let (p, t, r) = (&progress, &total, &rss);
        s.spawn(move || progress::watch(p, done_rx, t, r, quiet));
        let out = f(&progress, &total);
        drop(done_tx);
        out
    });
    (out, rss.peak_mib())
}

fn print_json(role: &str, stats: &multifd::Stats, cfg: &MigrationConfig, rss_mib: f64) {
    let mut v = serde_json::to_value(stats).expect("stats serialise");
    let obj = v.as_object_mut().expect("object");
    obj.insert("role".into(), role.into());
    obj.insert("channels".into(), cfg.channels.into());
    obj.insert("compression".into(), cfg.method.compression.name().into());
    obj.insert("rss_overhead_peak_mib".into(), rss_mib.into());
    obj.insert("vm_hwm_mib".into(), rss::vm_hwm_mib().into());
    // When the migration completed, on the wall clock, so a harness can time
    // completion (as it does a QEMU destination's "completed") apart from
    // process exit, which also tears down the guest RAM mapping.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    obj.insert("completed_unix_s".into(), now.into());
    println!("{v}");
}

pub(crate) fn summary(role: &str, stats: &multifd::Stats, rss_mib: f64) {
    eprintln!(
        "{role}: {} in {:.3} s ({:.0} MiB/s), {} data pages, {} zero pages, {} sync rounds, memory beyond guest RAM {:.1} MiB",
        bytesize::ByteSize(stats.bytes),
        stats.duration_s,
        stats.throughput_mib_s,
        stats.normal_pages,
        stats.zero_pages,
        stats.rounds,
        rss_mib
    );
}

fn run_send(a: SendArgs) -> Result<()> {
    let uri: Uri = a.to.parse()?;
    let mut config = a.common.config()?;
    config.connect_timeout = Duration::from_secs_f64(a.connect_timeout);
    let (ram, plan) = match &a.snapshot {
        Some(dir) => {
            let (ram, plan, _) = snapshot::open(dir, &parse_ram_args(&a.ram)?)
                .with_context(|| format!("opening snapshot {}", dir.display()))?;
            (ram, plan)
        }
        None => {
            let mut ram = GuestRam::new();
            for (id, file) in parse_ram_args(&a.ram)? {
                ram.push(
                    RamBlock::open_file(&id, &file, Access::ReadOnly, None)
                        .with_context(|| format!("opening RAM image {}", file.display()))?,
                )?;
            }
            let plan = StreamPlan {
                machine: a.machine.clone(),
                switchover_start: !a.no_switchover_start,
                ..StreamPlan::default()
            };
            (ram, plan)
        }
    };
    let opts = SourceOptions {
        config: config.clone(),
        plan,
        ..SourceOptions::default()
    };
    let (result, rss_mib) =
        with_progress(a.common.quiet || a.common.json, ram.total_len(), |p, _| {
            multifd::migrate(&uri, &ram, &mut StaticRam, &opts, p)
        });
    let stats = result.with_context(|| format!("migrating to {uri}"))?;
    if a.common.json {
        print_json("send", &stats, &config, rss_mib);
    } else if !a.common.quiet {
        summary("sent", &stats, rss_mib);
    }
    Ok(())
}

fn run_receive(a: ReceiveArgs) -> Result<()> {
    let uri: Uri = a.listen.parse()?;
    let config = a.common.config()?;
    let named = parse_ram_args(&a.ram)?;
    if named.is_empty() && a.snapshot.is_none() {
        bail!("give --ram IDSTR=FILE and/or --snapshot DIR: where should the RAM go?");
    }
    // RAM that exists is mapped (and pre-faulted) before we listen.
    let mut provider = FileRamProvider::new(named, a.snapshot.clone(), a.prefault)
        .context("preparing destination RAM")?;
    let listener = Listener::bind(&uri)?;
    // Scripts wait for this line before starting a source.
    eprintln!("multifd: listening on {}", listener.local_uri()?);
    let opts = ReceiveOptions {
        config: config.clone(),
        accept_timeout: a.accept_timeout.map(Duration::from_secs_f64),
        ..ReceiveOptions::default()
    };
    let (result, rss_mib) = with_progress(a.common.quiet || a.common.json, 0, |p, total| {
        struct Tracking<'a> {
            inner: &'a mut FileRamProvider,
            total: &'a AtomicU64,
        }
        impl RamProvider for Tracking<'_> {
            fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
                let ram = self.inner.provide(blocks)?;
                self.total.store(ram.total_len(), Ordering::Relaxed);
                Ok(ram)
            }
        }
        let mut tracking = Tracking {
            inner: &mut provider,
            total,
        };
        multifd::receive(&listener, &opts, &mut tracking, p)
    });
    let incoming = result.context("receiving a migration")?;
    if let Some(dir) = &a.snapshot {
        snapshot::store(dir, &incoming)
            .with_context(|| format!("storing snapshot in {}", dir.display()))?;
    }
    if a.common.json {
        print_json("receive", &incoming.stats, &config, rss_mib);
    } else if !a.common.quiet {
        summary("received", &incoming.stats, rss_mib);
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Send(a) => run_send(a),
        Cmd::Receive(a) => run_receive(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::RawSend(a) => bench::raw_send(a),
        Cmd::RawReceive(a) => bench::raw_receive(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Inspect { path } => inspect::run(&path),
        Cmd::GenImage { path, size, seed } => {
            image::generate(&path, size.as_u64(), image::Mix::default(), seed)
        }
    }
}

fn main() -> ExitCode {
    rss::record_baseline();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multifd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
