//! Restoring from a mapped-ram file: the structure is read and checked
//! first ([`read_file`]: main stream, layouts, bitmaps, tail), then the
//! present pages are read straight into guest RAM by N threads, each with
//! its own descriptor, one `preadv` per run of present pages (pieces of at
//! most [`MAX_READ`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use multifd_wire::PAGE_SIZE_U64;

use super::file;
use super::read::{FileImage, read_file};
use super::{FileOptions, FileUri};
use crate::destination::{Incoming, RamProvider, StreamSetup};
use crate::error::{Error, Result};
use crate::lifecycle::{self, Abort, Cancel};
use crate::ram::GuestRam;
use crate::stats::Progress;
use crate::transport::sys;

/// Largest single read: 4 MiB (QEMU reads 1 MiB pieces).
pub const MAX_READ: u64 = 4 << 20;

/// A thread claims pieces in groups of about this many bytes, so that
/// each descriptor reads long stretches of the file in order.
const GROUP_BYTES: u64 = 32 << 20;

/// Options of a restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Threads, each with its own descriptor (QEMU's `multifd-channels`).
    pub channels: u8,
    /// Descriptors and file options.
    pub file: FileOptions,
    /// Most guest RAM the file may announce (checked before any RAM is
    /// made).
    pub max_ram: u64,
    /// Longest device-state tail accepted.
    pub max_tail: usize,
    /// Stops the restore from another thread.
    pub cancel: Option<Arc<Cancel>>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            channels: 2,
            file: FileOptions::default(),
            max_ram: crate::ram::physical_memory(),
            max_tail: 32 << 20,
            cancel: None,
        }
    }
}

/// One piece of work: pages `pages` of block `block`, read from the file
/// (`present`) or made zero.
#[derive(Debug, Clone, Copy)]
struct Piece {
    block: usize,
    first: u64,
    pages: u64,
    present: bool,
}

/// Restores the mapped-ram file `uri` into RAM from `provider` (told the
/// file's blocks like a network receiver's provider): every present page
/// is read into its block; absent pages are zero (written as zero only
/// where the block may hold other data). Returns what a network receiver
/// would: the RAM, the configuration and prefix of the equivalent network
/// stream (without `mapped-ram`), and the tail, so
/// [`snapshot::store`](crate::snapshot::store) can keep it.
///
/// Nothing is written to guest RAM before the whole structure of the file
/// has been read and checked, the tail included.
pub fn restore(
    uri: &FileUri,
    provider: &mut dyn RamProvider,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<Incoming> {
    if opts.channels == 0 {
        return Err(Error::Config("at least one channel is needed".into()));
    }
    let started = Instant::now();
    let image = read_file(uri, opts.max_tail)?;
    let announced = image
        .blocks
        .iter()
        .try_fold(0u64, |sum, b| sum.checked_add(b.used_length))
        .unwrap_or(u64::MAX);
    if announced > opts.max_ram {
        return Err(Error::RamLimit {
            announced,
            limit: opts.max_ram,
        });
    }
    let configuration = image.network_configuration();
    let ram = provider.provide_for(&StreamSetup {
        configuration: &configuration,
        ram_section_id: image.ram_section_id,
        blocks: &image.blocks,
    })?;
    let indices = image
        .blocks
        .iter()
        .map(|info| match ram.find(&info.idstr) {
            Some(i) if ram.blocks()[i].len() == info.used_length => Ok(i),
            _ => Err(Error::Mismatch(format!(
                "the file has RAM block {:?} of {} bytes, which the destination does not have",
                info.idstr, info.used_length
            ))),
        })
        .collect::<Result<Vec<usize>>>()?;
    load_pages(uri, &image, &ram, &indices, opts, progress)?;
    let stats = progress.stats(started.elapsed());
    Ok(Incoming {
        ram,
        prefix: image.network_prefix()?,
        configuration,
        tail: image.tail,
        ram_section_id: image.ram_section_id,
        switchover_start: image.switchover_start,
        flushes: 0,
        stats,
    })
}

/// Reads every present page of `image` into `ram` (block `i` of the file
/// is `ram.blocks()[indices[i]]`) and zeroes absent pages where needed.
pub(crate) fn load_pages(
    uri: &FileUri,
    image: &FileImage,
    ram: &GuestRam,
    indices: &[usize],
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<()> {
    let pieces = plan(image, ram, indices);
    let groups = group(&pieces);
    let next = AtomicUsize::new(0);
    let abort = Abort::new();
    let mut files = Vec::with_capacity(opts.channels.into());
    for _ in 0..opts.channels {
        files.push(file::open_channel(&uri.path, false, opts.file.direct_io)?);
    }
    let result = lifecycle::watched(
        opts.cancel.as_deref(),
        || abort.fail(Error::Cancelled),
        || {
            std::thread::scope(|s| {
                let mut handles = Vec::new();
                for (id, f) in files.into_iter().enumerate() {
                    let worker = Loader {
                        file: f,
                        path: &uri.path,
                        direct: opts.file.direct_io,
                        image,
                        ram,
                        indices,
                        pieces: &pieces,
                        groups: &groups,
                        next: &next,
                        abort: &abort,
                        progress,
                    };
                    match lifecycle::spawn(s, format!("multifd-load-{id}"), &abort, move || {
                        worker.run()
                    }) {
                        Ok(h) => handles.push(h),
                        Err(e) => {
                            abort.fail(e);
                            break;
                        }
                    }
                }
                for h in handles {
                    let _ = h.join();
                }
            });
            Ok(())
        },
    );
    match (result, abort.take_error()) {
        (_, Some(e)) => Err(e),
        (r, None) => r,
    }
}

/// The pieces, in file order: runs of present pages cut at [`MAX_READ`],
/// and runs of absent pages of blocks that may hold other data.
fn plan(image: &FileImage, ram: &GuestRam, indices: &[usize]) -> Vec<Piece> {
    let max = MAX_READ / PAGE_SIZE_U64;
    let mut out = Vec::new();
    for (i, layout) in image.layouts.iter().enumerate() {
        let zero_absent = !ram.blocks()[indices[i]].starts_zeroed();
        let mut push = |first: u64, end: u64, present: bool| {
            let mut k = first;
            while k < end {
                let n = (end - k).min(if present { max } else { u64::MAX });
                out.push(Piece {
                    block: i,
                    first: k,
                    pages: n,
                    present,
                });
                k += n;
            }
        };
        let mut next = 0;
        for run in image.bitmap(i).runs() {
            if zero_absent {
                push(next, run.start, false);
            }
            push(run.start, run.end, true);
            next = run.end;
        }
        if zero_absent {
            push(next, layout.num_pages(), false);
        }
    }
    out
}

/// Consecutive pieces grouped to about [`GROUP_BYTES`]: `groups[g]..groups[g + 1]`.
fn group(pieces: &[Piece]) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut bytes = 0;
    for (i, p) in pieces.iter().enumerate() {
        bytes += p.pages * PAGE_SIZE_U64;
        if bytes >= GROUP_BYTES {
            bounds.push(i + 1);
            bytes = 0;
        }
    }
    if *bounds.last().expect("not empty") != pieces.len() {
        bounds.push(pieces.len());
    }
    bounds
}

struct Loader<'a, 'w> {
    file: File,
    path: &'a Path,
    direct: bool,
    image: &'a FileImage,
    ram: &'a GuestRam,
    indices: &'a [usize],
    pieces: &'a [Piece],
    groups: &'a [usize],
    next: &'a AtomicUsize,
    abort: &'a Abort<'w>,
    progress: &'a Progress,
}

impl Loader<'_, '_> {
    fn run(self) -> Result<()> {
        let fd = self.file.as_raw_fd();
        loop {
            if self.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            let g = self.next.fetch_add(1, Ordering::Relaxed);
            if g + 1 >= self.groups.len() {
                return Ok(());
            }
            for p in &self.pieces[self.groups[g]..self.groups[g + 1]] {
                let block = &self.ram.blocks()[self.indices[p.block]];
                let run = block.page_run(p.first * PAGE_SIZE_U64, p.pages)?;
                if p.present {
                    let layout = &self.image.layouts[p.block];
                    let at = layout.pages_offset() + run.offset();
                    sys::preadv_exact(fd, at, &mut [run.io_slice_mut()?]).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            Error::IncompleteFile {
                                path: self.path.to_owned(),
                                reason: "became shorter while it was read".into(),
                            }
                        } else {
                            file::direct_io_error(self.path, self.direct, e, "reading pages from")
                        }
                    })?;
                    run.mark_received();
                    let pr = self.progress;
                    pr.add(&pr.bytes, run.len());
                    pr.add(&pr.normal_pages, run.pages());
                } else {
                    run.apply_zero()?;
                    self.progress.add(&self.progress.zero_pages, run.pages());
                }
            }
        }
    }
}
