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
//! differ in whether the FLUSH record is written.

use std::sync::atomic::Ordering;
use std::time::Instant;

use multifd_wire::PAGE_SIZE_U64;
use multifd_wire::stream::{Command, Configuration};

use super::dispatch::{Dispatcher, Job};
use super::main_stream::MainStream;
use super::{SourceOptions, SourceVm};
use crate::config::{FlushMode, ZeroPageDetection};
use crate::error::{Error, Result};
use crate::lifecycle::{Abort, Cancel, Watchdog};
use crate::ram::{GuestRam, PageBatch, RamBlock};
use crate::stats::Progress;

/// QEMU reads (and discards) a vmdesc after EOF and warns when it is
/// missing; ours describes the sections we sent: none.
const EMPTY_VMDESC: &[u8] = br#"{"page_size": 4096, "devices": []}"#;

/// Which pages a round sends.
enum Round<'d> {
    /// Every page of every block (round 1).
    All,
    /// The listed offsets of each block.
    Dirty(&'d [Vec<u64>]),
}

/// The round driver over its channel queues and main stream. The network
/// source ([`super::migrate`]) and a mapped-ram file target both run it.
pub(crate) struct Driver<'a, 'w> {
    pub(crate) ram: &'a GuestRam,
    pub(crate) opts: &'a SourceOptions,
    pub(crate) dispatcher: Dispatcher<'a>,
    pub(crate) main: MainStream<'a>,
    pub(crate) progress: &'a Progress,
    pub(crate) cancel: Option<&'a Cancel>,
    pub(crate) abort: &'a Abort<'w>,
    /// Told when the caller's VM is working (its time is not idleness).
    pub(crate) watchdog: &'a Watchdog,
    /// Pages per batch handed to a channel: a packet's worth on the
    /// network ([`PAGES_PER_PACKET`](multifd_wire::packet::PAGES_PER_PACKET)); more for a file, where a batch's
    /// runs of pages become single positioned writes.
    pub(crate) batch_pages: usize,
}

impl<'a> Driver<'a, '_> {
    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_some_and(Cancel::is_cancelled) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// Runs the migration to the end of the main stream (not yet flushed
    /// out in full: see [`MainStream::finish`]).
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
        // Setup: the block list, then a sync before any page.
        let infos = self.ram.block_infos();
        self.main.encode(|e| e.ram_start(&infos))?;
        self.close_chunk()?;

        // Round 1: every page.
        let t = Instant::now();
        self.main.encode(|e| e.ram_part())?;
        self.send_round(Round::All)?;
        self.close_chunk()?;
        let mut rate_pages_per_s = rate(self.ram.total_pages(), t);

        // Iterate until the rest fits in the downtime.
        let mut dirty: Vec<Vec<u64>> = vec![Vec::new(); self.ram.blocks().len()];
        let mut rounds = 1;
        loop {
            self.check_cancel()?;
            dirty.iter_mut().for_each(Vec::clear);
            {
                let _vm_work = self.watchdog.hold();
                vm.collect_dirty(self.ram, &mut dirty)?;
            }
            let count: usize = dirty.iter().map(Vec::len).sum();
            let fits = (count as f64) <= rate_pages_per_s * self.opts.downtime_limit.as_secs_f64();
            if count == 0 || fits || rounds >= self.opts.max_rounds {
                break;
            }
            let t = Instant::now();
            self.main.encode(|e| e.ram_part())?;
            self.send_round(Round::Dirty(&dirty))?;
            self.close_chunk()?;
            rounds += 1;
            rate_pages_per_s = rate(count as u64, t);
        }

        // Completion: pause, send what is still dirty, then device state.
        let mut more: Vec<Vec<u64>> = vec![Vec::new(); self.ram.blocks().len()];
        {
            let _vm_work = self.watchdog.hold();
            vm.pause()?;
            // What was collected above is still unsent; add what came since.
            vm.collect_dirty(self.ram, &mut more)?;
        }
        for (last, extra) in dirty.iter_mut().zip(more) {
            last.extend(extra);
            last.sort_unstable();
            last.dedup();
        }
        if self.opts.plan.switchover_start {
            self.main.encode(|e| e.command(Command::SwitchoverStart))?;
        }
        self.main.encode(|e| e.ram_end())?;
        self.send_round(Round::Dirty(&dirty))?;
        self.close_chunk()?;
        // The point of no return: once EOF goes out the destination can
        // complete, so a cancel from now on is ignored.
        if !self.abort.complete() {
            return Err(Error::Aborted);
        }
        match &self.opts.plan.tail {
            Some(tail) => self.main.encode(|e| e.verbatim_tail(tail))?,
            None => {
                let devices = {
                    let _vm_work = self.watchdog.hold();
                    vm.device_state()?
                };
                self.main.encode(|e| {
                    e.device_state(&devices)?;
                    e.eof(Some(EMPTY_VMDESC))
                })?;
            }
        }
        self.main.flush()
    }

    /// Sync point, FLUSH (per-round mode), EOS and footer; writes the main
    /// stream out.
    fn close_chunk(&mut self) -> Result<()> {
        self.dispatcher.sync_all()?;
        let per_round = self.opts.config.flush_mode == FlushMode::PerRound;
        self.main.encode(|e| {
            if per_round {
                e.flush()?;
            }
            e.close_chunk()
        })?;
        self.progress.add(&self.progress.rounds, 1);
        self.main.flush()
    }

    /// Sends the pages of one round.
    fn send_round(&mut self, round: Round<'_>) -> Result<()> {
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
                    let offsets = (0..block.pages()).map(|p| p * PAGE_SIZE_U64);
                    self.send_block(block, offsets)?;
                }
                Round::Dirty(d) => self.send_block(block, d[b].iter().copied())?,
            }
        }
        Ok(())
    }

    /// Sends `offsets` of `block`: in batches to the channels, or (legacy
    /// zero-page detection) zero pages as ZERO records on the main stream.
    fn send_block(
        &mut self,
        block: &'a RamBlock,
        offsets: impl Iterator<Item = u64>,
    ) -> Result<()> {
        let legacy_zero = self.opts.config.zero_page_detection == ZeroPageDetection::Legacy;
        let per_batch = self.batch_pages;
        let mut batch = PageBatch::new(block, per_batch);
        for offset in offsets {
            if legacy_zero && block.is_zero_page(offset)? {
                self.main.encode(|e| e.zero_page(block.name(), offset))?;
                self.progress.add(&self.progress.zero_pages, 1);
                self.main.flush_if_large()?;
                continue;
            }
            batch.push(offset)?;
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

/// Pages per second moved since `t`.
fn rate(pages: u64, t: Instant) -> f64 {
    let secs = t.elapsed().as_secs_f64();
    if secs > 0.0 { pages as f64 / secs } else { 0.0 }
}
