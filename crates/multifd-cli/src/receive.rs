//! `multifd receive`: listen at once, then prepare RAM, then receive one
//! migration.
//!
//! The receiver binds and listens before it touches guest RAM, and says so
//! (`multifd: listening on URI`) at once: a source may connect the moment
//! the process runs, and its connections complete in the kernel's backlog
//! (a QEMU `migrate` issued then does not fail). Only then are existing
//! `--ram` files mapped (populated, and with `--prefault` zeroed), which
//! takes seconds for gigabytes; `multifd: RAM ready` says when that is done,
//! and the engine starts accepting. The connections that queued meanwhile
//! are taken in order, and every handshake timeout counts from then.
//!
//! Why not prepare RAM on a thread while the engine already accepts: the
//! mapping is populated in one `mmap` call, which holds the process's
//! memory-map lock for all of it (1.6 s for 4 GiB here, 8 s under load).
//! Every thread the engine starts meanwhile, and every large allocation,
//! waits for that lock, and a handshake deadline armed before the wait
//! then expires with the source's bytes already in the socket: a spurious
//! "no handshake" failure. The engine needs the RAM before it can take any
//! page anyway, so nothing is lost by preparing first: a source that
//! connects early waits in the backlog exactly as long as it would wait for
//! the RAM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use multifd::snapshot::{self, FileRamProvider};
use multifd::{GuestRam, Listener, RamBlockInfo, RamProvider, ReceiveOptions, Uri};

use crate::report::Advice;
use crate::{Common, parse, parse_ram_args, print_json, summary, trust, with_progress};

/// The line scripts wait for before they start a source.
pub const LISTENING: &str = "multifd: listening on";
/// The line that says destination RAM is mapped (and pre-faulted).
pub const RAM_READY: &str = "multifd: RAM ready";

/// Options of `multifd receive`.
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT or unix:PATH; or a mapped-ram file
    /// to restore from, file:PATH[,offset=N] (with --mapped-ram).
    #[arg(long)]
    listen: String,
    /// Put these blocks in these files (mapped shared), IDSTR=FILE.
    #[arg(long, value_delimiter = ',')]
    ram: Vec<String>,
    /// Store the migration here (other blocks as sparse files, manifest, device state).
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Seconds to wait for the first connection (more than 0; default: forever).
    #[arg(long, allow_hyphen_values = true, value_name = "SECS", value_parser = parse::timeout)]
    accept_timeout: Option<Duration>,
    /// Most guest RAM a source may announce, e.g. 8GiB (default: this
    /// host's physical memory); checked before any RAM is created.
    #[arg(long, allow_hyphen_values = true, value_name = "SIZE", value_parser = parse::byte_limit)]
    max_ram: Option<u64>,
    /// Zero and fault in existing --ram files (while already listening), so
    /// zero pages need no work during the migration (QEMU assumes fresh RAM
    /// is zero).
    #[arg(long)]
    prefault: bool,
    /// Read QEMU's mapped-ram file format; needed with --listen file:.
    #[arg(long)]
    mapped_ram: bool,
    /// Store the incoming migration as this mapped-ram file
    /// (PATH or file:PATH[,offset=N]), which a QEMU destination loads with
    /// `migrate-incoming file:PATH` (capabilities mapped-ram and multifd).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["ram", "snapshot", "prefault"])]
    mapped_ram_file: Option<String>,
    #[command(flatten)]
    file_io: crate::file::FileIo,
    #[command(flatten)]
    tls: trust::DestinationTls,
    #[command(flatten)]
    common: Common,
}

/// Runs `multifd receive`.
pub fn run(a: ReceiveArgs) -> Result<()> {
    let config = a.common.config()?;
    let named = parse_ram_args(&a.ram)?;
    if let Some(source) = crate::file::target(&a.listen)? {
        if a.tls.is_set() {
            bail!("TLS is for network connections; a file source is read as is");
        }
        if !a.mapped_ram {
            bail!(
                "--listen file:PATH needs --mapped-ram (the file is read in QEMU's mapped-ram format)"
            );
        }
        let opts = multifd::mapped_ram::RestoreOptions {
            channels: config.channels,
            file: a.file_io.options(),
            limits: multifd::mapped_ram::ReadLimits {
                max_ram: a.max_ram.unwrap_or(ReceiveOptions::default().max_ram),
                ..Default::default()
            },
            ..Default::default()
        };
        return crate::file::restore(
            &source,
            named,
            a.snapshot.clone(),
            &opts,
            &config,
            &a.common,
        );
    }
    let uri: Uri = a.listen.parse()?;
    if named.is_empty() && a.snapshot.is_none() && a.mapped_ram_file.is_none() {
        bail!("give --ram IDSTR=FILE and/or --snapshot DIR: where should the RAM go?");
    }
    // Credentials load before anything listens: a bad file is an error
    // now, not after a source connected.
    let tls = a.tls.server()?;
    let listener = Listener::bind(&uri)?;
    let bound = listener.local_uri()?;
    a.tls.check(&bound)?;
    // Scripts wait for this line before starting a source.
    eprintln!("{LISTENING} {bound}");
    if let Some(file) = &a.mapped_ram_file {
        let defaults = ReceiveOptions::default();
        let opts = ReceiveOptions {
            config: config.clone(),
            accept_timeout: a.accept_timeout,
            max_ram: a.max_ram.unwrap_or(defaults.max_ram),
            tls,
            tls_clean_termination: a.tls.clean_termination(),
            ..defaults
        };
        eprintln!("{RAM_READY} (0.000 s)");
        return crate::file::capture(&listener, file, &opts, &a.common);
    }
    let started = Instant::now();
    let mut ram = FileRamProvider::new(named, a.snapshot.clone(), a.prefault)
        .context("preparing destination RAM")?;
    let prepared = started.elapsed();
    tracing::info!(
        secs = prepared.as_secs_f64(),
        prefault = a.prefault,
        "destination RAM prepared"
    );
    eprintln!("{RAM_READY} ({:.3} s)", prepared.as_secs_f64());
    let defaults = ReceiveOptions::default();
    let opts = ReceiveOptions {
        config: config.clone(),
        // The first connection may have queued while RAM was prepared.
        accept_timeout: a
            .accept_timeout
            .map(|t| t.saturating_sub(prepared).max(Duration::from_millis(1))),
        max_ram: a.max_ram.unwrap_or(defaults.max_ram),
        tls,
        tls_clean_termination: a.tls.clean_termination(),
        ..defaults
    };
    let mut unplaced = None;
    let (result, rss_mib) = with_progress(a.common.quiet || a.common.json, 0, |p, total| {
        let mut provider = Provider {
            ram: &mut ram,
            total,
            unplaced: &mut unplaced,
        };
        multifd::receive(&listener, &opts, &mut provider, p)
    });
    let incoming = match result {
        Ok(incoming) => incoming,
        Err(e) => {
            ram.discard_created();
            let e = anyhow::Error::new(e);
            return Err(match unplaced {
                Some(name) => e.context(Advice {
                    context: "receiving a migration".into(),
                    hint: format!(
                        "the source has a RAM block {name:?}: give it a file with \
                         --ram {name}=FILE, or keep the blocks without one in a \
                         snapshot with --snapshot DIR"
                    ),
                }),
                None => e.context("receiving a migration"),
            });
        }
    };
    if let Some(dir) = &a.snapshot {
        snapshot::store(dir, &incoming)
            .with_context(|| format!("storing snapshot in {}", dir.display()))?;
    }
    if a.common.json {
        print_json(
            "receive",
            &incoming.stats,
            &config,
            rss_mib,
            Some(incoming.ram.page_size()),
        );
    } else if !a.common.quiet {
        summary("received", &incoming.stats, rss_mib);
    }
    Ok(())
}

/// What the engine sees: the prepared RAM, plus the progress bar's total
/// and the name of a block there was no place for.
struct Provider<'a> {
    ram: &'a mut FileRamProvider,
    total: &'a AtomicU64,
    unplaced: &'a mut Option<String>,
}

impl RamProvider for Provider<'_> {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        match self.ram.provide(blocks) {
            Ok(ram) => {
                self.total.store(ram.total_len(), Ordering::Relaxed);
                Ok(ram)
            }
            Err(e) => {
                // Here (and only here) an unknown block is ours to place,
                // not a peer's mistake: the CLI knows which flags place it.
                if let multifd::Error::UnknownBlock { name, .. } = &e {
                    *self.unplaced = Some(name.clone());
                }
                Err(e)
            }
        }
    }
}
