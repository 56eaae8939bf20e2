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
mod strays;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use multifd_wire::stream::{Configuration, RamBlockInfo};

use crate::config::{MigrationConfig, format_uuid};
use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::{self, Abort, Cancel, Watchdog};
use crate::method;
use crate::ram::GuestRam;
use crate::stats::{Progress, Stats};
use crate::transport::{Connection, Listener, TlsServer};
use barrier::SyncBarrier;
use channel::RecvChannel;
use main_loop::MainLoop;
use main_stream::{Setup, StreamReader};
use strays::StrayGuard;

/// Supplies the RAM blocks a source announces (`--ram` files, snapshot
/// files, or the embedding VMM's memory).
pub trait RamProvider {
    /// Returns RAM with exactly these blocks (names and lengths).
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> Result<GuestRam>;

    /// Like [`provide`](RamProvider::provide), told also what the source
    /// said before its block list (a provider that writes the stream
    /// somewhere needs it: a mapped-ram capture lays its file out from
    /// it). The default calls `provide`.
    fn provide_for(&mut self, setup: &StreamSetup<'_>) -> Result<GuestRam> {
        self.provide(setup.blocks)
    }
}

/// What a source's main stream said up to its RAM block list.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct StreamSetup<'a> {
    /// The configuration section.
    pub configuration: &'a Configuration,
    /// Section id of `ram`.
    pub ram_section_id: u32,
    /// The RAM blocks, in the source's order.
    pub blocks: &'a [RamBlockInfo],
}

/// Fails with [`Error::RamLimit`] when `blocks` announce more RAM in all
/// than `limit` (a sum that overflows counts as `u64::MAX`): checked
/// before anything is sized by them.
pub(crate) fn check_announced_ram(blocks: &[RamBlockInfo], limit: u64) -> Result<()> {
    let announced = blocks
        .iter()
        .try_fold(0u64, |sum, b| sum.checked_add(b.used_length))
        .unwrap_or(u64::MAX);
    if announced > limit {
        return Err(Error::RamLimit { announced, limit });
    }
    Ok(())
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
    /// Most guest RAM a source may announce, in bytes, checked against its
    /// block list before anything is mapped or created (default: this
    /// host's physical memory).
    pub max_ram: u64,
    /// Stops the migration from another thread (also while waiting for
    /// connections).
    pub cancel: Option<Arc<Cancel>>,
    /// TLS on every connection (QEMU's `tls-creds` on the destination);
    /// `None`: plain connections.
    pub tls: Option<TlsServer>,
    /// Over TLS, a multifd channel that ends without close_notify is an
    /// error (QEMU's `multifd-clean-tls-termination`, on for 10.0 machine
    /// types; QEMU 10.0 sources always send it). The main channel may end
    /// without it either way, as QEMU's does.
    pub tls_clean_termination: bool,
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
            max_tail: 32 << 20,
            max_ram: crate::ram::physical_memory(),
            cancel: None,
            require_vmdesc: true,
            tls: None,
            tls_clean_termination: true,
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

impl Incoming {
    /// The opaque device state the source sent with
    /// [`device_state_section`](crate::device_state_section), or `None`
    /// when the tail holds none (a QEMU source's tail, a source without
    /// device state). Handed out only after every page was applied, since
    /// an `Incoming` exists only then. A damaged section is
    /// [`Error::Wire`].
    pub fn device_state(&self) -> Result<Option<&[u8]>> {
        crate::device_state::find_device_state(&self.tail)
    }
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
    let result = lifecycle::watched(
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
    let accepted = accept::accept_all(
        listener,
        cfg,
        opts.accept_timeout,
        opts.tls.as_ref(),
        opts.tls_clean_termination,
        abort,
    )?;
    let started = Instant::now();
    tracing::info!(channels = cfg.channels, "all channels connected");
    let watchdog = Watchdog::new(Some(cfg.idle_timeout));
    watchdog.watch(Endpoint::Main, &accepted.main);
    for (id, conn) in accepted.channels.iter().enumerate() {
        watchdog.watch(Endpoint::Channel(id as u8), conn);
    }
    let short = cfg.handshake_timeout.min(SHORT_WAIT);
    let strays = StrayGuard::new(listener, short)?;
    let reader = StreamReader::new(accepted.main, accepted.main_head, cfg.handshake_timeout);
    let migration = Migration {
        opts,
        progress,
        abort,
        barrier,
        watchdog: &watchdog,
        drain: short,
    };
    std::thread::scope(|s| {
        let dog = lifecycle::spawn(s, "multifd-watchdog".into(), abort, || {
            watchdog.run(abort);
            Ok(())
        })
        .map_err(|e| abort.fail(e));
        let guard = lifecycle::spawn(s, "multifd-strays".into(), abort, || strays.run(abort))
            .map_err(|e| abort.fail(e));
        let incoming = lifecycle::catch_panic(abort, "multifd-recv-main", || {
            migration.run(reader, accepted.channels, provider)
        });
        // A success stands only once the connections that queued up behind
        // the migration's own were looked at (bounded).
        strays.finish();
        if let Ok(h) = guard {
            let _ = h.join();
        }
        watchdog.stop();
        if let Ok(h) = dog {
            let _ = h.join();
        }
        // The point of no return: from here a cancel is too late.
        match incoming {
            Some(mut inc) if abort.complete() => {
                inc.stats = progress.stats(started.elapsed());
                Ok(inc)
            }
            _ => Err(Error::Aborted),
        }
    })
}

/// How long a late connection may take to identify itself, and the drain
/// of channels after the main stream ended, at most.
const SHORT_WAIT: Duration = Duration::from_secs(1);

/// One incoming migration after its connections were accepted.
struct Migration<'a, 'w> {
    opts: &'a ReceiveOptions,
    progress: &'a Progress,
    abort: &'a Abort<'w>,
    barrier: &'a SyncBarrier,
    watchdog: &'a Watchdog,
    /// How long channels may stay open after the main stream ended.
    drain: Duration,
}

impl Migration<'_, '_> {
    fn run(
        &self,
        mut reader: StreamReader,
        channels: Vec<Connection>,
        provider: &mut dyn RamProvider,
    ) -> Result<Incoming> {
        let cfg = &self.opts.config;
        // The main stream up to the block list, which must come promptly.
        let Setup {
            configuration,
            ram_section_id,
            blocks,
        } = reader.read_setup()?;
        check_uuid(&configuration, cfg)?;
        check_announced_ram(&blocks, self.opts.max_ram)?;
        let ram = {
            let _work = self.watchdog.hold();
            provider.provide_for(&StreamSetup {
                configuration: &configuration,
                ram_section_id,
                blocks: &blocks,
            })?
        };
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
        let (tail, flushes, switchover_start) = self.transfer(&mut reader, channels, &ram)?;
        Ok(Incoming {
            ram,
            configuration,
            prefix: reader.take_prefix(),
            tail,
            ram_section_id,
            switchover_start,
            flushes,
            stats: self.progress.stats(Duration::ZERO),
        })
    }

    /// Runs the channel threads and the main loop to the end of the
    /// stream; returns the tail, the sync points seen and whether
    /// SWITCHOVER_START came.
    fn transfer(
        &self,
        reader: &mut StreamReader,
        channels: Vec<Connection>,
        ram: &GuestRam,
    ) -> Result<(Vec<u8>, u64, bool)> {
        let cfg = &self.opts.config;
        let abort = self.abort;
        let mut cut_handles = Vec::with_capacity(channels.len());
        for c in &channels {
            cut_handles.push(
                c.try_clone()
                    .map_err(|e| Error::io("duplicating a socket handle", e))?,
            );
        }
        let finished = Countdown::new(channels.len());
        let ended: Vec<AtomicBool> = channels.iter().map(|_| AtomicBool::new(false)).collect();
        std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(channels.len());
            // An error here must reach the abort path before the threads are
            // joined, or the channel threads would wait for data forever.
            let body = || -> Result<(Vec<u8>, u64, bool)> {
                for (id, conn) in channels.into_iter().enumerate() {
                    let ch = RecvChannel {
                        id: id as u8,
                        conn,
                        method: method::new_recv(&cfg.method, id as u8)?,
                        method_cfg: cfg.method,
                        ram,
                        barrier: self.barrier,
                        progress: self.progress,
                    };
                    let (finished, ended) = (&finished, &ended[id]);
                    handles.push(lifecycle::spawn(
                        s,
                        format!("multifd-recv-{id}"),
                        abort,
                        move || {
                            let _done = finished.on_drop(ended);
                            ch.run()
                        },
                    )?);
                }
                let mut main = MainLoop {
                    reader,
                    ram,
                    barrier: self.barrier,
                    cfg,
                    progress: self.progress,
                    flushes: 0,
                    switchover_start: false,
                };
                // On an error, the abort path wakes the channels (and the
                // error stays the first one).
                let tail = main.run(self.opts.max_tail, self.opts.require_vmdesc)?;
                // The stream ended well (the main loop closed the barrier at
                // the ram END's EOS; a stream without one is closed here): a
                // channel waiting for a flush point, or sending one, is out
                // of step.
                self.barrier.close()?;
                // The source closes its channels right after the main stream.
                // One that stays open is given a short drain, then cut: if it
                // was between packets (its last SYNC is in, so all its pages
                // are), it ends cleanly; if it was inside one, that is an error.
                if !finished.wait(self.drain) {
                    for (id, handle) in cut_handles.iter().enumerate() {
                        if !ended[id].load(Ordering::Acquire) {
                            tracing::debug!(
                                channel = id,
                                "cutting a channel left open after the end"
                            );
                            handle.shutdown_read();
                        }
                    }
                }
                Ok((tail, main.flushes, main.switchover_start))
            };
            let out = body().map_err(|e| {
                abort.fail(e);
                Error::Aborted
            });
            for h in handles {
                let _ = h.join();
            }
            out
        })
    }
}

/// The source's VM UUID (sent with QEMU's `validate-uuid`) must be ours,
/// if we have one; QEMU's destination only warns when it has none.
fn check_uuid(configuration: &Configuration, cfg: &MigrationConfig) -> Result<()> {
    let Some(theirs) = configuration.uuid else {
        return Ok(());
    };
    if cfg.uuid == [0; 16] {
        tracing::warn!(
            uuid = %format_uuid(&theirs),
            "the source names its VM's UUID but none is configured here"
        );
        return Ok(());
    }
    if theirs != cfg.uuid {
        return Err(Error::SourceUuidMismatch {
            received: format_uuid(&theirs),
            expected: format_uuid(&cfg.uuid),
        });
    }
    Ok(())
}

/// Counts threads down; a waiter learns when all are done.
struct Countdown {
    left: Mutex<usize>,
    cv: Condvar,
}

/// Counts its thread down (and marks it ended) on every way out.
struct CountOnDrop<'a>(&'a Countdown, &'a AtomicBool);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.1.store(true, Ordering::Release);
        let mut left = self.0.left.lock().unwrap_or_else(|p| p.into_inner());
        *left -= 1;
        self.0.cv.notify_all();
    }
}

impl Countdown {
    fn new(n: usize) -> Self {
        Self {
            left: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn on_drop<'a>(&'a self, ended: &'a AtomicBool) -> CountOnDrop<'a> {
        CountOnDrop(self, ended)
    }

    /// Waits until every thread is done, at most `timeout`; true if they are.
    fn wait(&self, timeout: Duration) -> bool {
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let (left, _) = self
            .cv
            .wait_timeout_while(left, timeout, |left| *left > 0)
            .unwrap_or_else(|p| p.into_inner());
        *left == 0
    }
}
