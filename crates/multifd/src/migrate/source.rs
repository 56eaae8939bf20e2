//! The precopy driver of a migration source (QEMU's migration thread +
//! `ram_save_setup/iterate/complete`).
//!
//! ```text
//! connect main, connect N channels (each writes its initial packet)
//! START "ram": MEM_SIZE + block list, SYNC on all channels, FLUSH, EOS
//! round 1: every page              -> PART: [ZERO records], SYNC, FLUSH, EOS
//! round k: pages dirtied meanwhile -> PART ... until the rest fits the downtime
//! pause the VM; SWITCHOVER_START; last dirty pages -> END: ..., SYNC, FLUSH, EOS
//! device state (or a recorded tail), EOF
//! ```
//! Each section ends with a sync, so per-round and per-section flushing only
//! differ in whether the FLUSH record is written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_wire::PAGE_SIZE_U64;
use multifd_wire::packet::{InitPacket, PAGES_PER_PACKET};
use multifd_wire::stream::{self, Command, Configuration, encode};

use crate::abort::Abort;
use crate::cancel::{self, Cancel};
use crate::config::{FlushMode, MigrationConfig, ZeroPageDetection};
use crate::error::{Endpoint, Error, Result};
use crate::method;
use crate::qemu::{MainWriter, StreamPlan};
use crate::ram::GuestRam;
use crate::send::{self, ChannelWorker, Dispatcher, Job};
use crate::stats::{Progress, Stats};
use crate::transport::{Connection, Uri};

/// Batches a channel may hold beyond the one it is sending. Deeper queues
/// let the driver run ahead; shallow ones keep work flowing to whichever
/// channel is free. On loopback, 4 GiB, 4 channels: depth 1 reached 77% of
/// a raw TCP blast, 4 and 16 reached 86-88%. The driver sleeps while all
/// queues are full and is woken when one is down to half (see `send`).
const QUEUE_DEPTH: usize = 8;

/// What a source VM provides to the driver. Guest RAM itself is the
/// caller's [`GuestRam`]; this trait covers the rest.
pub trait SourceVm {
    /// Appends to `dirty[b]` the offsets of block `b`'s pages written since
    /// the previous call (the first call follows round 1, which sends every
    /// page anyway).
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> Result<()>;
    /// Stops the vCPUs for the final round.
    fn pause(&mut self) -> Result<()>;
    /// Device state to put between the `ram` END section and EOF (complete
    /// FULL sections in QEMU's encoding), or nothing.
    fn device_state(&mut self) -> Result<Vec<u8>>;
}

/// A source whose RAM does not change: an image file or a paused guest.
#[derive(Debug, Default, Clone, Copy)]
pub struct StaticRam;

impl SourceVm for StaticRam {
    fn collect_dirty(&mut self, _: &GuestRam, _: &mut [Vec<u64>]) -> Result<()> {
        Ok(())
    }
    fn pause(&mut self) -> Result<()> {
        Ok(())
    }
    fn device_state(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

/// Options of a migration source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Parameters both sides share.
    pub config: MigrationConfig,
    /// What the main stream carries besides RAM.
    pub plan: StreamPlan,
    /// Longest acceptable pause: the final round starts once the remaining
    /// dirty pages can be sent within it at the measured rate (QEMU's
    /// `downtime-limit`, default 300 ms).
    pub downtime_limit: Duration,
    /// Most iterative rounds before forcing the final round.
    pub max_rounds: u32,
    /// Stops the migration from another thread, even while it is blocked
    /// writing to a receiver that stopped reading.
    pub cancel: Option<Arc<Cancel>>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            config: MigrationConfig::default(),
            plan: StreamPlan::default(),
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            cancel: None,
        }
    }
}

/// Migrates `ram` (and whatever `vm` adds) to the receiver at `uri`.
///
/// Blocks until the stream is completely written, or until the first
/// error; either way every thread has been joined and every socket closed
/// when it returns. [`SourceOptions::cancel`] stops it with
/// [`Error::Cancelled`].
pub fn migrate(
    uri: &Uri,
    ram: &GuestRam,
    vm: &mut dyn SourceVm,
    opts: &SourceOptions,
    progress: &Progress,
) -> Result<Stats> {
    opts.config.validate()?;
    if ram.blocks().is_empty() {
        return Err(Error::Config("no RAM blocks to migrate".into()));
    }
    let started = Instant::now();
    let abort = Abort::new();
    let cancel = opts.cancel.as_deref();
    let result = cancel::watched(
        cancel,
        || abort.fail(Error::Cancelled),
        || migrate_inner(uri, ram, vm, opts, progress, &abort),
    );
    abort.close_sockets();
    // The first recorded error is the cause; a direct error may be its
    // consequence (a socket shut down by the abort path).
    match (result, abort.take_error()) {
        (_, Some(first)) => Err(first),
        (Err(e), None) => Err(e),
        (Ok(()), None) => Ok(progress.stats(started.elapsed())),
    }
}

fn migrate_inner(
    uri: &Uri,
    ram: &GuestRam,
    vm: &mut dyn SourceVm,
    opts: &SourceOptions,
    progress: &Progress,
    abort: &Abort<'_>,
) -> Result<()> {
    let cfg = &opts.config;
    let cancel = opts.cancel.as_deref();
    if cancel.is_some_and(Cancel::is_cancelled) {
        return Err(Error::Cancelled);
    }

    // Main channel first (a TLS destination classifies by order), then the
    // multifd channels, each opening with its initial packet.
    let main = Connection::connect(uri, cfg.connect_timeout)?;
    abort.register_socket(&main)?;
    let mut channels = Vec::with_capacity(cfg.channels.into());
    for id in 0..cfg.channels {
        let mut conn = Connection::connect(uri, cfg.connect_timeout)?;
        abort.register_socket(&conn)?;
        let init = InitPacket { uuid: cfg.uuid, id }.encode();
        std::io::Write::write_all(&mut conn, &init)
            .map_err(|e| Error::io(format!("multifd channel {id}: writing initial packet"), e))?;
        progress.add(&progress.bytes, init.len() as u64);
        channels.push(conn);
    }

    let packet_num = AtomicU64::new(0);
    // done[0]: the main stream, done[1 + id]: channel `id`.
    let done: Vec<AtomicBool> = (0..=channels.len())
        .map(|_| AtomicBool::new(false))
        .collect();
    let (stop_r, stop_w) =
        std::io::pipe().map_err(|e| Error::io("creating the peer-watch pipe", e))?;
    std::thread::scope(|s| {
        // Ends the peer watch on every way out of this scope.
        let _stop_watch = StopOnDrop(stop_w);
        let done = &done;
        std::thread::Builder::new()
            .name("multifd-peer-watch".into())
            .spawn_scoped(s, move || watch_peer(abort, done, &stop_r))
            .map_err(|e| Error::io("spawning the peer-watch thread", e))?;
        let (dispatcher, ends) = send::queues(channels.len(), QUEUE_DEPTH);
        let mut handles = Vec::with_capacity(channels.len());
        for ((id, conn), jobs) in channels.drain(..).enumerate().zip(ends) {
            let worker = ChannelWorker {
                id: id as u8,
                conn,
                method: method::new_send(&cfg.method)?,
                ram,
                zero_pages: cfg.zero_page_detection,
                packet_num: &packet_num,
                progress,
                done: &done[1 + id],
            };
            let handle = std::thread::Builder::new()
                .name(format!("multifd-send-{id}"))
                .spawn_scoped(s, move || abort.guard(|| worker.run(jobs)))
                .map_err(|e| Error::io("spawning a channel thread", e))?;
            handles.push(handle);
        }
        let mut driver = Driver {
            ram,
            opts,
            dispatcher,
            main: MainWriter::new(main, progress),
            progress,
            cancel,
            abort,
            last_block: None,
        };
        let driven = driver.run(vm);
        // Closing the queues lets the channels drain and end.
        let Driver {
            dispatcher, main, ..
        } = driver;
        drop(dispatcher);
        if let Err(e) = driven {
            abort.fail(e);
        }
        for h in handles {
            if h.join().is_err() {
                abort.fail(Error::Panicked("multifd-send".into()));
            }
        }
        if abort.is_aborted() {
            return Ok(());
        }
        // All channel data is written: end the main stream.
        done[0].store(true, Ordering::Release);
        abort.guard(|| main.finish());
        Ok(())
    })
}

/// Writes to the peer-watch pipe when dropped.
struct StopOnDrop(std::io::PipeWriter);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::io::Write::write_all(&mut self.0, &[1]);
    }
}

/// Watches the sockets of a sending migration: a destination sends nothing
/// on them (there is no return path), so a hang-up, reset or data means it
/// gave up on that connection, for example after a channel error. A QEMU
/// destination then shuts its sockets down but keeps them open with a zero
/// window, which would leave a writer blocked forever. The watch shuts our
/// side of that socket down: a write still pending on it fails at once
/// (and aborts the migration), while a channel that has nothing more to
/// send is not disturbed. Sockets whose writer already finished are left out.
fn watch_peer(abort: &Abort<'_>, done: &[AtomicBool], stop: &std::io::PipeReader) {
    use std::os::fd::AsRawFd;
    let fds = abort.socket_fds();
    let mut wake = vec![stop.as_raw_fd()];
    wake.extend(abort.wake_fd().map(|w| w.as_raw_fd()));
    let mut gone = vec![false; fds.len()];
    loop {
        let active: Vec<usize> = (0..fds.len().min(done.len()))
            .filter(|&i| !gone[i] && !done[i].load(Ordering::Acquire))
            .collect();
        if active.is_empty() {
            return;
        }
        let watch: Vec<_> = active.iter().map(|&i| fds[i]).collect();
        match crate::transport::sys::wait_peer_event(&watch, &wake) {
            Ok(None) | Err(_) => return,
            Ok(Some(k)) => {
                let i = active[k];
                gone[i] = true;
                if !done[i].load(Ordering::Acquire) {
                    tracing::debug!(socket = i, "destination hung up; shutting the socket down");
                    abort.shutdown_socket(i);
                }
            }
        }
    }
}

struct Driver<'a, 'w> {
    ram: &'a GuestRam,
    opts: &'a SourceOptions,
    dispatcher: Dispatcher,
    main: MainWriter<'a>,
    progress: &'a Progress,
    cancel: Option<&'a Cancel>,
    abort: &'a Abort<'w>,
    /// Block of the last ZERO record on the main stream (for CONTINUE).
    last_block: Option<usize>,
}

impl Driver<'_, '_> {
    fn wire(e: multifd_wire::WireError) -> Error {
        Error::wire(Endpoint::Main, e)
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_some_and(Cancel::is_cancelled) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    fn run(&mut self, vm: &mut dyn SourceVm) -> Result<()> {
        let plan = &self.opts.plan;
        let id = plan.ram_section_id;
        match &plan.prefix {
            Some(prefix) => self.main.buf().extend_from_slice(prefix),
            None => {
                let buf = self.main.buf();
                encode::header(buf);
                encode::configuration(
                    buf,
                    &Configuration {
                        machine: plan.machine.clone(),
                        ..Configuration::default()
                    },
                )
                .map_err(Self::wire)?;
            }
        }
        // Setup: the block list, then a sync before any page.
        let infos = self.ram.block_infos();
        let buf = self.main.buf();
        encode::section_start(
            buf,
            id,
            stream::RAM_SECTION_IDSTR,
            0,
            stream::RAM_SECTION_VERSION,
        )
        .map_err(Self::wire)?;
        encode::mem_size(buf, &infos).map_err(Self::wire)?;
        self.end_section(id)?;

        // Round 1: every page.
        let mut last_rate_pages_per_s = 0.0f64;
        let t = Instant::now();
        encode::section_part(self.main.buf(), id);
        self.send_round(None)?;
        self.end_section(id)?;
        let sent = self.ram.total_pages();
        if t.elapsed().as_secs_f64() > 0.0 {
            last_rate_pages_per_s = sent as f64 / t.elapsed().as_secs_f64();
        }

        // Iterate until the rest fits in the downtime.
        let mut dirty: Vec<Vec<u64>> = vec![Vec::new(); self.ram.blocks().len()];
        let mut rounds = 1;
        loop {
            self.check_cancel()?;
            dirty.iter_mut().for_each(Vec::clear);
            vm.collect_dirty(self.ram, &mut dirty)?;
            let count: usize = dirty.iter().map(Vec::len).sum();
            let fits =
                (count as f64) <= last_rate_pages_per_s * self.opts.downtime_limit.as_secs_f64();
            if count == 0 || fits || rounds >= self.opts.max_rounds {
                break;
            }
            let t = Instant::now();
            encode::section_part(self.main.buf(), id);
            self.send_round(Some(&dirty))?;
            self.end_section(id)?;
            rounds += 1;
            let secs = t.elapsed().as_secs_f64();
            if secs > 0.0 {
                last_rate_pages_per_s = count as f64 / secs;
            }
        }

        // Completion: pause, send what is still dirty, then device state.
        vm.pause()?;
        let mut last: Vec<Vec<u64>> = dirty;
        {
            // What was collected above is still unsent; add what came since.
            let mut more: Vec<Vec<u64>> = vec![Vec::new(); self.ram.blocks().len()];
            vm.collect_dirty(self.ram, &mut more)?;
            for (b, extra) in more.into_iter().enumerate() {
                last[b].extend(extra);
                last[b].sort_unstable();
                last[b].dedup();
            }
        }
        if self.opts.plan.switchover_start {
            encode::command(self.main.buf(), Command::SwitchoverStart);
        }
        encode::section_end(self.main.buf(), id);
        self.send_round(Some(&last))?;
        self.end_section(id)?;
        // The point of no return: once EOF goes out the destination can
        // complete, so a cancel from now on is ignored.
        if !self.abort.complete() {
            return Err(Error::Aborted);
        }
        match &self.opts.plan.tail {
            Some(tail) => self.main.buf().extend_from_slice(tail),
            None => {
                let devices = vm.device_state()?;
                self.main.buf().extend_from_slice(&devices);
                encode::eof(self.main.buf());
                // QEMU reads (and discards) a vmdesc after EOF and warns when
                // it is missing; describe the sections we sent: none.
                encode::vmdesc(self.main.buf(), br#"{"page_size": 4096, "devices": []}"#)
                    .map_err(Self::wire)?;
            }
        }
        self.main.flush()
    }

    /// Sync point, FLUSH (per-round mode), EOS and footer; writes the main stream out.
    fn end_section(&mut self, id: u32) -> Result<()> {
        self.dispatcher.sync_all()?;
        if self.opts.config.flush_mode == FlushMode::PerRound {
            encode::flush(self.main.buf());
        }
        encode::eos(self.main.buf());
        encode::section_footer(self.main.buf(), id);
        self.progress.add(&self.progress.rounds, 1);
        self.main.flush()
    }

    /// Sends the pages of one round: all pages (`dirty` = None) or the listed ones.
    fn send_round(&mut self, dirty: Option<&[Vec<u64>]>) -> Result<()> {
        let ram = self.ram;
        let planned: u64 = match dirty {
            None => self.ram.total_pages(),
            Some(d) => d.iter().map(|v| v.len() as u64).sum(),
        };
        self.progress
            .planned_pages
            .store(planned, Ordering::Relaxed);
        for (b, block) in ram.blocks().iter().enumerate() {
            let mut batch = Vec::with_capacity(PAGES_PER_PACKET);
            let mut push = |this: &mut Self, off: u64| -> Result<()> {
                if this.opts.config.zero_page_detection == ZeroPageDetection::Legacy
                    && block.is_zero_page(off)?
                {
                    let name = if this.last_block == Some(b) {
                        None
                    } else {
                        Some(block.name())
                    };
                    encode::zero_page(this.main.buf(), name, off).map_err(Self::wire)?;
                    this.last_block = Some(b);
                    this.progress.add(&this.progress.zero_pages, 1);
                    return this.main.maybe_flush();
                }
                batch.push(off);
                if batch.len() == PAGES_PER_PACKET {
                    this.check_cancel()?;
                    let offsets =
                        std::mem::replace(&mut batch, Vec::with_capacity(PAGES_PER_PACKET));
                    this.dispatcher.dispatch(Job::Pages { block: b, offsets })?;
                }
                Ok(())
            };
            match dirty {
                None => {
                    for page in 0..block.pages() {
                        push(self, page * PAGE_SIZE_U64)?;
                    }
                }
                Some(d) => {
                    for &off in &d[b] {
                        block.check_page(off)?;
                        push(self, off)?;
                    }
                }
            }
            if !batch.is_empty() {
                self.dispatcher.dispatch(Job::Pages {
                    block: b,
                    offsets: batch,
                })?;
            }
        }
        Ok(())
    }
}
