//! The destination wing: accept and classify connections, run one thread
//! per multifd channel, follow the main stream, hold the sync barrier.
//!
//! Order of work (QEMU's destination does the same, minus the timeouts):
//! 1. accept the main channel and N multifd channels, in any order;
//! 2. read the main stream up to the `ram` block list and get RAM for it;
//! 3. start the channel threads (packets that arrived meanwhile wait in
//!    the sockets); the first packet of each is a SYNC, so no page is
//!    applied before the main stream's first FLUSH;
//! 4. follow the main stream: at each FLUSH (per-round mode) or EOS
//!    (per-section mode) wait for every channel's SYNC, then release them;
//! 5. after the `ram` END section, keep the rest (device state, EOF,
//!    vmdesc) verbatim until the source closes the main channel;
//! 6. let the channels drain to EOF and join them.
//!
//! Any error stops everything through the abort path: the first error is
//! kept, every socket is shut down, the barrier wakes its waiters, every
//! thread is joined, and the error is returned.

mod accept;
mod barrier;
mod channel;
mod main_loop;
mod main_stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use multifd_wire::stream::{Configuration, RamBlockInfo};

use crate::abort::Abort;
use crate::cancel::{self, Cancel};
use crate::config::MigrationConfig;
use crate::error::{Error, Result};
use crate::method;
use crate::ram::GuestRam;
use crate::stats::{Progress, Stats};
use crate::transport::Listener;
use barrier::SyncBarrier;
use channel::RecvChannel;
use main_loop::MainLoop;
use main_stream::{Setup, StreamReader};

/// Supplies the RAM blocks a source announces (`--ram` files, snapshot
/// files, or the embedding VMM's memory).
pub trait RamProvider {
    /// Returns RAM with exactly these blocks (names and lengths).
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> Result<GuestRam>;
}

/// Options of a receiver.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Parameters both sides share.
    pub config: MigrationConfig,
    /// How long to wait for the first connection (forever when `None`).
    pub accept_timeout: Option<Duration>,
    /// Longest opaque tail (device state + vmdesc) accepted.
    pub max_tail: usize,
    /// Stops the migration from another thread (also while waiting for
    /// connections).
    pub cancel: Option<Arc<Cancel>>,
    /// Require the vmdesc trailer after EOF (QEMU 10 sends it for every x86
    /// machine type, and so do we). A stream cut inside the trailer's length
    /// can otherwise look like a complete stream without one.
    pub require_vmdesc: bool,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            config: MigrationConfig::default(),
            accept_timeout: None,
            max_tail: 256 << 20,
            cancel: None,
            require_vmdesc: true,
        }
    }
}

/// What a completed incoming migration delivered.
#[derive(Debug)]
pub struct Incoming {
    /// The RAM, filled.
    pub ram: GuestRam,
    /// The configuration section (machine type, ...).
    pub configuration: Configuration,
    /// Main-stream bytes before the `ram` START section, verbatim.
    pub prefix: Vec<u8>,
    /// Main-stream bytes after the `ram` END section, verbatim.
    pub tail: Vec<u8>,
    /// Section id of `ram`.
    pub ram_section_id: u32,
    /// Whether SWITCHOVER_START was sent.
    pub switchover_start: bool,
    /// Sync points seen.
    pub flushes: u64,
    /// Figures.
    pub stats: Stats,
}

/// Receives one migration on `listener`.
pub fn receive(
    listener: &Listener,
    opts: &ReceiveOptions,
    provider: &mut dyn RamProvider,
    progress: &Progress,
) -> Result<Incoming> {
    opts.config.validate()?;
    let barrier = SyncBarrier::new(opts.config.channels.into());
    let abort = Abort::new();
    abort.register_waker(&barrier);
    let result = cancel::watched(
        opts.cancel.as_deref(),
        || abort.fail(Error::Cancelled),
        || receive_inner(listener, opts, provider, progress, &abort, &barrier),
    );
    abort.close_sockets();
    // The first recorded error is the cause; a direct error may only be its
    // consequence (a socket shut down by the abort path).
    match (result, abort.take_error()) {
        (_, Some(first)) => Err(first),
        (result, None) => result,
    }
}

fn receive_inner(
    listener: &Listener,
    opts: &ReceiveOptions,
    provider: &mut dyn RamProvider,
    progress: &Progress,
    abort: &Abort<'_>,
    barrier: &SyncBarrier,
) -> Result<Incoming> {
    let cfg = &opts.config;
    let accepted = accept::accept_all(listener, cfg, opts.accept_timeout, abort)?;
    accept::reject_extra_channels(listener, cfg)?;
    let started = Instant::now();
    tracing::info!(channels = cfg.channels, "all channels connected");
    let mut reader = StreamReader::new(accepted.main, accepted.main_head, cfg.handshake_timeout);

    // The main stream up to the block list, which must come promptly.
    let Setup {
        configuration,
        ram_section_id,
        blocks,
    } = reader.read_setup()?;
    let ram = provider.provide(&blocks)?;
    for info in &blocks {
        match ram.get(&info.idstr) {
            Some(b) if b.len() == info.used_length => {}
            _ => {
                return Err(Error::Config(format!(
                    "the RAM provider did not supply block {:?} of {} bytes",
                    info.idstr, info.used_length
                )));
            }
        }
    }

    let mut outcome = None;
    let channel_conns = accepted.channels;
    let mut drain_handles = Vec::new();
    for c in &channel_conns {
        drain_handles.push(
            c.try_clone()
                .map_err(|e| Error::io("duplicating a socket handle", e))?,
        );
    }
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (id, conn) in channel_conns.into_iter().enumerate() {
            let id = id as u8;
            let Some(method) = abort.guard(|| method::new_recv(&cfg.method, id)) else {
                break;
            };
            let ch = RecvChannel {
                id,
                conn,
                method,
                method_cfg: cfg.method,
                ram: &ram,
                barrier,
                progress,
            };
            match std::thread::Builder::new()
                .name(format!("multifd-recv-{id}"))
                .spawn_scoped(s, move || abort.guard(|| ch.run()))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    abort.fail(Error::io("spawning a channel thread", e));
                    break;
                }
            }
        }
        if !abort.is_aborted() {
            outcome = abort.guard(|| {
                let mut main = MainLoop {
                    reader: &mut reader,
                    ram: &ram,
                    barrier,
                    cfg,
                    progress,
                    flushes: 0,
                    switchover_start: false,
                };
                let result = main.run(opts.max_tail, opts.require_vmdesc)?;
                // The source closes the channels right after the main
                // stream; give them a bounded time to reach EOF.
                for c in &drain_handles {
                    let _ = c.set_read_timeout(Some(cfg.handshake_timeout));
                }
                Ok((result, main.flushes, main.switchover_start))
            });
        }
        for h in handles {
            if h.join().is_err() {
                abort.fail(Error::Panicked("multifd-recv".into()));
            }
        }
    });
    if abort.is_aborted() {
        return Err(Error::Aborted);
    }
    let (tail, flushes, switchover_start) = outcome.ok_or(Error::Aborted)?;
    // Pages on channels we never read would be lost: refuse to call it done.
    accept::reject_extra_channels(listener, cfg)?;
    if !abort.complete() {
        return Err(Error::Aborted);
    }
    if barrier.waiting() != 0 {
        return Err(Error::Mismatch(
            "multifd channels sent more SYNC packets than the main stream has flush points \
             (flush mode mismatch: multifd-flush-after-each-section?)"
                .into(),
        ));
    }
    Ok(Incoming {
        ram,
        configuration,
        prefix: reader.take_prefix(),
        tail,
        ram_section_id,
        switchover_start,
        flushes,
        stats: progress.stats(started.elapsed()),
    })
}
