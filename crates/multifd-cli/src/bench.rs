//! `multifd bench`: a loopback migration of a generated image, side by
//! side with a raw TCP blast of the same number of data bytes over the same
//! number of connections, interleaved, medians of several runs.
//!
//! Both run under the same conditions: two fresh processes of this binary
//! (a receiver whose destination RAM file is mapped and pre-faulted before
//! the sender starts, and a sender that maps the source image), timed from the
//! sender's start until both have exited. The raw blast (`raw-send` /
//! `raw-receive`) moves the image's first *data-bytes* bytes, split in N
//! contiguous pieces, into the destination mapping with plain vectored I/O:
//! no headers, no zero-page scan, no protocol. It reads the source the way
//! the migration's channels do: a file of 4 KiB pages through the file
//! into a 512 KiB buffer, then sent from there; a file on huge pages
//! through its mapping. The difference is what the migration costs beyond moving the
//! bytes. A second blast (`raw-send --read-all`) also reads the
//! rest of the image (as many bytes as it has zero pages) while it sends,
//! reading as much guest RAM as the migration must (a migration cannot know
//! a page is zero without reading all of it): the difference to that one
//! is the protocol alone, and its own ratio to the plain blast is the
//! ceiling for any correct migration of the image. Each side's
//! transfer time measured inside the process (connect to last byte) is
//! reported too, as is each side's memory beyond guest RAM.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use multifd::{Access, Connection, IoSlice, IoSliceMut, Listener, RamBlock, Uri};

use crate::receive::{LISTENING, RAM_READY};
use crate::{image, parse};

/// Options of `multifd bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Guest RAM size, a multiple of 4096 bytes.
    #[arg(long, allow_hyphen_values = true, default_value = "1GiB", value_parser = parse::ram_size)]
    size: bytesize::ByteSize,
    /// Number of multifd channels (and raw connections), 1-255.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// Payload method.
    #[arg(long, default_value = "none", value_parser = ["none", "zlib", "zstd"])]
    compression: String,
    /// Runs of each kind (interleaved), 1-1000; medians are reported. The
    /// machine may be shared and noisy: five is the least that gives a
    /// stable median.
    #[arg(long, allow_negative_numbers = true, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    runs: usize,
    /// tcp or unix.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "unix"])]
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

/// Options of the hidden `raw-send` / `raw-receive` halves of the blast.
#[derive(Args, Debug)]
pub struct RawArgs {
    /// tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    uri: String,
    /// The RAM file (source image or destination).
    #[arg(long)]
    file: PathBuf,
    /// Bytes to move (a multiple of 4096).
    #[arg(long, allow_hyphen_values = true, value_parser = parse::page_bytes)]
    bytes: bytesize::ByteSize,
    /// Connections, 1-255.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=255))]
    connections: usize,
    /// `raw-send` only: also read every byte of the rest of the
    /// file beyond `bytes` (as many bytes as the image has zero pages, which
    /// a migration must read in full), spread evenly over the connections'
    /// sends. The blast then reads as much guest RAM as the
    /// migration does, so what is left between the two is the protocol.
    #[arg(long)]
    read_all: bool,
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

fn free_uri(transport: &str, dir: &Path, tag: usize) -> Result<Uri> {
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

/// The contiguous pieces of `[0, bytes)` each raw connection carries.
fn pieces(bytes: u64, n: usize) -> Vec<(u64, u64)> {
    let pages = bytes / 4096;
    let per = pages.div_ceil(n as u64).max(1);
    (0..pages)
        .step_by(per as usize)
        .map(|p| (p * 4096, (per.min(pages - p)) * 4096))
        .collect()
}

fn io_slices(block: &RamBlock, start: u64, len: u64) -> Result<Vec<IoSlice<'_>>> {
    (0..len / 4096)
        .map(|i| block.page_io_slice(start + i * 4096))
        .collect::<multifd::Result<_>>()
        .map_err(Into::into)
}

fn io_slices_mut(block: &RamBlock, start: u64, len: u64) -> Result<Vec<IoSliceMut<'_>>> {
    (0..len / 4096)
        .map(|i| block.page_io_slice_mut(start + i * 4096))
        .collect::<multifd::Result<_>>()
        .map_err(Into::into)
}

/// Maps and reads every byte of `[start, end)`, as a migration's zero scan
/// reads a zero page (the bytes are not needed, only the memory traffic).
/// The rest of the image beyond the data bytes is as large as its zero
/// pages, so this reads what the migration's scan reads.
fn read_like_a_migration(src: &RamBlock, start: u64, end: u64) -> Result<()> {
    if start >= end {
        return Ok(());
    }
    src.populate_read(start, end - start);
    let mut page = [0u8; 4096];
    for off in (start..end).step_by(4096) {
        src.read_page(off, &mut page)?;
        std::hint::black_box(&page);
    }
    Ok(())
}

/// What one send of the blast moves: 128 pages, a migration's packet.
const CHUNK: u64 = 128 * 4096;

/// One connection of the blast over a file of 4 KiB pages: each 512 KiB
/// of `send` read through the file into a buffer and written from it (as a
/// migration's channel reads such a file), and `extra` read likewise into
/// a second buffer and checked for zeros (as a migration's zero scan
/// reads the image's zero pages), interleaved with the sends.
fn blast_through_file(
    c: &mut Connection,
    file: &std::fs::File,
    (off, len): (u64, u64),
    (roff, rlen): (u64, u64),
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut extra = vec![0u8; CHUNK as usize];
    let chunks = len.div_ceil(CHUNK).max(1);
    let mut read_to = roff;
    let mut read_extra = |from: u64, to: u64| -> Result<()> {
        let mut at = from;
        while at < to {
            let n = (to - at).min(CHUNK) as usize;
            file.read_exact_at(&mut extra[..n], at)?;
            std::hint::black_box(extra[..n].iter().fold(0u8, |acc, &b| acc | b) == 0);
            at += n as u64;
        }
        Ok(())
    };
    for k in 0..chunks {
        let at = off + k * CHUNK;
        let n = (off + len - at).min(CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        c.writev_all(&mut [IoSlice::new(&buf[..n])])?;
        let due = roff + (rlen * (k + 1) / chunks) / 4096 * 4096;
        read_extra(read_to, due)?;
        read_to = due;
    }
    read_extra(read_to, roff + rlen)
}

/// With `--read-all`, the range of `[bytes, len)` that each of `n`
/// connections reads besides its send (empty ranges when there is less).
fn extra_reads(bytes: u64, len: u64, n: usize) -> Vec<(u64, u64)> {
    let rest = len.saturating_sub(bytes);
    if rest == 0 {
        return vec![(0, 0); n];
    }
    pieces(rest, n)
        .into_iter()
        .map(|(o, l)| (bytes + o, l))
        .chain(std::iter::repeat((0, 0)))
        .take(n)
        .collect()
}

/// `raw-send`: the sending half of the raw blast.
pub fn raw_send(a: RawArgs) -> Result<()> {
    let uri: Uri = a.uri.parse()?;
    let src = RamBlock::open_file("raw", &a.file, Access::ReadOnly, None)?;
    let sends = pieces(a.bytes.as_u64(), a.connections);
    let reads = if a.read_all {
        extra_reads(a.bytes.as_u64(), src.len(), sends.len())
    } else {
        vec![(0, 0); sends.len()]
    };
    // Read guest RAM the way the migration does: a file of 4 KiB pages
    // through the file into a buffer, a huge-page one through the mapping.
    let through_file = src.page_size() == 4096;
    let file =
        std::fs::File::open(&a.file).with_context(|| format!("opening {}", a.file.display()))?;
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = sends
            .into_iter()
            .zip(reads)
            .map(|((off, len), (roff, rlen))| {
                let (uri, src, file) = (&uri, &src, &file);
                s.spawn(move || -> Result<()> {
                    let mut c = Connection::connect(uri, Duration::from_secs(5), None)?;
                    c.write_all(&[off.to_be_bytes(), len.to_be_bytes()].concat())?;
                    if through_file {
                        return blast_through_file(&mut c, file, (off, len), (roff, rlen));
                    }
                    let chunks = len.div_ceil(CHUNK).max(1);
                    let mut read_to = roff;
                    // Map each 512 KiB with one call, as the migration's
                    // channels do, so both pay the same for first touches.
                    for (k, chunk) in io_slices(src, off, len)?.chunks_mut(128).enumerate() {
                        src.populate_read(off + k as u64 * CHUNK, chunk.len() as u64 * 4096);
                        c.writev_all(chunk)?;
                        // Interleave the extra reading with the sends.
                        let due = roff + (rlen * (k as u64 + 1) / chunks) / 4096 * 4096;
                        read_like_a_migration(src, read_to, due)?;
                        read_to = due;
                    }
                    read_like_a_migration(src, read_to, roff + rlen)?;
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("raw-send thread panicked"))??;
        }
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({ "duration_s": start.elapsed().as_secs_f64() })
    );
    Ok(())
}

/// `raw-receive`: the receiving half of the raw blast.
pub fn raw_receive(a: RawArgs) -> Result<()> {
    let uri: Uri = a.uri.parse()?;
    let mut dst = RamBlock::open_file("raw", &a.file, Access::ReadWrite, None)?;
    dst.prefault()?;
    let listener = Listener::bind(&uri)?;
    eprintln!("{LISTENING} {}", listener.local_uri()?);
    // Mapped and pre-faulted above, like `receive`'s RAM when it says this.
    eprintln!("{RAM_READY}");
    let mut conns = Vec::new();
    let mut start = None;
    for _ in 0..pieces(a.bytes.as_u64(), a.connections).len() {
        let c = listener
            .accept(Some(Duration::from_secs(30)))?
            .context("raw-receive: a connection did not arrive")?;
        start.get_or_insert_with(Instant::now);
        conns.push(c);
    }
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let dst = &dst;
                s.spawn(move || -> Result<()> {
                    let mut head = [0u8; 16];
                    c.read_exact(&mut head)?;
                    let off = u64::from_be_bytes(head[..8].try_into()?);
                    let len = u64::from_be_bytes(head[8..].try_into()?);
                    for chunk in io_slices_mut(dst, off, len)?.chunks_mut(256) {
                        if !c.readv_exact(chunk)? {
                            bail!("raw-receive: connection closed early");
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("raw-receive thread panicked"))??;
        }
        Ok(())
    })?;
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    println!("{}", serde_json::json!({ "duration_s": secs }));
    Ok(())
}

/// One timed pair of processes.
struct PairRun {
    /// From the sender's start until both exited.
    wall: f64,
    send: serde_json::Value,
    recv: serde_json::Value,
}

fn spawn(exe: &Path, args: &[String]) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

/// Starts the receiver, waits until its RAM is ready (mapped and
/// pre-faulted: it says so after it says it listens), then times the
/// sender's run until both processes have exited.
fn run_pair(recv_args: &[String], send_args: &[String]) -> Result<PairRun> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut recv = spawn(&exe, recv_args)?;
    let stderr = recv.stderr.take().context("receiver stderr")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stderr_reader = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with(RAM_READY) {
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
    let send = spawn(&exe, send_args)?;
    let send_out = send.wait_with_output()?;
    let recv_out = recv.wait_with_output()?;
    let wall = start.elapsed().as_secs_f64();
    let recv_err = stderr_reader.join().unwrap_or_default();
    if !send_out.status.success() {
        let _ = recv_out;
        bail!(
            "sender failed: {}",
            String::from_utf8_lossy(&send_out.stderr).trim()
        );
    }
    if !recv_out.status.success() {
        bail!("receiver failed: {}", recv_err.trim());
    }
    let json = |o: &Output| serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    Ok(PairRun {
        wall,
        send: json(&send_out),
        recv: json(&recv_out),
    })
}

fn same_contents(a: &RamBlock, b: &RamBlock, bytes: u64) -> Result<bool> {
    let (mut x, mut y) = ([0u8; 4096], [0u8; 4096]);
    for p in 0..bytes / 4096 {
        a.read_page(p * 4096, &mut x)?;
        b.read_page(p * 4096, &mut y)?;
        if x != y {
            return Ok(false);
        }
    }
    Ok(true)
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
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
    let (len, data_bytes) = {
        let src = RamBlock::open_file("m0", &src_path, Access::ReadOnly, None)?;
        let mut nonzero = 0u64;
        for p in 0..src.pages() {
            nonzero += u64::from(!src.is_zero_page(p * 4096)?);
        }
        (src.len(), nonzero * 4096)
    };
    eprintln!(
        "image: {} pages, {} of data; {} channels, compression {}, {} runs of each, interleaved",
        len / 4096,
        bytesize::ByteSize(data_bytes),
        args.channels,
        args.compression,
        args.runs
    );
    let ch = args.channels.to_string();
    let (src_s, dst_s) = (
        src_path.display().to_string(),
        dst_path.display().to_string(),
    );
    let (mut raw_w, mut raw_t, mut mig_w, mut mig_t) = (vec![], vec![], vec![], vec![]);
    let (mut rall_w, mut rall_t) = (vec![], vec![]);
    let (mut srss, mut rrss) = (0.0f64, 0.0f64);
    // The page sizes guest RAM is backed with, as each side reports it.
    let (mut spage, mut rpage) = (serde_json::Value::Null, serde_json::Value::Null);
    for run in 0..args.runs {
        image::zero_file(&dst_path, len)?;
        let uri = free_uri(&args.transport, &args.dir, 3 * run)?.to_string();
        let raw = |sub: &str, uri: &str, extra: &[&str]| {
            let mut v = strs(&[sub, "--uri", uri, "--bytes"]);
            v.extend([
                data_bytes.to_string(),
                "--connections".into(),
                ch.clone(),
                "--file".into(),
            ]);
            v.push(if sub == "raw-send" { &src_s } else { &dst_s }.clone());
            v.extend(strs(extra));
            v
        };
        let r = run_pair(&raw("raw-receive", &uri, &[]), &raw("raw-send", &uri, &[]))?;
        raw_w.push(r.wall);
        raw_t.push(r.recv["duration_s"].as_f64().unwrap_or(f64::NAN));

        // The same blast, also reading the rest of guest RAM.
        image::zero_file(&dst_path, len)?;
        let uri = free_uri(&args.transport, &args.dir, 3 * run + 2)?.to_string();
        let ra = run_pair(
            &raw("raw-receive", &uri, &[]),
            &raw("raw-send", &uri, &["--read-all"]),
        )?;
        rall_w.push(ra.wall);
        rall_t.push(ra.recv["duration_s"].as_f64().unwrap_or(f64::NAN));

        image::zero_file(&dst_path, len)?;
        let uri = free_uri(&args.transport, &args.dir, 3 * run + 1)?.to_string();
        let common = strs(&[
            "--channels",
            &ch,
            "--compression",
            &args.compression,
            "--json",
            "--quiet",
        ]);
        let mut recv = strs(&[
            "receive",
            "--listen",
            &uri,
            "--accept-timeout",
            "30",
            "--prefault",
        ]);
        recv.extend(["--ram".into(), format!("m0={dst_s}")]);
        recv.extend(common.clone());
        let mut send = strs(&["send", "--to", &uri, "--ram", &format!("m0={src_s}")]);
        send.extend(common);
        let m = run_pair(&recv, &send)?;
        if run == 0 {
            let a = RamBlock::open_file("m0", &src_path, Access::ReadOnly, None)?;
            let b = RamBlock::open_file("m0", &dst_path, Access::ReadOnly, None)?;
            if !same_contents(&a, &b, len)? {
                bail!("destination RAM differs from the source after the migration");
            }
        }
        mig_w.push(m.wall);
        mig_t.push(m.recv["duration_s"].as_f64().unwrap_or(f64::NAN));
        srss = srss.max(m.send["rss_overhead_peak_mib"].as_f64().unwrap_or(f64::NAN));
        rrss = rrss.max(m.recv["rss_overhead_peak_mib"].as_f64().unwrap_or(f64::NAN));
        spage = m.send["ram_page_size"].clone();
        rpage = m.recv["ram_page_size"].clone();
        eprintln!(
            "run {}: raw {:.3} s (transfer {:.3} s), raw reading all RAM {:.3} s ({:.3} s), migration {:.3} s (transfer {:.3} s)",
            run + 1,
            r.wall,
            raw_t[run],
            ra.wall,
            rall_t[run],
            m.wall,
            mig_t[run]
        );
    }
    let (rw, rt, mw, mt) = (
        median(&mut raw_w),
        median(&mut raw_t),
        median(&mut mig_w),
        median(&mut mig_t),
    );
    let (aw, at) = (median(&mut rall_w), median(&mut rall_t));
    let gib = |s: f64| data_bytes as f64 / s / (1u64 << 30) as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "size": size, "data_bytes": data_bytes, "channels": args.channels,
                "compression": args.compression, "transport": args.transport, "runs": args.runs,
                "raw_median_s": rw, "raw_transfer_median_s": rt,
                "migration_median_s": mw, "migration_transfer_median_s": mt,
                "migration_vs_raw": rw / mw, "migration_vs_raw_transfer": rt / mt,
                "raw_read_all_median_s": aw, "raw_read_all_transfer_median_s": at,
                "migration_vs_raw_read_all": aw / mw,
                "migration_vs_raw_read_all_transfer": at / mt,
                "raw_read_all_vs_raw": rw / aw, "raw_read_all_vs_raw_transfer": rt / at,
                "send_rss_overhead_peak_mib": srss, "recv_rss_overhead_peak_mib": rrss,
                "send_ram_page_size": spage, "recv_ram_page_size": rpage,
            })
        );
    }
    eprintln!("                        processes (s)  GiB/s   transfer only (s)  GiB/s");
    let raw_label = format!("raw {:<4} blast", args.transport);
    for (label, w, t) in [
        (raw_label.as_str(), rw, rt),
        ("raw, reading all RAM", aw, at),
        ("multifd migration", mw, mt),
    ] {
        eprintln!(
            "{label:<24} {w:>8.3}  {:>6.2}   {t:>12.3}      {:>6.2}",
            gib(w),
            gib(t)
        );
    }
    // Throughput ratios are inverse time ratios.
    let (raw, read_all) = (
        ("the raw blast", rw, rt),
        ("the raw blast that also reads all guest RAM", aw, at),
    );
    for (lead, (w, t), (of, of_w, of_t)) in [
        ("migration throughput = ", (mw, mt), raw),
        ("                     = ", (mw, mt), read_all),
        (
            "ceiling: the raw blast that also reads all guest RAM (no protocol) = ",
            (aw, at),
            raw,
        ),
    ] {
        eprintln!(
            "{lead}{:.1}% of {of} (processes), {:.1}% (transfer only)",
            of_w / w * 100.0,
            of_t / t * 100.0
        );
    }
    eprintln!("memory beyond guest RAM (peak): sender {srss:.1} MiB, receiver {rrss:.1} MiB");
    eprintln!(
        "guest RAM page size: sender {spage} bytes, receiver {rpage} bytes (4096 on the wire)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_extra_reads_cover_their_ranges_exactly() {
        for (bytes, len, n) in [
            (40 * 4096, 100 * 4096, 4),
            (4096, 3 * 4096, 4),
            (100 * 4096, 100 * 4096, 3),
            (7 * 4096, 1000 * 4096, 16),
        ] {
            for (ranges, from, to) in [
                (pieces(bytes, n), 0, bytes),
                (extra_reads(bytes, len, n), bytes, len),
            ] {
                assert!(ranges.len() <= n);
                let mut at = from;
                for (o, l) in ranges.into_iter().filter(|&(_, l)| l > 0) {
                    assert_eq!(o, at, "contiguous, in order");
                    assert_eq!(o % 4096, 0);
                    at = o + l;
                }
                assert_eq!(at, to, "bytes {bytes} len {len} n {n}");
            }
        }
    }
}
