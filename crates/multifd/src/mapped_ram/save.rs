//! Saving to a mapped-ram file: the source's round driver, with channel
//! threads that write runs of pages in place (`pwritev`, each on its own
//! descriptor) and a main-stream writer that lays the stream out in the
//! file.
//!
//! The driver writes an ordinary precopy main stream; [`FileOut`] decodes
//! it (the wire crate's `Decoder`) and writes the mapped-ram file's main
//! stream instead: the configuration with the `mapped-ram` capability,
//! the block list with each block's header and a jump over its bitmap and
//! pages regions, no `MULTIFD_FLUSH` records, each block's bitmap inside
//! the `ram` END section, then the device state verbatim. At the end of
//! each chunk of the `ram` section it waits until every channel has
//! written the chunk's pages (QEMU's local sync), so a page is never being
//! written by two rounds at once, and the bitmaps go out only once every
//! page is in place: an interrupted save leaves a file without its tail,
//! which every reader refuses.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use multifd_wire::PAGE_SIZE_U64;
use multifd_wire::mapped_ram::BlockLayout;
use multifd_wire::packet::Compression;
use multifd_wire::stream::{Decoded, Decoder, Event, encode};

use super::bitmap::AtomicBitmap;
use super::file::{self, FileStream};
use super::write_behind::{self, WriteBehind};
use super::{FileOptions, FileUri};
use crate::config::ZeroPageDetection;
use crate::error::{Error, Result};
use crate::lifecycle::{self, Abort, Watchdog};
use crate::ram::{self, GuestRam, PageBatch, RamBlock, StagedRun, Staging};
use crate::source::rate_limit::RateLimiter;
use crate::source::{
    self, Driver, Job, JobQueue, MainStream, SourceOptions, SourceVm, StreamOut, SyncsWritten,
    VmMarks,
};
use crate::stats::{Progress, Stats};
use crate::transport::iov::IoSlice;
use crate::transport::sys;

/// Pages per batch handed to a channel: 4 MiB, so a run of present pages
/// is one `pwritev` of up to 4 MiB (QEMU's jobs are 512 KiB).
const BATCH_PAGES: usize = 1024;

/// Most pages read from a RAM file at once before they are written (see
/// [`PageWriter::copy`]): 256 KiB, so that the buffer is still in the
/// core's cache when the write copies it out again (a batch is 4 MiB).
const COPY_PAGES: usize = 64;

/// Most pages read from a RAM file at once with direct-io: 2 MiB, one huge
/// page of the staging buffer ([`Staging::in_huge_pages`]). A direct write
/// copies nothing through the core's cache, and longer writes are fewer,
/// larger device requests (a 4 GiB image saved in 2.01-2.22 s against
/// 2.60-3.07 s with [`COPY_PAGES`] from the same buffer).
const DIRECT_COPY_PAGES: usize = 512;

/// Longest run of zero pages (scanned, in a buffer) a write goes on over
/// on a file system with unwritten extents (see [`PageWriter::copy`]):
/// the zero bytes are written, the pages' bits stay clear. Each separate
/// write into a reserved (unwritten) extent converts and splits it, and
/// an image's data pages come in runs of a few pages between short runs
/// of zero pages, so one write per run costs ext4 more than the zero bytes
/// do; with direct I/O each write is also a device request of its own. A
/// restore reads over holes this short anyway
/// ([`super::MAX_HOLE_READ_OVER`]).
const WRITE_OVER_ZEROS: u64 = 16;

/// Saves `ram` (and whatever `vm` adds: a running guest's dirty pages,
/// device state) to the mapped-ram file `target`, as QEMU's `migrate
/// file:` with the `mapped-ram` capability would, over
/// `opts.config.channels` channels (each its own descriptor).
///
/// The rounds are the network source's ([`crate::migrate`]'s driver and
/// options: downtime limit, rounds, the stream plan); a page dirtied again
/// is rewritten in place. Zero pages are not written: their bit stays
/// clear and they remain holes. Compression is refused (QEMU refuses it
/// with mapped-ram). On failure the file is removed (or, with an offset,
/// cut back to it).
pub fn save(
    target: &FileUri,
    ram: &GuestRam,
    vm: &mut dyn SourceVm,
    opts: &SourceOptions,
    file_opts: &FileOptions,
    progress: &Progress,
) -> Result<Stats> {
    opts.config.validate()?;
    if opts.config.method.compression != Compression::None {
        return Err(Error::Config(
            "a mapped-ram file holds pages uncompressed (QEMU refuses compression with mapped-ram)"
                .into(),
        ));
    }
    if ram.blocks().is_empty() {
        return Err(Error::Config("no RAM blocks to save".into()));
    }
    let started = Instant::now();
    let (main, ours) = file::create(target)?;
    let abort = Abort::new();
    let shared = Shared::new(ram, opts.config.channels.into());
    abort.register_waker(&shared.syncs);
    let result = lifecycle::watched(
        opts.cancel.as_deref(),
        || abort.fail(Error::Cancelled),
        || {
            save_inner(
                target, &main, ram, vm, opts, file_opts, progress, &abort, &shared,
            )
        },
    );
    let result = match (result, abort.take_error()) {
        (_, Some(first)) => Err(first),
        (r, None) => r,
    };
    match result {
        Ok(()) => Ok(progress.stats(started.elapsed())),
        Err(e) => {
            // The source's RAM is not a mapping of this file.
            file::discard(target, &main, ours, false);
            Err(e)
        }
    }
}

/// What the channel threads and the main-stream writer share.
struct Shared {
    /// Each block's layout, once the block list is written.
    layouts: OnceLock<Vec<BlockLayout>>,
    /// One bitmap per block.
    bitmaps: Vec<AtomicBitmap>,
    /// SYNC jobs done by all channels; woken by the abort path.
    syncs: SyncsWritten,
    channels: u64,
}

impl Shared {
    fn new(ram: &GuestRam, channels: u64) -> Self {
        Self {
            layouts: OnceLock::new(),
            bitmaps: ram
                .blocks()
                .iter()
                .map(|b| AtomicBitmap::new(b.len()))
                .collect(),
            syncs: SyncsWritten::default(),
            channels,
        }
    }

    /// Waits until every channel has done `chunks` SYNCs.
    fn wait_chunks(&self, chunks: u64) -> Result<()> {
        self.syncs.wait_for(chunks * self.channels)
    }
}

#[allow(clippy::too_many_arguments)]
fn save_inner(
    target: &FileUri,
    main: &File,
    ram: &GuestRam,
    vm: &mut dyn SourceVm,
    opts: &SourceOptions,
    file_opts: &FileOptions,
    progress: &Progress,
    abort: &Abort<'_>,
    shared: &Shared,
) -> Result<()> {
    let path = &target.path;
    let detect = opts.config.zero_page_detection != ZeroPageDetection::None;
    // tmpfs: its pages are the file, nothing to write over or write back.
    let tmpfs = ram::is_tmpfs(main);
    let over_zeros = !tmpfs;
    let write_behind = !tmpfs && !file_opts.direct_io;
    let mut writers = Vec::with_capacity(shared.channels as usize);
    let created = file::FileId::of(main, path)?;
    for id in 0..opts.config.channels {
        writers.push(PageWriter {
            id,
            file: file::open_channel(path, true, file_opts.direct_io, created)?,
            path: path.clone(),
            direct: file_opts.direct_io,
            ram,
            shared,
            detect,
            over_zeros,
            write_behind,
            progress,
        });
    }
    let out = FileOut {
        stream: FileStream::new(
            main.try_clone()
                .map_err(|e| Error::io("duplicating a file descriptor", e))?,
            path,
            target.offset,
        ),
        decoder: Decoder::new(),
        pending: Vec::new(),
        tail: false,
        section: None,
        chunks: 0,
        in_end: false,
        ram,
        shared,
        reserve: file_opts.reserve,
    };
    let watchdog = Watchdog::new(None);
    let limiter = RateLimiter::new(opts.max_bandwidth);
    let marks = VmMarks::default();
    let started = Instant::now();
    std::thread::scope(|s| {
        let (dispatcher, queues) = source::queues(writers.len(), source::QUEUE_DEPTH);
        let mut handles = Vec::new();
        let mut spawned = Ok(());
        for (w, jobs) in writers.into_iter().zip(queues) {
            match lifecycle::spawn(s, format!("multifd-file-{}", w.id), abort, move || {
                w.run(jobs)
            }) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawned = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = spawned {
            abort.fail(e);
            drop(dispatcher);
            for h in handles {
                let _ = h.join();
            }
            return;
        }
        let driver = Driver {
            ram,
            opts,
            dispatcher,
            main: MainStream::to(Box::new(out), opts.plan.ram_section_id, progress),
            progress,
            cancel: opts.cancel.as_deref(),
            watchdog: &watchdog,
            limiter: &limiter,
            syncs: &shared.syncs,
            syncs_due: 0,
            channels: shared.channels,
            started,
            marks: &marks,
            batch_pages: BATCH_PAGES,
        };
        driver.run_to_end(vm, abort, handles, || {});
    });
    Ok(())
}

/// One channel: writes the runs of present pages of each batch at their
/// place in the file, and keeps the bitmap.
struct PageWriter<'a> {
    id: u8,
    file: File,
    path: PathBuf,
    direct: bool,
    ram: &'a GuestRam,
    shared: &'a Shared,
    detect: bool,
    /// Writes go on over short runs of zero pages ([`WRITE_OVER_ZEROS`]):
    /// not on tmpfs (the zero pages would take memory). With direct I/O
    /// too: fewer, longer device requests outweigh the zero bytes (a 4 GiB
    /// image saved in 0.44x of the time).
    over_zeros: bool,
    /// Buffered writes to a file system with a page cache of its own:
    /// writeback is started and awaited by the channel ([`WriteBehind`]).
    write_behind: bool,
    progress: &'a Progress,
}

impl PageWriter<'_> {
    fn run(self, jobs: JobQueue<'_>) -> Result<()> {
        let mut offsets = Vec::with_capacity(BATCH_PAGES);
        // Where pages of a RAM file are read before they are written (see
        // [`PageWriter::copy`]); it grows on first use. Direct writes go
        // from huge pages (measured: a 4 GiB image saved in about 0.8x of
        // the time it took from the heap's small pages).
        let mut staging = if self.direct {
            Staging::in_huge_pages()
        } else {
            Staging::default()
        };
        let mut behind = self
            .write_behind
            .then(|| WriteBehind::new(self.file.as_raw_fd(), write_behind::IN_FLIGHT));
        while let Some(job) = jobs.next() {
            match job {
                Job::Pages(batch) => {
                    if batch.as_list().block().read_through_file().is_some() {
                        self.copy(&batch, &mut staging)?;
                    } else {
                        self.write(&batch, &mut offsets)?;
                    }
                    if let Some(behind) = behind.as_mut() {
                        let range = self.file_range(&batch)?;
                        behind.written(range).map_err(|e| self.write_error(e))?;
                    }
                }
                Job::Sync => {
                    if let Some(behind) = behind.as_mut() {
                        behind.finish().map_err(|e| self.write_error(e))?;
                    }
                    self.shared.syncs.add();
                }
            }
        }
        Ok(())
    }

    /// The bytes of the file that hold `batch`'s pages (from its first page
    /// to its last).
    fn file_range(&self, batch: &PageBatch<'_>) -> Result<Range<u64>> {
        let list = batch.as_list();
        let (layout, _) = self.place(list.block())?;
        let offsets = list.offsets();
        let (Some(&first), Some(&last)) = (offsets.iter().min(), offsets.iter().max()) else {
            return Ok(0..0);
        };
        Ok(layout.pages_offset() + first..layout.pages_offset() + last + PAGE_SIZE_U64)
    }

    fn write_error(&self, e: std::io::Error) -> Error {
        file::direct_io_error(&self.path, self.direct, e, "writing pages to")
    }

    /// The layout and bitmap of `block`.
    fn place(&self, block: &RamBlock) -> Result<(&BlockLayout, &AtomicBitmap)> {
        let index = block_index(self.ram, block)?;
        let layout = self
            .shared
            .layouts
            .get()
            .and_then(|l| l.get(index))
            .ok_or(Error::Internal("pages before the block list"))?;
        Ok((layout, &self.shared.bitmaps[index]))
    }

    /// Writes `bytes` (pages `offset..` of the block) at their place in
    /// the file.
    fn pwrite(&self, layout: &BlockLayout, offset: u64, bytes: IoSlice<'_>) -> Result<()> {
        let at = layout.pages_offset() + offset;
        sys::pwritev_all(self.file.as_raw_fd(), at, &mut [bytes])
            .map_err(|e| file::direct_io_error(&self.path, self.direct, e, "writing pages to"))
    }

    /// Most pages [`PageWriter::copy`] reads at once.
    fn copy_pages(&self) -> usize {
        if self.direct {
            DIRECT_COPY_PAGES
        } else {
            COPY_PAGES
        }
    }

    /// Writes a batch of a block backed by a file this crate mapped: each
    /// stretch of consecutive pages (at most [`PageWriter::copy_pages`]) is read with
    /// one `pread` into `staging`, scanned there, and its runs of data
    /// pages written from it, so the guest's mapping is never faulted in
    /// (on tmpfs that costs more than the extra copy through a buffer the
    /// cache holds). Where `over_zeros`, a write goes on over runs of at
    /// most [`WRITE_OVER_ZEROS`] zero pages between data pages.
    fn copy(&self, batch: &PageBatch<'_>, staging: &mut Staging) -> Result<()> {
        let list = batch.as_list();
        let block = list.block();
        let (layout, bitmap) = self.place(block)?;
        let offsets = list.offsets();
        let (mut normal, mut zero) = (0u64, 0u64);
        let mut i = 0;
        while i < offsets.len() {
            // Pages known to be zero are not read.
            if self.detect && batch.is_known_zero(i) {
                bitmap.set_range(offsets[i] / PAGE_SIZE_U64, 1, false);
                zero += 1;
                i += 1;
                continue;
            }
            let first = offsets[i];
            let n = staging
                .read_stretch(batch, i, self.copy_pages(), self.detect)
                .ok_or(Error::Internal("a RAM file that cannot be read"))?
                .map_err(|e| {
                    let path = block.path().unwrap_or(Path::new("?")).display();
                    Error::io(format!("reading RAM file {path}"), e)
                })?;
            i += n;
            // The pending write is pages `from..to` of the stretch, from a
            // data page to a data page.
            let flush = |pages: Range<usize>| -> Result<()> {
                let at = first + pages.start as u64 * PAGE_SIZE_U64;
                self.pwrite(layout, at, staging.run_bytes(pages))
            };
            let mut pending: Option<Range<usize>> = None;
            for StagedRun { pages, zero: z } in staging.runs(n, self.detect) {
                let m = pages.len() as u64;
                let page = first / PAGE_SIZE_U64 + pages.start as u64;
                if z {
                    zero += m;
                } else {
                    normal += m;
                    self.progress.add(&self.progress.bytes, m * PAGE_SIZE_U64);
                    pending = match pending {
                        // Over the short run of zero pages since the last
                        // data: their bytes (zero, as scanned) are written
                        // too, their bit stays clear.
                        Some(w)
                            if self.over_zeros
                                && (pages.start - w.end) as u64 <= WRITE_OVER_ZEROS =>
                        {
                            Some(w.start..pages.end)
                        }
                        other => {
                            if let Some(w) = other {
                                flush(w)?;
                            }
                            Some(pages)
                        }
                    };
                }
                bitmap.set_range(page, m, !z);
            }
            if let Some(w) = pending {
                flush(w)?;
            }
        }
        let p = self.progress;
        p.add(&p.normal_pages, normal);
        p.add(&p.zero_pages, zero);
        Ok(())
    }

    fn write(&self, batch: &PageBatch<'_>, offsets: &mut Vec<u64>) -> Result<()> {
        let list = batch.as_list();
        let (layout, bitmap) = self.place(list.block())?;
        batch.populate_read(self.detect);
        let (sorted, normal) = batch.zero_pages_last(self.detect, offsets);
        let (data, zeros) = sorted.split_at(normal);
        for run in data.runs() {
            self.pwrite(layout, run.offset(), run.io_slice())?;
            bitmap.set_range(run.offset() / PAGE_SIZE_U64, run.pages(), true);
            self.progress.add(&self.progress.bytes, run.len());
        }
        for run in zeros.runs() {
            bitmap.set_range(run.offset() / PAGE_SIZE_U64, run.pages(), false);
        }
        let p = self.progress;
        p.add(&p.normal_pages, normal as u64);
        p.add(&p.zero_pages, (sorted.len() - normal) as u64);
        Ok(())
    }
}

/// Index of `block` in `ram` (the blocks of a batch are `ram`'s own).
fn block_index(ram: &GuestRam, block: &RamBlock) -> Result<usize> {
    ram.blocks()
        .iter()
        .position(|b| std::ptr::eq(b, block))
        .ok_or(Error::Internal(
            "a batch of a block that is not being saved",
        ))
}

/// The main-stream writer: the driver's precopy stream in, the mapped-ram
/// file's main stream out (see the module documentation).
struct FileOut<'a> {
    stream: FileStream,
    decoder: Decoder,
    /// Bytes not decoded yet.
    pending: Vec<u8>,
    /// After the first device section: everything is copied as it is.
    tail: bool,
    section: Option<u32>,
    /// `ram` chunks closed so far (each ends with a SYNC on every channel).
    chunks: u64,
    in_end: bool,
    ram: &'a GuestRam,
    shared: &'a Shared,
    reserve: bool,
}

impl FileOut<'_> {
    fn path(&self) -> PathBuf {
        self.stream.path().to_owned()
    }

    fn section(&self) -> Result<u32> {
        self.section
            .ok_or(Error::Internal("a ram chunk before the ram START"))
    }

    fn event(&mut self, event: Event<'_>) -> Result<()> {
        match event {
            Event::Header => {}
            Event::Configuration(cfg) => self.stream.prefix(&cfg)?,
            Event::RamStart { section_id } => self.section = Some(section_id),
            Event::MemSize { blocks } => {
                if blocks != self.ram.block_infos() {
                    return Err(Error::Internal("the block list is not the RAM's"));
                }
                let section = self.section()?;
                let layouts = self.stream.ram_start(section, &blocks)?;
                if self.reserve {
                    self.reserve_space(&layouts)?;
                }
                self.shared
                    .layouts
                    .set(layouts)
                    .map_err(|_| Error::Internal("a second block list"))?;
            }
            // A file has no sync records: its syncs are local.
            Event::Flush => {}
            Event::Zero { block, offset } => {
                let index = self
                    .ram
                    .find(&block)
                    .ok_or(Error::Internal("a ZERO record of an unknown block"))?;
                self.shared.bitmaps[index].set_range(offset / PAGE_SIZE_U64, 1, false);
            }
            Event::Page { .. } => {
                return Err(Error::Internal("a PAGE record in a multifd stream"));
            }
            Event::Eos => {
                // Every channel has written this chunk's pages once its
                // SYNC (queued before the EOS) is done.
                self.chunks += 1;
                self.shared.wait_chunks(self.chunks)?;
                if self.in_end {
                    let layouts = self
                        .shared
                        .layouts
                        .get()
                        .ok_or(Error::Internal("the ram END before the block list"))?;
                    let bytes = self.shared.bitmaps.iter().map(AtomicBitmap::to_bytes);
                    let path = self.path();
                    file::write_bitmaps(self.stream.file(), &path, layouts, bytes)?;
                }
            }
            Event::Footer { .. } => {
                let section = self.section()?;
                self.stream.eos(section)?;
            }
            Event::RamPart { .. } => {
                let section = self.section()?;
                self.stream.part(section);
            }
            Event::RamEnd { .. } => {
                let section = self.section()?;
                self.in_end = true;
                self.stream.end(section);
            }
            Event::Command(cmd) => self.stream.command(cmd),
            Event::DeviceTail => self.tail = true,
            Event::Eof => {
                let mut b = Vec::new();
                encode::eof(&mut b);
                self.stream.raw(&b)?;
            }
            Event::VmDesc { json } => {
                let mut b = Vec::new();
                encode::vmdesc(&mut b, &json).map_err(|e| Error::Encode {
                    endpoint: crate::error::Endpoint::Main,
                    source: e,
                })?;
                self.stream.raw(&b)?;
            }
        }
        Ok(())
    }

    /// Reserves the file's space up to the end of the last pages region,
    /// so that a full file system fails the save now, before any page is
    /// written. Not on tmpfs, where reserving would allocate (and clear)
    /// memory for every zero page; there a full file system fails the
    /// write that hits it, cleanly.
    fn reserve_space(&self, layouts: &[BlockLayout]) -> Result<()> {
        let file = self.stream.file();
        if ram::is_tmpfs(file) {
            return Ok(());
        }
        let (Some(first), Some(last)) = (layouts.first(), layouts.last()) else {
            return Ok(());
        };
        let start = first.pages_offset();
        ram::reserve_range(file, &self.path(), start, last.next_offset() - start)
    }

    /// Gives back the reserved space of absent pages, in runs of at least
    /// 1 MiB (punching every scattered 4 KiB page costs seconds per GiB on
    /// ext4 and fragments the file; those stay reserved, read as zero and
    /// are never read: their bit is clear).
    fn release_space(&self) -> Result<()> {
        let file = self.stream.file();
        if !self.reserve || ram::is_tmpfs(file) {
            return Ok(());
        }
        let Some(layouts) = self.shared.layouts.get() else {
            return Ok(());
        };
        let min_pages = ram::min_hole(file) / PAGE_SIZE_U64;
        for (layout, bitmap) in layouts.iter().zip(&self.shared.bitmaps) {
            let bytes = bitmap.to_bytes();
            let view = multifd_wire::mapped_ram::Bitmap::for_layout(&bytes, layout)
                .map_err(|_| Error::Internal("a bitmap of the wrong size"))?;
            let mut next = 0;
            let punch = |from: u64, to: u64| -> Result<()> {
                if to - from >= min_pages {
                    let start = layout.pages_offset() + from * PAGE_SIZE_U64;
                    ram::punch(file, start, (to - from) * PAGE_SIZE_U64)
                        .map_err(|e| Error::io("giving back the space of zero pages", e))?;
                }
                Ok(())
            };
            for run in view.runs() {
                punch(next, run.start)?;
                next = run.end;
            }
            punch(next, layout.num_pages())?;
        }
        Ok(())
    }
}

impl StreamOut for FileOut<'_> {
    fn write_stream(&mut self, bytes: &[u8]) -> Result<()> {
        if self.tail {
            return self.stream.raw(bytes);
        }
        self.pending.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            let decoded = self
                .decoder
                .decode(&self.pending[pos..])
                .map_err(|e| Error::Encode {
                    endpoint: crate::error::Endpoint::Main,
                    source: e,
                })?;
            match decoded {
                Decoded::NeedMore { .. } => break,
                Decoded::Item { event, consumed } => {
                    let event = event.into_owned();
                    pos += consumed;
                    self.event(event)?;
                    if self.tail {
                        let rest = self.pending.split_off(pos);
                        self.pending.clear();
                        return self.stream.raw(&rest);
                    }
                }
            }
        }
        self.pending.drain(..pos);
        Ok(())
    }

    fn finish_stream(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            return Err(Error::Internal("the main stream ended inside an item"));
        }
        self.release_space()?;
        self.stream.finish()?;
        Ok(())
    }
}
