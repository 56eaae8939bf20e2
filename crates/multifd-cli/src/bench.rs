//! `multifd bench`: a loopback migration of a generated image, side by
//! side with a raw TCP blast of the same data bytes over the same number of
//! connections, interleaved, medians of several runs.
//!
//! The migration runs as two processes of this binary (`receive` and
//! `send`), so each reports its own memory. The raw blast runs in this
//! process: N connections, each writing its share of the image's non-zero
//! bytes from the mapped source straight into the mapped, pre-faulted
//! destination, with no headers: the machine's limit for this job.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use multifd::ram::{Access, IoVec, RamBlock};
use multifd::transport::{Connection, Listener, Uri};

use crate::image;

/// Options of `multifd bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Guest RAM size.
    #[arg(long, default_value = "1GiB")]
    size: bytesize::ByteSize,
    /// Number of multifd channels (and raw connections).
    #[arg(long, default_value_t = 4)]
    channels: u8,
    /// Payload method.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Runs of each kind (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// tcp or unix.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Use this image instead of generating one.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Directory for the image and destination files.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Temp files removed on drop.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn free_uri(transport: &str, dir: &std::path::Path, tag: usize) -> Result<Uri> {
    Ok(match transport {
        "tcp" => {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = l.local_addr()?.port();
            Uri::Tcp {
                host: "127.0.0.1".into(),
                port,
            }
        }
        "unix" => Uri::Unix(dir.join(format!("multifd-bench-{}-{tag}.sock", std::process::id()))),
        other => bail!("--transport {other}: expected tcp or unix"),
    })
}

/// Offsets of the non-zero pages of `block`.
fn nonzero_pages(block: &RamBlock) -> Result<Vec<u64>> {
    let mut v = Vec::new();
    for p in 0..block.pages() {
        if !block.is_zero_page(p * 4096)? {
            v.push(p * 4096);
        }
    }
    Ok(v)
}

/// Sends `pages` of `src` into the same offsets of `dst` over `n`
/// connections with plain vectored I/O; returns the elapsed time.
fn raw_blast(
    uri: &Uri,
    src: &RamBlock,
    dst: &RamBlock,
    pages: &[u64],
    n: usize,
) -> Result<Duration> {
    let listener = Listener::bind(uri)?;
    let uri = listener.local_uri()?;
    let share = pages.len().div_ceil(n);
    let chunks: Vec<&[u64]> = pages.chunks(share.max(1)).collect();
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for chunk in &chunks {
            let uri = &uri;
            writers.push(s.spawn(move || -> Result<()> {
                let mut c = Connection::connect(uri, Duration::from_secs(5))?;
                for batch in chunk.chunks(256) {
                    let mut iovs: Vec<IoVec<'_>> = batch
                        .iter()
                        .map(|&o| src.page_iov(o))
                        .collect::<multifd::Result<_>>()?;
                    c.writev_all(&mut iovs)?;
                }
                Ok(())
            }));
        }
        for _ in &chunks {
            let c = listener
                .accept(Some(Duration::from_secs(10)))?
                .context("raw blast: a connection did not arrive")?;
            readers.push(c);
        }
        // Connections arrive in any order; each reader learns its chunk by
        // its first page (the writers send in order).
        let mut handles = Vec::new();
        for mut c in readers {
            let chunks = &chunks;
            handles.push(s.spawn(move || -> Result<()> {
                // Read the first page into a private buffer to find the chunk.
                let mut first = vec![0u8; 4096];
                if !c.read_exact_or_eof(&mut first)? {
                    bail!("raw blast: connection closed early");
                }
                let idx = chunks
                    .iter()
                    .position(|ch| {
                        let mut page = [0u8; 4096];
                        src.read_page(ch[0], &mut page).is_ok() && page[..] == first[..]
                    })
                    .context("raw blast: unknown first page")?;
                dst.write_page(chunks[idx][0], &first)?;
                for batch in chunks[idx][1..].chunks(256) {
                    let mut iovs: Vec<IoVec<'_>> = batch
                        .iter()
                        .map(|&o| dst.page_iov_mut(o))
                        .collect::<multifd::Result<_>>()?;
                    if !c.readv_exact(&mut iovs)? {
                        bail!("raw blast: connection closed early");
                    }
                }
                Ok(())
            }));
        }
        for h in writers.into_iter().chain(handles) {
            h.join()
                .map_err(|_| anyhow::anyhow!("raw blast thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

struct MigrationRun {
    seconds: f64,
    send_rss_mib: f64,
    recv_rss_mib: f64,
}

fn migrate_once(
    args: &BenchArgs,
    uri: &Uri,
    src: &std::path::Path,
    dst: &std::path::Path,
) -> Result<MigrationRun> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let common = |cmd: &mut Command| {
        cmd.args(["--channels", &args.channels.to_string()])
            .args(["--compression", &args.compression])
            .args(["--json", "--quiet"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    };
    let mut recv = Command::new(&exe);
    recv.args([
        "receive",
        "--listen",
        &uri.to_string(),
        "--accept-timeout",
        "30",
        "--prefault",
    ])
    .arg("--ram")
    .arg(format!("m0={}", dst.display()));
    common(&mut recv);
    let mut recv = recv.spawn().context("starting the receiver")?;
    // Its destination RAM is mapped and pre-faulted before it listens; it
    // says so on stderr. Time starts after that, as a QEMU destination's
    // RAM exists before `migrate`.
    let stderr = recv.stderr.take().context("receiver stderr")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stderr_reader = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = ready_tx.send(());
            } else {
                rest.push_str(&line);
                rest.push('\n');
            }
        }
        rest
    });
    if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = recv.kill();
        let _ = recv.wait();
        bail!(
            "receiver did not start: {}",
            stderr_reader.join().unwrap_or_default()
        );
    }
    let start = Instant::now();
    let mut send = Command::new(&exe);
    send.args(["send", "--to", &uri.to_string()])
        .arg("--ram")
        .arg(format!("m0={}", src.display()));
    common(&mut send);
    let send = send.spawn().context("starting the sender")?;
    let send_out = send.wait_with_output()?;
    let recv_out = recv.wait_with_output()?;
    let seconds = start.elapsed().as_secs_f64();
    let recv_err = stderr_reader.join().unwrap_or_default();
    if !send_out.status.success() {
        bail!(
            "sender failed: {}",
            String::from_utf8_lossy(&send_out.stderr).trim()
        );
    }
    if !recv_out.status.success() {
        bail!("receiver failed: {}", recv_err.trim());
    }
    let rss = |out: &std::process::Output| -> f64 {
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["rss_overhead_peak_mib"].as_f64())
            .unwrap_or(f64::NAN)
    };
    Ok(MigrationRun {
        seconds,
        send_rss_mib: rss(&send_out),
        recv_rss_mib: rss(&recv_out),
    })
}

fn same_contents(a: &RamBlock, b: &RamBlock) -> Result<bool> {
    let (mut x, mut y) = ([0u8; 4096], [0u8; 4096]);
    for p in 0..a.pages() {
        a.read_page(p * 4096, &mut x)?;
        b.read_page(p * 4096, &mut y)?;
        if x != y {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    let size = args.size.as_u64();
    let tag = std::process::id();
    let mut scratch = Scratch(Vec::new());
    let src_path = match &args.image {
        Some(p) => p.clone(),
        None => {
            let p = args.dir.join(format!("multifd-bench-{tag}-src.img"));
            scratch.0.push(p.clone());
            eprintln!("generating a {} image in {}", args.size, p.display());
            image::generate(&p, size, image::Mix::default(), 42)?;
            p
        }
    };
    let dst_path = args.dir.join(format!("multifd-bench-{tag}-dst.img"));
    scratch.0.push(dst_path.clone());
    let src = RamBlock::open_file("m0", &src_path, Access::ReadOnly, None)?;
    let pages = nonzero_pages(&src)?;
    let data_bytes = pages.len() as u64 * 4096;
    eprintln!(
        "image: {} pages, {} non-zero ({}); {} channels, compression {}, {} runs each, interleaved",
        src.pages(),
        pages.len(),
        bytesize::ByteSize(data_bytes),
        args.channels,
        args.compression,
        args.runs
    );
    let (mut raw, mut mig, mut srss, mut rrss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        // Raw blast into a pre-faulted destination.
        image::zero_file(&dst_path, src.len())?;
        {
            let mut dst = RamBlock::open_file("m0", &dst_path, Access::ReadWrite, Some(src.len()))?;
            dst.prefault()?;
            let uri = free_uri(&args.transport, &args.dir, 2 * run)?;
            let t = raw_blast(&uri, &src, &dst, &pages, args.channels.into())?;
            raw.push(t.as_secs_f64());
        }
        // Migration into a pre-faulted destination.
        image::zero_file(&dst_path, src.len())?;
        let uri = free_uri(&args.transport, &args.dir, 2 * run + 1)?;
        let m = migrate_once(&args, &uri, &src_path, &dst_path)?;
        if run == 0 {
            let dst = RamBlock::open_file("m0", &dst_path, Access::ReadOnly, Some(src.len()))?;
            if !same_contents(&src, &dst)? {
                bail!("destination RAM differs from the source after the migration");
            }
        }
        eprintln!(
            "run {}: raw {:.3} s, migration {:.3} s",
            run + 1,
            raw[run],
            m.seconds
        );
        mig.push(m.seconds);
        srss.push(m.send_rss_mib);
        rrss.push(m.recv_rss_mib);
    }
    let (raw_m, mig_m) = (median(&mut raw), median(&mut mig));
    let gib = |s: f64| data_bytes as f64 / s / (1u64 << 30) as f64;
    let ratio = raw_m / mig_m;
    let (s_m, r_m) = (
        srss.iter().cloned().fold(0.0, f64::max),
        rrss.iter().cloned().fold(0.0, f64::max),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "size": size, "data_bytes": data_bytes, "channels": args.channels,
                "compression": args.compression, "transport": args.transport, "runs": args.runs,
                "raw_median_s": raw_m, "migration_median_s": mig_m,
                "raw_gib_s": gib(raw_m), "migration_gib_s": gib(mig_m),
                "migration_vs_raw": ratio,
                "send_rss_overhead_peak_mib": s_m, "recv_rss_overhead_peak_mib": r_m,
            })
        );
    }
    eprintln!("                     median s   GiB/s of data");
    eprintln!(
        "raw {} blast      {:>8.3}   {:>6.2}",
        args.transport,
        raw_m,
        gib(raw_m)
    );
    eprintln!("multifd migration    {:>8.3}   {:>6.2}", mig_m, gib(mig_m));
    eprintln!("migration throughput = {:.1}% of raw", ratio * 100.0);
    eprintln!("memory beyond guest RAM (peak): sender {s_m:.1} MiB, receiver {r_m:.1} MiB");
    Ok(())
}
