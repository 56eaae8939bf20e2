//! The file target on the command line: `send --to file:PATH[,offset=N]
//! --mapped-ram` (save), `receive --listen file:PATH --mapped-ram`
//! (restore), `receive --listen tcp:... --mapped-ram-file PATH` (capture a
//! network migration into a file) and `send --to tcp:...
//! --mapped-ram-file PATH` (play a file to a network destination).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use multifd::mapped_ram::{self, Capture, FileOptions, FileUri, ReadLimits, RestoreOptions};
use multifd::snapshot::{self, FileRamProvider};
use multifd::{
    GuestRam, Listener, MigrationConfig, RamBlockInfo, RamProvider, ReceiveOptions, SourceOptions,
    StaticRam, Uri,
};

use crate::{Common, print_json, summary, with_progress};

/// `file:PATH[,offset=N]` of a `--to` / `--listen`, if it is one.
pub fn target(uri: &str) -> Result<Option<FileUri>> {
    if !uri.starts_with("file:") {
        return Ok(None);
    }
    Ok(Some(uri.parse()?))
}

/// How a mapped-ram file's pages are read and written.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FileIo {
    /// Open the mapped-ram file's channels with O_DIRECT (QEMU's direct-io).
    #[arg(long)]
    pub direct_io: bool,
    /// When reading a mapped-ram file (a restore, or `send --mapped-ram-file`):
    /// read it through the page cache even when it is not cached. Without
    /// it such a file is read with O_DIRECT where its file system allows
    /// it; a file mostly cached is always read from the cache. Saving
    /// ignores it.
    #[arg(long, conflicts_with = "direct_io")]
    pub page_cache: bool,
}

impl FileIo {
    /// The library's file options for these flags.
    pub fn options(&self) -> FileOptions {
        FileOptions {
            direct_io: self.direct_io,
            direct_when_cold: !self.page_cache,
            ..FileOptions::default()
        }
    }
}

fn report(role: &str, stats: &multifd::Stats, cfg: &MigrationConfig, common: &Common, rss: f64) {
    if common.json {
        print_json(role, stats, cfg, rss, None);
    } else if !common.quiet {
        summary(role, stats, rss);
    }
}

/// `send --to file:...`: saves `ram` (images or a snapshot) to the file.
pub fn save(
    target: &FileUri,
    ram: &GuestRam,
    opts: &SourceOptions,
    io: &FileIo,
    common: &Common,
) -> Result<()> {
    let (result, rss) = with_progress(common.quiet || common.json, ram.total_len(), |p, _| {
        mapped_ram::save(target, ram, &mut StaticRam, opts, &io.options(), p)
    });
    let stats = result.with_context(|| format!("saving to {target}"))?;
    report("saved", &stats, &opts.config, common, rss);
    Ok(())
}

/// `send --to tcp:... --mapped-ram-file FILE`: plays the file to `to`.
pub fn play(
    file: &str,
    to: &Uri,
    opts: &SourceOptions,
    io: &FileIo,
    common: &Common,
) -> Result<()> {
    let file: FileUri = file.parse()?;
    let (result, rss) = with_progress(common.quiet || common.json, 0, |p, _| {
        mapped_ram::play(&file, to, opts, &io.options(), &ReadLimits::default(), p)
    });
    let stats = result.with_context(|| format!("sending {file} to {to}"))?;
    report("sent", &stats, &opts.config, common, rss);
    Ok(())
}

/// `receive --listen file:... --mapped-ram`: restores the file into
/// `--ram` files and/or a snapshot directory.
pub fn restore(
    source: &FileUri,
    named: BTreeMap<String, PathBuf>,
    snapshot_dir: Option<PathBuf>,
    opts: &RestoreOptions,
    config: &MigrationConfig,
    common: &Common,
) -> Result<()> {
    if named.is_empty() && snapshot_dir.is_none() {
        bail!("give --ram IDSTR=FILE and/or --snapshot DIR: where should the RAM go?");
    }
    // The restore writes pages through the files' descriptors.
    let mut provider = FileRamProvider::new(named, snapshot_dir.clone(), false)
        .context("preparing destination RAM")?
        .written_through_files();
    let (result, rss) = with_progress(common.quiet || common.json, 0, |p, _| {
        mapped_ram::restore(source, &mut provider, opts, p)
    });
    let incoming = match result {
        Ok(incoming) => incoming,
        Err(e) => {
            provider.discard_created();
            return Err(anyhow::Error::new(e).context(format!("restoring from {source}")));
        }
    };
    if let Some(dir) = &snapshot_dir {
        snapshot::store(dir, &incoming)
            .with_context(|| format!("storing snapshot in {}", dir.display()))?;
    }
    report("restored", &incoming.stats, config, common, rss);
    Ok(())
}

/// `receive --listen tcp:... --mapped-ram-file FILE`: stores the incoming
/// migration as a mapped-ram file.
pub fn capture(
    listener: &Listener,
    file: &str,
    opts: &ReceiveOptions,
    common: &Common,
) -> Result<()> {
    let file: FileUri = file.parse()?;
    let mut capture = Capture::new(file.clone());
    let (result, rss) = with_progress(common.quiet || common.json, 0, |p, total| {
        let mut provider = Counting {
            inner: &mut capture,
            total,
        };
        multifd::receive(listener, opts, &mut provider, p)
    });
    let incoming = match result {
        Ok(i) => i,
        Err(e) => {
            capture.discard();
            return Err(anyhow::Error::new(e).context("receiving a migration"));
        }
    };
    capture
        .finish(&incoming)
        .with_context(|| format!("writing {file}"))?;
    report("captured", &incoming.stats, &opts.config, common, rss);
    Ok(())
}

/// A provider that sets the progress bar's total.
struct Counting<'a> {
    inner: &'a mut Capture,
    total: &'a std::sync::atomic::AtomicU64,
}

impl RamProvider for Counting<'_> {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        self.inner.provide(blocks)
    }

    fn provide_for(&mut self, setup: &multifd::StreamSetup<'_>) -> multifd::Result<GuestRam> {
        let ram = self.inner.provide_for(setup)?;
        self.total
            .store(ram.total_len(), std::sync::atomic::Ordering::Relaxed);
        Ok(ram)
    }
}

/// Most guest RAM `inspect` reads a file's bitmaps for: 4 TiB, 128 MiB of
/// bitmaps (a file's length does not bound them: it may be sparse).
const INSPECT_MAX_RAM: u64 = 4 << 40;

/// `inspect` of a mapped-ram file (`QEVM` and the `mapped-ram`
/// capability): the layout of every block, present pages, the tail.
pub fn inspect(path: &std::path::Path) -> Result<()> {
    let uri = FileUri::new(path);
    let limits = ReadLimits {
        max_ram: INSPECT_MAX_RAM,
        max_tail: 256 << 20,
    };
    let image = mapped_ram::read_file(&uri, &limits)
        .with_context(|| format!("reading {}", path.display()))?;
    println!(
        "mapped-ram file, {} bytes: machine {:?}, capabilities {:?}, uuid {}",
        image.file_len,
        image.configuration.machine,
        image.configuration.capabilities,
        image.configuration.uuid.is_some()
    );
    println!(
        "  ram section id {}, {} PART sections, switchover-start: {}",
        image.ram_section_id, image.parts, image.switchover_start
    );
    println!(
        "  {:<28} {:>12} {:>12} {:>12} {:>12} {:>16}",
        "block", "used_length", "header", "bitmap", "pages", "present"
    );
    for (i, (b, l)) in image.blocks.iter().zip(image.layouts()).enumerate() {
        println!(
            "  {:<28} {:>#12x} {:>#12x} {:>#12x} {:>#12x} {:>9}/{:<6}{}",
            b.idstr,
            b.used_length,
            l.header_offset(),
            l.bitmap_offset(),
            l.pages_offset(),
            image.present_pages(i),
            l.num_pages(),
            if l.is_canonical() {
                ""
            } else {
                " (not QEMU's layout)"
            }
        );
    }
    println!(
        "  device-state tail at {:#x}: {} bytes",
        image.tail_offset,
        image.tail.len()
    );
    Ok(())
}
