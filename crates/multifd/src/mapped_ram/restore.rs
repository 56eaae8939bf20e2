//! Restoring from a mapped-ram file: the structure is read and checked
//! first ([`read_file`]: main stream, layouts, bitmaps, tail), then the
//! present pages are read into guest RAM by N threads, each with its own
//! descriptor: one read per stretch of the pages region of at most
//! [`MAX_READ`], which may step over short holes ([`MAX_HOLE_READ_OVER`]
//! pages) whose bytes are discarded.
//!
//! Where a block is a shared mapping of a file this crate opened (a
//! `--ram` file) that is not populated yet, a stretch is read into a
//! per-thread buffer and its present runs written to the RAM file with
//! `pwrite`: no page of guest RAM is faulted in through the mapping, which
//! on tmpfs would first clear every page the copy then overwrites. With
//! direct-io other blocks are filled from that buffer too, copied into
//! the mapping. Otherwise (anonymous memory, a caller's mapping, a
//! pre-faulted RAM file) a stretch is read straight into the mapping with
//! one `preadv`, the holes' bytes going to a discard buffer. See [`Sink`].
//!
//! Without direct-io a file mostly not in the page cache is read with
//! `O_DIRECT` all the same where its file system allows it, and one mostly
//! cached is read from the cache and left there ([`reading`]). Where a
//! cold file is read through the cache, each stretch, once read, is
//! dropped from it (`POSIX_FADV_DONTNEED`): the file is read once, and its
//! cached copy would take as much memory again as the RAM it restores.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use multifd_wire::PAGE_SIZE_U64;

use super::file;
use super::read::{FileImage, ReadLimits, read_file};
use super::reading::{self, Reading};
use super::{FileOptions, FileUri};
use crate::destination::{Incoming, RamProvider, StreamSetup};
use crate::error::{Error, Result};
use crate::lifecycle::{self, Abort, Cancel};
use crate::ram::{GuestRam, HugeOwnPages, OwnPage, PageRun, RamBlock};
use crate::stats::Progress;
use crate::transport::iov::{IoSlice, IoSliceMut};
use crate::transport::sys;

/// Largest single read, the holes it steps over included: 4 MiB (QEMU
/// reads 1 MiB pieces).
///
/// Larger reads did not help: `O_DIRECT` reads of a 4 GiB mapped-ram file
/// on the ext4 disk here, 4 threads, into huge-page buffers, took 2.11 to
/// 2.36 s in 4 MiB reads, 1.89 to 2.34 s in 8 MiB and 2.07 to 2.11 s in
/// 16 MiB (2026-12-03, load average about 3): no gain the machine's noise
/// lets through, for 4 times the buffer.
pub const MAX_READ: u64 = 4 << 20;

/// Longest hole (run of absent pages, in pages) a read steps over: its
/// bytes are read into a per-thread discard buffer instead of splitting
/// the read in two.
///
/// Images have present pages in short runs between a few zero pages
/// (which are absent from the file), so one read per run of present pages
/// means many small `preadv` calls: each a system call and, with
/// `O_DIRECT`, a device request of its own, which at a few pages costs
/// more than moving up to 64 KiB more bytes. Longer holes are not read:
/// those bytes would cost memory and device bandwidth for nothing.
pub const MAX_HOLE_READ_OVER: u64 = 16;

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
    /// Most guest RAM the file may announce and longest device-state tail
    /// (checked before any RAM is made).
    pub limits: ReadLimits,
    /// Stops the restore from another thread.
    pub cancel: Option<Arc<Cancel>>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            channels: 2,
            file: FileOptions::default(),
            limits: ReadLimits::default(),
            cancel: None,
        }
    }
}

/// One piece of work, on pages `first..first + pages` of block `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// One read from the file: every page is present except the holes
    /// `holes` (indices into [`Plan::holes`]), whose bytes are discarded.
    Read {
        block: usize,
        first: u64,
        pages: u64,
        holes: (usize, usize),
    },
    /// Absent pages made zero (in a block that may hold other data).
    Zero {
        block: usize,
        first: u64,
        pages: u64,
    },
}

impl Piece {
    fn pages(&self) -> u64 {
        match *self {
            Piece::Read { pages, .. } | Piece::Zero { pages, .. } => pages,
        }
    }
}

/// A hole inside a read: `pages` absent pages from page `first` of the
/// block, at most [`MAX_HOLE_READ_OVER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hole {
    first: u64,
    pages: u64,
}

/// What the threads do: the pieces in file order, and the holes the
/// reads step over.
#[derive(Debug, Default)]
struct Plan {
    pieces: Vec<Piece>,
    holes: Vec<Hole>,
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
    let image = read_file(uri, &opts.limits)?;
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
    let plan = plan(image, ram, indices);
    let groups = group(&plan.pieces);
    let next = AtomicUsize::new(0);
    let abort = Abort::new();
    let (reading, files) = reading::open(uri, image, &opts.file, opts.channels)?;
    let sinks: Vec<Sink> = indices
        .iter()
        .map(|&i| Sink::of(&ram.blocks()[i], reading.direct()))
        .collect();
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
                        reading,
                        image,
                        ram,
                        indices,
                        sinks: &sinks,
                        plan: &plan,
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

/// The plan of a restore: for each block, the runs of present pages read
/// in stretches of at most [`MAX_READ`] (stepping over holes of at most
/// [`MAX_HOLE_READ_OVER`] pages), and the absent pages zeroed in blocks
/// that may hold other data.
fn plan(image: &FileImage, ram: &GuestRam, indices: &[usize]) -> Plan {
    let mut out = Plan::default();
    for (i, layout) in image.layouts().iter().enumerate() {
        let zero_absent = !ram.blocks()[indices[i]].starts_zeroed();
        plan_block(
            &mut out,
            i,
            image.bitmap(i).runs(),
            layout.num_pages(),
            zero_absent,
        );
    }
    out
}

/// Adds block `block`'s pieces to `out`: `runs` are its runs of present
/// pages (ascending, disjoint, not touching, within `num_pages`); absent
/// pages become [`Piece::Zero`] when `zero_absent`.
fn plan_block(
    out: &mut Plan,
    block: usize,
    runs: impl Iterator<Item = std::ops::Range<u64>>,
    num_pages: u64,
    zero_absent: bool,
) {
    let max = MAX_READ / PAGE_SIZE_U64;
    // The read being built: its first page, its end, and where its holes
    // start in `out.holes`.
    let mut open: Option<(u64, u64, usize)> = None;
    let close = |out: &mut Plan, open: &mut Option<(u64, u64, usize)>| {
        if let Some((first, end, holes)) = open.take() {
            out.pieces.push(Piece::Read {
                block,
                first,
                pages: end - first,
                holes: (holes, out.holes.len()),
            });
        }
    };
    let mut next = 0;
    for run in runs {
        debug_assert!(next <= run.start && run.start < run.end && run.end <= num_pages);
        if zero_absent && next < run.start {
            out.pieces.push(Piece::Zero {
                block,
                first: next,
                pages: run.start - next,
            });
        }
        let mut k = run.start;
        while k < run.end {
            match open {
                // The hole before `k` is short and the read has room for
                // at least one more page: extend it over the hole.
                Some((first, end, _)) if k - end <= MAX_HOLE_READ_OVER && k - first < max => {
                    if k > end {
                        out.holes.push(Hole {
                            first: end,
                            pages: k - end,
                        });
                    }
                    let n = (run.end - k).min(first + max - k);
                    open = open.map(|(f, _, h)| (f, k + n, h));
                    k += n;
                }
                _ => {
                    close(out, &mut open);
                    let n = (run.end - k).min(max);
                    open = Some((k, k + n, out.holes.len()));
                    k += n;
                }
            }
        }
        next = run.end;
    }
    close(out, &mut open);
    if zero_absent && next < num_pages {
        out.pieces.push(Piece::Zero {
            block,
            first: next,
            pages: num_pages - next,
        });
    }
}

/// The parts of a read of pages `first..first + pages` stepping over
/// `holes` (ascending, inside the read, neither at its start nor at its
/// end), in order: each a range of pages and whether it is present (read
/// for guest RAM) or a hole (its bytes discarded). Together they cover the
/// read exactly once.
fn parts(
    first: u64,
    pages: u64,
    holes: &[Hole],
) -> impl Iterator<Item = (std::ops::Range<u64>, bool)> + '_ {
    let last = Hole {
        first: first + pages,
        pages: 0,
    };
    let mut k = first;
    holes
        .iter()
        .copied()
        .chain(std::iter::once(last))
        .flat_map(move |h| {
            let present = (h.first > k).then_some((k..h.first, true));
            let hole = (h.pages > 0).then_some((h.first..h.first + h.pages, false));
            k = h.first + h.pages;
            present.into_iter().chain(hole)
        })
}

/// Consecutive pieces grouped to about [`GROUP_BYTES`]: `groups[g]..groups[g + 1]`.
fn group(pieces: &[Piece]) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut bytes = 0;
    for (i, p) in pieces.iter().enumerate() {
        bytes += p.pages() * PAGE_SIZE_U64;
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

/// How a block's pages get from the file into guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// Read straight into the mapping, one `preadv` per stretch.
    Mapping,
    /// Read into a per-thread buffer, then each run of present pages
    /// copied into the mapping.
    BufferToMapping,
    /// Read into a per-thread buffer, then each run of present pages
    /// written to the RAM file (its descriptor, the block's offset in it)
    /// with `pwrite`.
    BufferToFile(RawFd, u64),
}

impl Sink {
    /// The cheapest way into `block`:
    ///
    /// * A RAM file of our own whose mapping is not populated: through its
    ///   descriptor. A write fault on a tmpfs mapping first clears the
    ///   page the copy then overwrites; `pwrite` allocates it without.
    /// * Any other block with direct-io: through the buffer, which is in
    ///   huge pages, where the direct reads are much cheaper than into
    ///   guest RAM's small pages (see [`HugeOwnPages`]).
    /// * Otherwise straight into the mapping: one copy, and no writer
    ///   waits for another on a file's inode lock (tmpfs takes it for
    ///   every `pwrite`, and 4 threads on 2 cores spun on it for a quarter
    ///   of a restore into a pre-faulted RAM file).
    fn of(block: &RamBlock, direct: bool) -> Self {
        match block.write_through_file() {
            Some((file, start)) if !block.is_populated() => {
                Self::BufferToFile(file.as_raw_fd(), start)
            }
            _ if direct => Self::BufferToMapping,
            _ => Self::Mapping,
        }
    }
}

/// A buffer for one stretch ([`MAX_READ`]) in huge pages.
fn stretch_buffer() -> Result<HugeOwnPages> {
    HugeOwnPages::try_new((MAX_READ / PAGE_SIZE_U64) as usize).map_err(|e| {
        let e = std::io::Error::new(std::io::ErrorKind::OutOfMemory, e);
        Error::io("allocating a restore buffer", e)
    })
}

struct Loader<'a, 'w> {
    file: File,
    path: &'a Path,
    reading: Reading,
    image: &'a FileImage,
    ram: &'a GuestRam,
    indices: &'a [usize],
    /// Per block of the file: how its pages get there.
    sinks: &'a [Sink],
    plan: &'a Plan,
    groups: &'a [usize],
    next: &'a AtomicUsize,
    abort: &'a Abort<'w>,
    progress: &'a Progress,
}

impl Loader<'_, '_> {
    fn run(self) -> Result<()> {
        // Where the bytes of the holes a read steps over go: anonymous
        // memory (page-aligned, as `O_DIRECT` needs), never guest RAM.
        // Every hole of a read is read into its start; nothing reads it.
        let discard = RamBlock::anonymous("discard", MAX_HOLE_READ_OVER * PAGE_SIZE_U64)?;
        // Where a whole stretch is read before its present runs are
        // written to a RAM file or copied into guest RAM (page-aligned, as
        // `O_DIRECT` needs; in huge pages where the kernel gives them,
        // which makes direct reads much cheaper); made on first use.
        let mut buffer: Option<HugeOwnPages> = None;
        loop {
            if self.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            let g = self.next.fetch_add(1, Ordering::Relaxed);
            if g + 1 >= self.groups.len() {
                return Ok(());
            }
            let pieces = &self.plan.pieces[self.groups[g]..self.groups[g + 1]];
            if !self.reading.direct() {
                // Through the cache: the device reads ahead while this
                // thread copies (a file kept cached may be cached only in
                // part).
                self.read_ahead(pieces);
            }
            for p in pieces {
                match *p {
                    Piece::Read {
                        block,
                        first,
                        pages,
                        holes,
                    } => {
                        let holes = &self.plan.holes[holes.0..holes.1];
                        match self.sinks[block] {
                            Sink::Mapping => self.read(&discard, block, first, pages, holes)?,
                            sink => {
                                if buffer.is_none() {
                                    buffer = Some(stretch_buffer()?);
                                }
                                let buffer = buffer.as_mut().expect("made above");
                                self.copy(buffer, sink, block, first, pages, holes)?;
                            }
                        }
                    }
                    Piece::Zero {
                        block,
                        first,
                        pages,
                    } => {
                        let block = &self.ram.blocks()[self.indices[block]];
                        block.page_run(first * PAGE_SIZE_U64, pages)?.apply_zero()?;
                        self.progress.add(&self.progress.zero_pages, pages);
                    }
                }
            }
        }
    }

    /// Starts reading the file's bytes of `pieces` into the page cache, so
    /// that the device reads ahead while this thread copies.
    fn read_ahead(&self, pieces: &[Piece]) {
        for p in pieces {
            if let Piece::Read {
                block,
                first,
                pages,
                ..
            } = *p
            {
                let at = self.image.layouts()[block].pages_offset() + first * PAGE_SIZE_U64;
                // Advice only: a refusal changes nothing.
                let _ = sys::will_read(self.file.as_raw_fd(), at, pages * PAGE_SIZE_U64);
            }
        }
    }

    /// Reads pages `first..first + pages` of block `block` from the file
    /// with one `preadv`: present pages straight into guest RAM, the
    /// `holes` into `discard`.
    fn read(
        &self,
        discard: &RamBlock,
        block: usize,
        first: u64,
        pages: u64,
        holes: &[Hole],
    ) -> Result<()> {
        let ram = &self.ram.blocks()[self.indices[block]];
        let mut present = Vec::with_capacity(holes.len() + 1);
        let mut iovs = Vec::with_capacity(2 * holes.len() + 1);
        for (part, is_present) in parts(first, pages, holes) {
            if is_present {
                let run = ram.page_run(part.start * PAGE_SIZE_U64, part.end - part.start)?;
                iovs.push(run.io_slice_mut()?);
                present.push(run);
            } else {
                iovs.push(discard.page_run(0, part.end - part.start)?.io_slice_mut()?);
            }
        }
        self.pread(block, first, &mut iovs[..])?;
        drop(iovs);
        for run in &present {
            self.received(run);
        }
        Ok(())
    }

    /// Reads pages `first..first + pages` of block `block` from the file
    /// into `buffer` with one `preadv`, then puts each run of present
    /// pages (those between the `holes`) where `sink` says: one `pwrite`
    /// to the RAM file, or one copy into the mapping. The holes' bytes
    /// never leave the buffer.
    fn copy(
        &self,
        buffer: &mut HugeOwnPages,
        sink: Sink,
        block: usize,
        first: u64,
        pages: u64,
        holes: &[Hole],
    ) -> Result<()> {
        let ram = &self.ram.blocks()[self.indices[block]];
        let stretch = buffer
            .pages_mut()
            .get_mut(..pages as usize)
            .ok_or(Error::Internal("a stretch longer than the restore buffer"))?;
        self.pread(
            block,
            first,
            &mut [IoSliceMut::new(OwnPage::bytes_mut(stretch))],
        )?;
        for (part, is_present) in parts(first, pages, holes) {
            if is_present {
                let run = ram.page_run(part.start * PAGE_SIZE_U64, part.end - part.start)?;
                let from = (part.start - first) as usize;
                let bytes = OwnPage::bytes(&buffer.pages()[from..from + run.pages() as usize]);
                let Sink::BufferToFile(fd, start) = sink else {
                    run.write_from(bytes)?;
                    self.received(&run);
                    continue;
                };
                sys::pwritev_all(fd, start + run.offset(), &mut [IoSlice::new(bytes)]).map_err(
                    |e| {
                        let path = ram.path().unwrap_or(Path::new("?"));
                        // A RAM file on tmpfs may not be reserved (see
                        // `FileRamProvider::written_through_files`).
                        match e.raw_os_error() {
                            Some(libc::ENOSPC | libc::EDQUOT) => Error::NoSpace {
                                path: path.to_owned(),
                                needed: run.len(),
                                source: e,
                            },
                            _ => Error::io(
                                format!("writing pages to RAM file {}", path.display()),
                                e,
                            ),
                        }
                    },
                )?;
                self.received(&run);
            }
        }
        Ok(())
    }

    /// Reads the file's bytes of block `block` from page `first` on into
    /// `iovs`, all of them.
    fn pread(&self, block: usize, first: u64, iovs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let layout = &self.image.layouts()[block];
        let at = layout.pages_offset() + first * PAGE_SIZE_U64;
        let len: u64 = iovs.iter().map(|v| v.len() as u64).sum();
        sys::preadv_exact(self.file.as_raw_fd(), at, iovs).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::IncompleteFile {
                    path: self.path.to_owned(),
                    reason: "became shorter while it was read".into(),
                }
            } else {
                file::direct_io_error(self.path, self.reading.direct(), e, "reading pages from")
            }
        })?;
        if self.reading.drops() {
            // Read once: the file's pages in the page cache would only
            // take memory the guest's RAM needs, and on a host that hands
            // free memory back to its hypervisor, pages freed and taken
            // again at once are much cheaper than pages never used.
            // Advice only: a refusal changes nothing.
            let _ = sys::drop_cached(self.file.as_raw_fd(), at, len);
        }
        Ok(())
    }

    /// Counts `run` in: its pages received, its bytes moved.
    fn received(&self, run: &PageRun<'_>) {
        run.mark_received();
        let pr = self.progress;
        pr.add(&pr.bytes, run.len());
        pr.add(&pr.normal_pages, run.pages());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::Access;
    use proptest::prelude::*;

    /// Each kind of block gets its sink: a new RAM file of ours is
    /// written through its descriptor, a populated one (an existing file,
    /// mapped with `MAP_POPULATE`, or one pre-faulted) and anonymous
    /// memory through the mapping, read into it straight or, with
    /// direct-io, through the huge-page buffer.
    #[test]
    fn each_block_gets_the_cheapest_sink() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64 * PAGE_SIZE_U64;
        let fresh = RamBlock::create_file("fresh", &dir.path().join("fresh"), len).unwrap();
        let existing_path = dir.path().join("existing");
        std::fs::write(&existing_path, vec![1u8; len as usize]).unwrap();
        let existing =
            RamBlock::open_file("existing", &existing_path, Access::ReadWrite, Some(len)).unwrap();
        let mut prefaulted =
            RamBlock::create_file("prefaulted", &dir.path().join("prefaulted"), len).unwrap();
        let anonymous = RamBlock::anonymous("anonymous", len).unwrap();
        for direct in [false, true] {
            let (fd, start) = fresh.write_through_file().unwrap();
            assert_eq!(
                Sink::of(&fresh, direct),
                Sink::BufferToFile(fd.as_raw_fd(), start)
            );
            let mapped = if direct {
                Sink::BufferToMapping
            } else {
                Sink::Mapping
            };
            assert_eq!(Sink::of(&existing, direct), mapped, "existing");
            assert_eq!(Sink::of(&anonymous, direct), mapped, "anonymous");
        }
        assert!(matches!(
            Sink::of(&prefaulted, false),
            Sink::BufferToFile(..)
        ));
        prefaulted.prefault().unwrap();
        assert_eq!(Sink::of(&prefaulted, false), Sink::Mapping);
    }

    /// The runs of `true` in `bits`.
    fn runs(bits: &[bool]) -> Vec<std::ops::Range<u64>> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, &b) in bits.iter().chain(std::iter::once(&false)).enumerate() {
            match (b, start) {
                (true, None) => start = Some(i as u64),
                (false, Some(s)) => {
                    out.push(s..i as u64);
                    start = None;
                }
                _ => {}
            }
        }
        out
    }

    /// Checks a block's plan against its bitmap: every present page read
    /// exactly once into RAM, only absent pages (in short holes) read into
    /// the discard buffer, reads within [`MAX_READ`] starting and ending
    /// on present pages, absent pages zeroed exactly once when asked, and
    /// a new read only where the last one could not go on.
    /// The plan of one block (number `block`) with bitmap `bits`.
    fn plan_of(block: usize, bits: &[bool], zero_absent: bool) -> Plan {
        let mut plan = Plan::default();
        plan_block(
            &mut plan,
            block,
            runs(bits).into_iter(),
            bits.len() as u64,
            zero_absent,
        );
        plan
    }

    fn check(bits: &[bool], zero_absent: bool) {
        let plan = plan_of(7, bits, zero_absent);
        let max = MAX_READ / PAGE_SIZE_U64;
        let mut read = vec![0u32; bits.len()];
        let mut zeroed = vec![0u32; bits.len()];
        let mut last_read: Option<(u64, u64)> = None;
        for p in &plan.pieces {
            match *p {
                Piece::Read {
                    block,
                    first,
                    pages,
                    holes,
                } => {
                    assert_eq!(block, 7);
                    assert!(pages > 0 && pages <= max);
                    let end = first + pages;
                    assert!(bits[first as usize] && bits[end as usize - 1]);
                    let holes = &plan.holes[holes.0..holes.1];
                    let mut k = first;
                    for h in holes {
                        assert!(h.first > k && h.pages > 0 && h.pages <= MAX_HOLE_READ_OVER);
                        assert!(h.first + h.pages < end);
                        for q in h.first..h.first + h.pages {
                            assert!(!bits[q as usize], "present page {q} in a hole");
                        }
                        k = h.first + h.pages;
                    }
                    // The parts cover the read exactly once, in order,
                    // holes exactly where the plan has them.
                    let mut at = first;
                    let mut hole_parts = Vec::new();
                    for (part, is_present) in parts(first, pages, holes) {
                        assert_eq!(part.start, at);
                        assert!(part.end > part.start);
                        if !is_present {
                            hole_parts.push(Hole {
                                first: part.start,
                                pages: part.end - part.start,
                            });
                        }
                        at = part.end;
                    }
                    assert_eq!(at, end);
                    assert_eq!(hole_parts, holes);
                    let in_hole = |q: u64| {
                        holes
                            .iter()
                            .any(|h| (h.first..h.first + h.pages).contains(&q))
                    };
                    for q in first..end {
                        if !in_hole(q) {
                            assert!(bits[q as usize], "absent page {q} read into RAM");
                            read[q as usize] += 1;
                        }
                    }
                    if let Some((f, e)) = last_read {
                        assert!(
                            first - e > MAX_HOLE_READ_OVER || first - f >= max,
                            "read at {first} could have gone on the one at {f}..{e}"
                        );
                    }
                    last_read = Some((first, end));
                }
                Piece::Zero {
                    block,
                    first,
                    pages,
                } => {
                    assert_eq!(block, 7);
                    for q in first..first + pages {
                        zeroed[q as usize] += 1;
                    }
                }
            }
        }
        for (q, &b) in bits.iter().enumerate() {
            assert_eq!(read[q], u32::from(b), "page {q} read");
            assert_eq!(zeroed[q], u32::from(!b && zero_absent), "page {q} zeroed");
        }
    }

    #[test]
    fn holes_at_the_limit_are_read_over_longer_ones_split() {
        let h = MAX_HOLE_READ_OVER as usize;
        // 3 present, a hole at the limit, 2 present, a longer hole, 1.
        let mut bits = vec![true; 3];
        bits.extend(vec![false; h]);
        bits.extend([true, true]);
        bits.extend(vec![false; h + 1]);
        bits.push(true);
        check(&bits, true);
        let plan = plan_of(0, &bits, false);
        assert_eq!(
            plan.pieces,
            [
                Piece::Read {
                    block: 0,
                    first: 0,
                    pages: 5 + h as u64,
                    holes: (0, 1)
                },
                Piece::Read {
                    block: 0,
                    first: 2 * h as u64 + 6,
                    pages: 1,
                    holes: (1, 1)
                },
            ]
        );
        assert_eq!(
            plan.holes,
            [Hole {
                first: 3,
                pages: MAX_HOLE_READ_OVER
            }]
        );
    }

    #[test]
    fn a_long_run_is_cut_at_max_read() {
        let max = (MAX_READ / PAGE_SIZE_U64) as usize;
        let mut bits = vec![true; 2 * max + 3];
        bits[max - 2] = false;
        check(&bits, false);
        check(&bits, true);
        let plan = plan_of(0, &bits, false);
        let sizes: Vec<u64> = plan.pieces.iter().map(Piece::pages).collect();
        assert_eq!(sizes, [max as u64, max as u64, 3]);
    }

    proptest! {
        #[test]
        fn plans_read_each_present_page_once(
            // Run lengths, alternately present and absent, some long.
            lens in proptest::collection::vec(
                prop_oneof![1u64..20, 15u64..19, 1u64..1500], 0..60),
            first_present in any::<bool>(),
            zero_absent in any::<bool>(),
        ) {
            let mut bits = Vec::new();
            let mut here = first_present;
            for n in lens {
                bits.extend(std::iter::repeat_n(here, n as usize));
                here = !here;
            }
            if bits.is_empty() {
                bits.push(false);
            }
            check(&bits, zero_absent);
        }
    }
}
