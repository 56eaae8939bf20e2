//! The round driver (QEMU's migration thread with `ram_save_setup`,
//! `ram_save_iterate` and `ram_save_complete`).
//!
//! ```text
//! START "ram": MEM_SIZE + block list, SYNC on all channels, FLUSH, EOS
//! round 1: every page              -> PART: [ZERO records], SYNC, FLUSH, EOS
//! round k: pages dirtied meanwhile -> PART ... until the rest fits the downtime
//! pause the VM; SWITCHOVER_START; last dirty pages -> END: ..., SYNC, FLUSH, EOS
//! device state (or a recorded tail), EOF
//! ```
//! Each chunk ends with a sync, so per-round and per-section flushing only
//! differ in whether the FLUSH record is written. The driver waits for
//! every channel's SYNC to be written before it takes the next dirty log,
//! so a round's time is the time its pages took to go out: that gives the
//! bandwidth (pages per second) of the round.
//!
//! ## When to switch over
//! After each dirty sync the expected downtime is
//! `dirty pages * 4096 / bytes per second of the last round + fixed costs`
//! (QEMU's estimate: a dirty page counts as a data page), where
//! the fixed costs are measured: the last `collect_dirty` (the final sync
//! after the pause does the same work), an empty sync round trip (measured
//! at setup: SYNC on every channel and the main-stream chunk) and the pause
//! itself (unknown before the first one: [`PAUSE_ESTIMATE`]). Switchover
//! when it fits in the downtime limit; when rounds stop shrinking the
//! [`Convergence`] controls throttle the vCPUs and/or raise the limit; at
//! `max_rounds` / `max_time` either [`Error::NotConverging`] (the VM was
//! never paused) or a forced switchover ([`OnLimit`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use multifd_wire::PAGE_SIZE_U64;
use multifd_wire::stream::{Command, Configuration};

use super::convergence::Convergence;
use super::dispatch::{Dispatcher, Job, SyncsWritten};
use super::main_stream::MainStream;
use super::rate_limit::RateLimiter;
use super::{OnLimit, SourceOptions, SourceVm};
use crate::config::{FlushMode, ZeroPageDetection};
use crate::error::{Error, Result};
use crate::lifecycle::{self, Abort, Cancel, Watchdog};
use crate::ram::{GuestRam, Holes, PageBatch, RamBlock};
use crate::stats::{MigrationStatus, Progress, SyncFigures};

/// QEMU reads (and discards) a vmdesc after EOF and warns when it is
/// missing; ours describes the sections we sent: none.
const EMPTY_VMDESC: &[u8] = br#"{"page_size": 4096, "devices": []}"#;

/// What stopping the vCPUs is assumed to cost before it was measured (a
/// signal to each vCPU thread and its exit from KVM_RUN: well below this).
const PAUSE_ESTIMATE: Duration = Duration::from_millis(1);

/// Which pages a round sends.
enum Round<'d> {
    /// Every page of every block (round 1).
    All,
    /// The listed offsets of each block.
    Dirty(&'d [Vec<u64>]),
}

/// What the driver did to the caller's VM, for [`super::migrate`] to undo
/// after a failure and to report.
#[derive(Debug, Default)]
pub(crate) struct VmMarks {
    /// When the VM was paused for the switchover.
    pub(crate) paused_at: OnceLock<Instant>,
    /// The throttle last set, percent.
    pub(crate) throttle: AtomicU8,
}

/// The round driver over its channel queues and main stream. The network
/// source ([`super::migrate`]) and a mapped-ram file target both run it.
pub(crate) struct Driver<'a> {
    pub(crate) ram: &'a GuestRam,
    pub(crate) opts: &'a SourceOptions,
    pub(crate) dispatcher: Dispatcher<'a>,
    pub(crate) main: MainStream<'a>,
    pub(crate) progress: &'a Progress,
    pub(crate) cancel: Option<&'a Cancel>,
    /// Told when the caller's VM is working (its time is not idleness).
    pub(crate) watchdog: &'a Watchdog,
    pub(crate) limiter: &'a RateLimiter,
    pub(crate) syncs: &'a SyncsWritten,
    /// SYNCs expected from the channels so far.
    pub(crate) syncs_due: u64,
    pub(crate) channels: u64,
    pub(crate) started: Instant,
    pub(crate) marks: &'a VmMarks,
    /// Pages per batch handed to a channel: a packet's worth on the
    /// network ([`PAGES_PER_PACKET`](multifd_wire::packet::PAGES_PER_PACKET)); more for a file, where a batch's
    /// runs of pages become single positioned writes.
    pub(crate) batch_pages: usize,
}

impl<'a> Driver<'a> {
    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_some_and(Cancel::is_cancelled) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// Runs the migration ([`run`](Self::run)), then ends it: closes the
    /// queues, which lets the channels (`channels`, their threads) drain
    /// and end, and waits for them (an error or panic in one is already
    /// the migration's error, through `abort`). Every channel has then
    /// written its last pages: the point of no return. Until the main
    /// stream's tail (device state, EOF) goes out the destination cannot
    /// complete, so a cancel until here is honoured; from here on it is
    /// too late (other errors still count). `at_no_return` runs there,
    /// just before the tail is written.
    pub(crate) fn run_to_end<T>(
        mut self,
        vm: &mut dyn SourceVm,
        abort: &Abort<'_>,
        channels: Vec<std::thread::ScopedJoinHandle<'_, T>>,
        at_no_return: impl FnOnce(),
    ) {
        let driven = lifecycle::catch_panic(abort, "multifd-driver", || self.run(vm));
        let Driver {
            dispatcher, main, ..
        } = self;
        drop(dispatcher);
        for h in channels {
            let _ = h.join();
        }
        if driven.is_some() && abort.complete() {
            at_no_return();
            lifecycle::catch_panic(abort, "multifd-driver", || main.finish());
        }
    }

    /// Runs the migration to the end of the main stream; its tail (device
    /// state, EOF) is left pending for [`MainStream::finish`].
    pub(crate) fn run(&mut self, vm: &mut dyn SourceVm) -> Result<()> {
        let plan = &self.opts.plan;
        match &plan.prefix {
            Some(prefix) => self.main.encode(|e| e.verbatim_prefix(prefix))?,
            None => self.main.encode(|e| {
                e.header();
                e.configuration(&Configuration {
                    machine: plan.machine.clone(),
                    ..Configuration::default()
                })
            })?,
        }
        // Setup: the block list, then a sync before any page. Its round
        // trip is the fixed cost of a sync.
        let infos = self.ram.block_infos();
        self.main.encode(|e| e.ram_start(&infos))?;
        let t = Instant::now();
        self.close_chunk()?;
        let sync_cost = t.elapsed();
        self.progress.set_setup_time(self.started.elapsed());
        self.progress.set_status(MigrationStatus::Active);

        // Round 1: every page.
        let t = Instant::now();
        self.main.encode(|e| e.ram_part())?;
        let bytes0 = self.progress.bytes.load(Ordering::Relaxed);
        let mut sent = self.send_round(Round::All)?;
        self.close_chunk()?;
        let mut last_sync = Instant::now();
        let mut bytes_per_s = rate(
            self.progress.bytes.load(Ordering::Relaxed) - bytes0,
            t,
            last_sync,
        );

        // Iterate until the rest fits in the downtime.
        let mut conv = Convergence::new(self.opts);
        let mut dirty: Vec<Vec<u64>> = vec![Vec::new(); self.ram.blocks().len()];
        let mut rounds: u32 = 1;
        loop {
            self.check_cancel()?;
            dirty.iter_mut().for_each(Vec::clear);
            let t = Instant::now();
            {
                let _vm_work = self.watchdog.hold();
                vm.collect_dirty(self.ram, &mut dirty)?;
            }
            let now = Instant::now();
            let collect_cost = now - t;
            let count: u64 = dirty.iter().map(|d| d.len() as u64).sum();
            let dirty_rate = rate(count, last_sync, now);
            last_sync = now;
            let fixed = collect_cost + sync_cost + PAUSE_ESTIMATE;
            // Like QEMU: the dirty pages as bytes at the bytes per second
            // of the last round (zero pages go faster, so this errs long).
            let expected = if count == 0 {
                fixed
            } else if bytes_per_s > 0.0 {
                fixed + Duration::from_secs_f64(count as f64 * PAGE_SIZE_U64 as f64 / bytes_per_s)
            } else {
                Duration::MAX
            };
            if let Some(throttle) = conv.after_sync(count, sent) {
                let _vm_work = self.watchdog.hold();
                vm.throttle(throttle)?;
                self.marks.throttle.store(throttle, Ordering::Relaxed);
                self.progress.set_throttle(throttle);
                tracing::info!(
                    throttle,
                    round = rounds,
                    "auto-converge: throttling the vCPUs"
                );
            }
            self.progress.set_sync(SyncFigures {
                remaining_pages: count,
                expected_downtime: expected,
                dirty_pages_rate: dirty_rate as u64,
                bandwidth: bytes_per_s as u64,
                downtime_limit: conv.limit(),
            });
            tracing::debug!(
                round = rounds,
                dirty = count,
                expected_ms = expected.as_secs_f64() * 1e3,
                mib_per_s = bytes_per_s / f64::from(1 << 20),
                "dirty sync"
            );
            if count == 0 || expected <= conv.limit() {
                break;
            }
            let out_of_time = self
                .opts
                .max_time
                .is_some_and(|m| self.started.elapsed() >= m);
            if rounds >= self.opts.max_rounds || out_of_time {
                match self.opts.on_limit {
                    OnLimit::Switchover => break,
                    OnLimit::Fail => {
                        return Err(Error::NotConverging {
                            rounds,
                            elapsed_ms: self.started.elapsed().as_millis() as u64,
                            remaining_pages: count,
                            expected_downtime_ms: expected.as_millis().min(u64::MAX.into()) as u64,
                            limit_ms: conv.limit().as_millis() as u64,
                        });
                    }
                }
            }
            let t = Instant::now();
            let bytes0 = self.progress.bytes.load(Ordering::Relaxed);
            self.main.encode(|e| e.ram_part())?;
            sent = self.send_round(Round::Dirty(&dirty))?;
            self.close_chunk()?;
            rounds += 1;
            let done = Instant::now();
            bytes_per_s = rate(
                self.progress.bytes.load(Ordering::Relaxed) - bytes0,
                t,
                done,
            );
        }

        // Completion: pause, send what is still dirty, then device state.
        self.progress.set_status(MigrationStatus::Device);
        let mut more: Vec<Vec<u64>> = vec![Vec::new(); self.ram.blocks().len()];
        {
            let _vm_work = self.watchdog.hold();
            let _ = self.marks.paused_at.set(Instant::now());
            vm.pause()?;
            // What was collected above is still unsent; add what came since.
            vm.collect_dirty(self.ram, &mut more)?;
        }
        self.limiter.lift();
        for (last, extra) in dirty.iter_mut().zip(more) {
            if !extra.is_empty() {
                last.extend(extra);
                last.sort_unstable();
                last.dedup();
            }
        }
        if self.opts.plan.switchover_start {
            self.main.encode(|e| e.command(Command::SwitchoverStart))?;
        }
        self.main.encode(|e| e.ram_end())?;
        let last = self.send_round(Round::Dirty(&dirty))?;
        tracing::debug!(pages = last, "final round");
        self.close_chunk()?;
        self.progress.set_remaining_pages(0);
        self.check_cancel()?;
        // The tail (device state, EOF, vmdesc) stays pending: it goes out
        // once every channel has written its last packet, after the point
        // of no return (see `migrate_inner`).
        match &self.opts.plan.tail {
            Some(tail) => self.main.encode(|e| e.verbatim_tail(tail)),
            None => {
                let devices = {
                    let _vm_work = self.watchdog.hold();
                    vm.device_state()?
                };
                self.main.encode(|e| {
                    e.device_state(&devices)?;
                    e.eof(Some(EMPTY_VMDESC))
                })
            }
        }
    }

    /// Sync point, FLUSH (per-round mode), EOS and footer; writes the main
    /// stream out.
    /// Waits until every channel wrote its SYNC.
    fn close_chunk(&mut self) -> Result<()> {
        self.dispatcher.sync_all()?;
        self.syncs_due += self.channels;
        let per_round = self.opts.config.flush_mode == FlushMode::PerRound;
        self.main.encode(|e| {
            if per_round {
                e.flush()?;
            }
            e.close_chunk()
        })?;
        self.progress.add(&self.progress.rounds, 1);
        self.main.flush()?;
        self.syncs.wait_for(self.syncs_due)
    }

    /// Sends the pages of one round; returns how many.
    fn send_round(&mut self, round: Round<'_>) -> Result<u64> {
        let planned: u64 = match round {
            Round::All => self.ram.total_pages(),
            Round::Dirty(d) => d.iter().map(|v| v.len() as u64).sum(),
        };
        self.progress
            .planned_pages
            .store(planned, Ordering::Relaxed);
        let ram: &'a GuestRam = self.ram;
        for (b, block) in ram.blocks().iter().enumerate() {
            match round {
                Round::All => {
                    // Pages in holes of the block's file are zero pages
                    // known without reading them. Only in the first round:
                    // dirty pages were written, and a hole filled after the
                    // lookup is logged dirty and sent again.
                    let mut holes = match self.opts.config.zero_page_detection {
                        ZeroPageDetection::None => None,
                        _ => Holes::new(block),
                    };
                    let offsets = (0..block.pages()).map(|p| p * PAGE_SIZE_U64);
                    self.send_block(block, offsets, holes.as_mut())?;
                    if let Some(h) = holes {
                        tracing::debug!(
                            block = block.name(),
                            hole_pages = h.hole_pages(),
                            lseeks = h.lseeks(),
                            "pages found in file holes"
                        );
                    }
                }
                Round::Dirty(d) => self.send_block(block, d[b].iter().copied(), None)?,
            }
        }
        Ok(planned)
    }

    /// Sends `offsets` (ascending when `holes` is given) of `block`: in
    /// batches to the channels, or (legacy zero-page detection) zero pages
    /// as ZERO records on the main stream. Pages `holes` finds in holes of
    /// the block's file are zero pages without being read.
    fn send_block(
        &mut self,
        block: &'a RamBlock,
        offsets: impl Iterator<Item = u64>,
        mut holes: Option<&mut Holes<'_>>,
    ) -> Result<()> {
        let legacy_zero = self.opts.config.zero_page_detection == ZeroPageDetection::Legacy;
        let per_batch = self.batch_pages;
        let mut batch = PageBatch::new(block, per_batch);
        for offset in offsets {
            let hole = holes.as_mut().is_some_and(|h| h.is_hole(offset));
            if legacy_zero && (hole || block.is_zero_page(offset)?) {
                self.main.encode(|e| e.zero_page(block.name(), offset))?;
                self.progress.add(&self.progress.zero_pages, 1);
                self.main.flush_if_large()?;
                continue;
            }
            if hole {
                batch.push_known_zero(offset)?;
            } else {
                batch.push(offset)?;
            }
            if batch.len() >= per_batch {
                self.check_cancel()?;
                let full = std::mem::replace(&mut batch, PageBatch::new(block, per_batch));
                self.dispatcher.dispatch(Job::Pages(full))?;
            }
        }
        if !batch.is_empty() {
            self.dispatcher.dispatch(Job::Pages(batch))?;
        }
        Ok(())
    }
}

/// `n` per second from `from` to `to`.
fn rate(n: u64, from: Instant, to: Instant) -> f64 {
    let secs = to.duration_since(from).as_secs_f64();
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}
