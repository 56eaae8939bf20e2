//! `multifd`: send, receive, benchmark and inspect QEMU-compatible multifd
//! migrations.

mod bench;
mod demo;
mod file;
mod image;
mod inspect;
mod parse;
mod pki;
mod progress;
mod receive;
mod report;
mod rss;
mod send;
mod stress;
mod trust;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use multifd::{Compression, FlushMode, MethodConfig, MigrationConfig, Progress, ZeroPageDetection};

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
    Send(send::SendArgs),
    /// Receive one migration (from our sender or a QEMU source).
    Receive(receive::ReceiveArgs),
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
    /// Repeat a scenario (TLS rejection, faults, clean runs) in-process, checking for leaks.
    Stress(stress::StressArgs),
    /// Decode a snapshot directory or a captured stream into a summary.
    Inspect {
        /// Snapshot directory, main-stream capture or multifd-channel capture.
        path: PathBuf,
    },
    /// Write a deterministic guest-RAM-like image (40% zero, 40% compressible, 20% random pages).
    GenImage {
        /// Output file.
        path: PathBuf,
        /// Size, a multiple of 4096 bytes, e.g. 512MiB or 4GiB.
        #[arg(long, allow_hyphen_values = true, default_value = "1GiB", value_parser = parse::ram_size)]
        size: bytesize::ByteSize,
        /// Seed of the page mix.
        #[arg(long, default_value_t = 42, allow_negative_numbers = true)]
        seed: u64,
        /// Mean length of a drawn run of pages of one kind (1: every page
        /// drawn on its own; a guest's RAM has long runs, of zero pages
        /// above all). Runs of the same kind may follow each other.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        run_pages: u32,
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

/// Parameters both sides must agree on, named like QEMU's, and the limits
/// both sides have.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Number of multifd channels, 1-255 (QEMU `multifd-channels`).
    #[arg(long, allow_negative_numbers = true, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// Payload method (QEMU `multifd-compression`).
    #[arg(long, value_enum, default_value = "none")]
    compression: CompressionArg,
    /// zlib level 0-9 (QEMU `multifd-zlib-level`).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    zlib_level: u32,
    /// zstd level 0-20 (QEMU `multifd-zstd-level`).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=20))]
    zstd_level: i32,
    /// Zero-page detection (QEMU `zero-page-detection`).
    #[arg(long, value_enum, default_value = "multifd")]
    zero_page_detection: ZeroArg,
    /// Sync after every ram section instead of once per round
    /// (QEMU `multifd-flush-after-each-section=on`).
    #[arg(long)]
    flush_after_each_section: bool,
    /// The destination VM's UUID (QEMU `-uuid`), 8-4-4-4-12 hex digits;
    /// all-zero by default.
    #[arg(long, allow_hyphen_values = true, value_name = "UUID", value_parser = parse::uuid)]
    uuid: Option<[u8; 16]>,
    /// Seconds a connection may take to identify itself (more than 0).
    #[arg(long, allow_hyphen_values = true, value_name = "SECS", default_value = "5", value_parser = parse::timeout)]
    handshake_timeout: Duration,
    /// Seconds without a byte moving on any connection after which the
    /// migration fails as stalled; 0: never (for a source that pauses).
    #[arg(long, allow_hyphen_values = true, value_name = "SECS", default_value = "60", value_parser = parse::timeout_or_never)]
    idle_timeout: Duration,
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
            uuid: self.uuid.unwrap_or([0; 16]),
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            ..MigrationConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
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

/// Prints the final statistics as one JSON object. `ram_page_size`: the
/// page size guest RAM is backed with here (`GuestRam::page_size`), when
/// this side maps guest RAM.
fn print_json(
    role: &str,
    stats: &multifd::Stats,
    cfg: &MigrationConfig,
    rss_mib: f64,
    ram_page_size: Option<u64>,
) {
    let mut v = serde_json::to_value(stats).expect("stats serialise");
    let obj = v.as_object_mut().expect("object");
    obj.insert("role".into(), role.into());
    if let Some(size) = ram_page_size {
        obj.insert("ram_page_size".into(), size.into());
    }
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Send(a) => send::run(a),
        Cmd::Receive(a) => receive::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::RawSend(a) => bench::raw_send(a),
        Cmd::RawReceive(a) => bench::raw_receive(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Stress(a) => stress::run(a),
        Cmd::Inspect { path } => inspect::run(&path),
        Cmd::GenImage {
            path,
            size,
            seed,
            run_pages,
        } => {
            let mix = image::Mix {
                run_pages,
                ..image::Mix::default()
            };
            image::generate(&path, size.as_u64(), mix, seed)
        }
    }
}

fn main() -> ExitCode {
    rss::record_baseline();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return report::usage(&e),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multifd: error: {}", report::one_line(&e));
            if report::is_usage(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
