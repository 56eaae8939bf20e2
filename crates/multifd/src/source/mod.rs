//! The source wing: connect, spawn one thread per multifd channel, drive
//! the precopy rounds, write the main stream, tear down.
//!
//! [`migrate`] is the entry point. Inside: [`driver`] runs the rounds and
//! hands batches of pages to the channels through [`dispatch`]'s queues;
//! each [`channel`] thread turns its batches into packets; [`main_stream`]
//! writes the main stream; [`peer_watch`] notices a destination that hung
//! up. Every thread is scoped; the first error is latched by [`Abort`],
//! which shuts every socket down, and every thread is joined before
//! [`migrate`] returns.

mod channel;
mod convergence;
mod dispatch;
mod driver;
mod main_stream;
mod peer_watch;
mod plan;
pub(crate) mod rate_limit;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_wire::packet::InitPacket;

pub use plan::StreamPlan;
// For targets that are not a network peer (a mapped-ram file): the round
// driver runs over their channel workers and main-stream writer.
pub(crate) use dispatch::{Job, JobQueue, queues};
pub(crate) use driver::Driver;
pub(crate) use main_stream::{MainStream, StreamOut};

use crate::config::MigrationConfig;
use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::{self, Abort, Cancel, Watchdog};
use crate::method;
use crate::ram::GuestRam;
use crate::stats::{MigrationStatus, Progress, Stats};
use crate::transport::{Connection, TlsClient, Uri};
use channel::ChannelWorker;
pub(crate) use dispatch::SyncsWritten;
pub(crate) use driver::VmMarks;
use peer_watch::{StopOnDrop, watch_peer};
use rate_limit::RateLimiter;

/// Batches a channel may hold beyond the one it is sending. Deeper queues
/// let the driver run ahead; shallow ones keep work flowing to whichever
/// channel is free. On loopback, 4 GiB, 4 channels: depth 1 reached 77% of
/// a raw TCP blast, 4 and 16 reached 86-88%. The driver sleeps while all
/// queues are full and is woken when one is down to half (see `dispatch`).
pub(crate) const QUEUE_DEPTH: usize = 8;

/// What a source VM provides to the driver. Guest RAM itself is the
/// caller's [`GuestRam`]; this trait covers the rest: the dirty log,
/// stopping (and, after a failure, restarting) the vCPUs, throttling them
/// for auto-converge, and the device state.
///
/// Order of calls in a live migration: round 1 sends every page; then, per
/// round, [`collect_dirty`](SourceVm::collect_dirty) and the pages it
/// reported; [`throttle`](SourceVm::throttle) when auto-converge is on and
/// rounds stop shrinking; at switchover [`pause`](SourceVm::pause), one
/// last `collect_dirty`, those pages, then
/// [`device_state`](SourceVm::device_state). If the migration fails or is
/// cancelled after `pause`, [`resume`](SourceVm::resume) is called before
/// [`migrate`] returns; a throttle is set back to 0 either way.
pub trait SourceVm {
    /// Appends to `dirty[b]` the offsets of block `b`'s pages written since
    /// the previous call (the first call follows round 1, which sends every
    /// page anyway). Start the dirty log before calling [`migrate`].
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> Result<()>;
    /// Stops the vCPUs for the final round: when it returns, guest RAM no
    /// longer changes.
    fn pause(&mut self) -> Result<()>;
    /// Device state to put between the `ram` END section and EOF, called
    /// once the VM is paused and the last pages are queued: complete FULL
    /// sections in QEMU's encoding, or nothing. A VMM of our own returns
    /// its opaque bytes wrapped by [`device_state_section`](crate::device_state_section);
    /// the destination gets them back from
    /// [`Incoming::device_state`](crate::Incoming::device_state).
    fn device_state(&mut self) -> Result<Vec<u8>>;
    /// Lets the vCPUs run again after [`pause`](SourceVm::pause), when the
    /// migration failed or was cancelled before the point of no return.
    /// The default does nothing (a source that never really pauses).
    fn resume(&mut self) -> Result<()> {
        Ok(())
    }
    /// Auto-converge: keep the vCPUs stopped `percent`% of the time
    /// (QEMU's cpu-throttle: in each 10 ms slice they run `100 - percent`%
    /// and sleep the rest); 0 ends throttling. Called only with
    /// [`SourceOptions::auto_converge`] set; the default refuses, which
    /// fails such a migration.
    fn throttle(&mut self, percent: u8) -> Result<()> {
        if percent == 0 {
            return Ok(());
        }
        Err(Error::Unsupported(
            "auto-converge: this source VM cannot throttle its vCPUs".into(),
        ))
    }
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
    /// Longest acceptable pause: the switchover starts once the expected
    /// downtime (the dirty pages at the bandwidth measured over the last
    /// round, plus the measured fixed costs of a sync and the pause) fits
    /// in it (QEMU's `downtime-limit`, default 300 ms).
    pub downtime_limit: Duration,
    /// Most rounds (round 1 included) before [`SourceOptions::on_limit`].
    pub max_rounds: u32,
    /// Longest time from the start before [`SourceOptions::on_limit`]
    /// (`None`: no limit on time).
    pub max_time: Option<Duration>,
    /// What happens at `max_rounds` or `max_time` while the dirty pages
    /// still do not fit in the downtime limit.
    pub on_limit: OnLimit,
    /// Bytes per second over all multifd channels together, one token
    /// bucket (QEMU's `max-bandwidth`; `None`: unlimited). The main stream,
    /// a few bytes a round, is not counted. Like QEMU's completion, the
    /// final round after the pause is not limited.
    pub max_bandwidth: Option<u64>,
    /// Throttle the vCPUs when rounds stop shrinking (QEMU's
    /// `auto-converge`); `None`: off.
    pub auto_converge: Option<AutoConverge>,
    /// Raise the downtime limit step by step when rounds stop shrinking;
    /// `None`: the limit stays.
    pub downtime_ramp: Option<DowntimeRamp>,
    /// Stops the migration from another thread, even while it is blocked
    /// writing to a receiver that stopped reading.
    pub cancel: Option<Arc<Cancel>>,
    /// TLS on every connection (QEMU's `tls-creds` on the source); `None`:
    /// plain connections.
    pub tls: Option<TlsClient>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            config: MigrationConfig::default(),
            plan: StreamPlan::default(),
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            max_time: None,
            on_limit: OnLimit::default(),
            max_bandwidth: None,
            auto_converge: None,
            downtime_ramp: None,
            cancel: None,
            tls: None,
        }
    }
}

/// What a source does when it reaches its limit on rounds or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Stop with [`Error::NotConverging`]; the VM was never paused and
    /// keeps running.
    #[default]
    Fail,
    /// Switch over anyway, with a downtime above the limit (for sources
    /// that must finish: an image, a guest being shut down).
    Switchover,
}

/// Auto-converge parameters (QEMU's `cpu-throttle-*` and
/// `throttle-trigger-threshold`). Rounds "stop shrinking" when the pages
/// dirtied during a round exceed `trigger_threshold`% of the pages that
/// round sent; the second time in a row the throttle goes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoConverge {
    /// First throttle, percent.
    pub initial: u8,
    /// Added each time after that, percent.
    pub increment: u8,
    /// Highest throttle, percent.
    pub max: u8,
    /// Dirtied / sent, percent, above which a round counts as not
    /// shrinking.
    pub trigger_threshold: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        Self {
            initial: 20,
            increment: 10,
            max: 99,
            trigger_threshold: 50,
        }
    }
}

/// Raises the downtime limit by `step` each time rounds stop shrinking (see
/// [`AutoConverge`]), up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DowntimeRamp {
    /// Added each time.
    pub step: Duration,
    /// The limit never goes above this.
    pub max: Duration,
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
    progress.set_status(MigrationStatus::Setup);
    // Woken by the abort path while the driver waits for a round's SYNCs.
    let syncs = SyncsWritten::default();
    let abort = Abort::new();
    abort.register_waker(&syncs);
    let cancel = opts.cancel.as_deref();
    let marks = VmMarks::default();
    let result = lifecycle::watched(
        cancel,
        || abort.fail(Error::Cancelled),
        || {
            migrate_inner(
                uri, ram, vm, opts, progress, &abort, &marks, &syncs, started,
            )
        },
    );
    abort.close_sockets();
    // The first recorded error is the cause; a direct error may be its
    // consequence (a socket shut down by the abort path).
    let result = match (result, abort.take_error()) {
        (_, Some(first)) => Err(first),
        (Err(e), None) => Err(e),
        (Ok(()), None) => Ok(()),
    };
    // Undo what was done to the VM: a failed migration leaves it running
    // at full speed on the source.
    if marks.throttle.load(Ordering::Relaxed) != 0 {
        if let Err(e) = vm.throttle(0) {
            tracing::error!("ending the vCPU throttle: {e}");
        }
        progress.set_throttle(0);
    }
    match result {
        Ok(()) => {
            if let Some(paused) = marks.paused_at.get() {
                progress.set_downtime(paused.elapsed());
            }
            progress.set_status(MigrationStatus::Completed);
            Ok(progress.stats(started.elapsed()))
        }
        Err(e) => {
            if marks.paused_at.get().is_some()
                && let Err(r) = vm.resume()
            {
                tracing::error!("resuming the source VM after a failed migration: {r}");
            }
            progress.set_status(match e {
                Error::Cancelled => MigrationStatus::Cancelled,
                _ => MigrationStatus::Failed,
            });
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn migrate_inner(
    uri: &Uri,
    ram: &GuestRam,
    vm: &mut dyn SourceVm,
    opts: &SourceOptions,
    progress: &Progress,
    abort: &Abort<'_>,
    marks: &VmMarks,
    syncs: &SyncsWritten,
    started: Instant,
) -> Result<()> {
    let cfg = &opts.config;
    let cancel = opts.cancel.as_deref();
    if cancel.is_some_and(Cancel::is_cancelled) {
        return Err(Error::Cancelled);
    }

    // Main channel first (a TLS destination classifies by order), then the
    // multifd channels, each opening with its initial packet.
    // Over TLS, the main handshake is complete before a channel connects:
    // a QEMU destination takes the first connection to complete its
    // handshake as the main channel.
    let open = |endpoint: Endpoint| -> Result<Connection> {
        let conn = Connection::connect(uri, cfg.connect_timeout, abort.wake_fd())?;
        abort.register_socket(&conn)?;
        match &opts.tls {
            Some(tls) => conn.start_tls_client(tls, uri, endpoint, cfg.handshake_timeout),
            None => Ok(conn),
        }
    };
    let mut main = open(Endpoint::Main)?;
    // Over TLS 1.3 our handshake is complete before the destination has
    // checked our certificate: a refusal (an alert, or from QEMU a bare
    // close) comes later, on the main channel, which we never read. The
    // setup watch fails the migration on it now, saying why, not later as
    // a broken pipe (or after retrying to connect to a receiver that gave
    // up).
    let mut channels = peer_watch::while_main_is_up(&mut main, abort, || {
        let mut channels = Vec::with_capacity(cfg.channels.into());
        for id in 0..cfg.channels {
            let mut conn = open(Endpoint::Channel(id))?;
            let init = InitPacket { uuid: cfg.uuid, id }.encode();
            std::io::Write::write_all(&mut conn, &init).map_err(|e| {
                Error::io(format!("multifd channel {id}: writing initial packet"), e)
            })?;
            progress.add(&progress.bytes, init.len() as u64);
            channels.push(conn);
        }
        Ok(channels)
    })?;

    let packet_num = AtomicU64::new(0);
    let limiter = RateLimiter::new(opts.max_bandwidth);
    let n_channels = channels.len() as u64;
    // done[0]: the main stream, done[1 + id]: channel `id`.
    let done: Vec<AtomicBool> = (0..=channels.len())
        .map(|_| AtomicBool::new(false))
        .collect();
    let watchdog = Watchdog::new(Some(cfg.idle_timeout));
    watchdog.watch(Endpoint::Main, &main);
    for (id, conn) in channels.iter().enumerate() {
        watchdog.watch(Endpoint::Channel(id as u8), conn);
    }
    let (stop_r, stop_w) =
        std::io::pipe().map_err(|e| Error::io("creating the peer-watch pipe", e))?;
    std::thread::scope(|s| {
        // Ends the peer watch on every way out of this scope.
        let stop_watch = StopOnDrop(stop_w);
        let done = &done;
        let watchdog = &watchdog;
        let limiter = &limiter;
        // Every thread is joined explicitly (so it has exited, not only
        // finished its work, when migrate returns).
        let mut services = Vec::new();
        let mut handles = Vec::new();
        // An error before the channels are all running must reach the
        // abort path before the scope joins the threads already started.
        let started_services = || -> Result<_> {
            services.push(lifecycle::spawn(
                s,
                "multifd-peer-watch".into(),
                abort,
                move || {
                    watch_peer(abort, done, &stop_r);
                    Ok(())
                },
            )?);
            services.push(lifecycle::spawn(
                s,
                "multifd-watchdog".into(),
                abort,
                move || {
                    watchdog.run(abort);
                    Ok(())
                },
            )?);
            let (dispatcher, queues) = dispatch::queues(channels.len(), QUEUE_DEPTH);
            for ((id, conn), jobs) in channels.drain(..).enumerate().zip(queues) {
                let worker = ChannelWorker {
                    id: id as u8,
                    conn,
                    method: method::new_send(&cfg.method)?,
                    zero_pages: cfg.zero_page_detection,
                    packet_num: &packet_num,
                    progress,
                    done: &done[1 + id],
                    limiter,
                    syncs,
                    abort,
                };
                handles.push(lifecycle::spawn(
                    s,
                    format!("multifd-send-{id}"),
                    abort,
                    move || worker.run(jobs),
                )?);
            }
            Ok(dispatcher)
        };
        let dispatcher = started_services();
        let join_services = |services: Vec<std::thread::ScopedJoinHandle<'_, Option<()>>>| {
            watchdog.stop();
            drop(stop_watch);
            for h in services {
                let _ = h.join();
            }
        };
        let dispatcher = match dispatcher {
            Ok(d) => d,
            Err(e) => {
                abort.fail(e);
                for h in handles {
                    let _ = h.join();
                }
                join_services(services);
                return Ok(());
            }
        };
        let driver = Driver {
            ram,
            opts,
            dispatcher,
            main: MainStream::new(main, opts.plan.ram_section_id, progress),
            progress,
            cancel,
            watchdog,
            limiter,
            syncs,
            syncs_due: 0,
            channels: n_channels,
            started,
            marks,
            batch_pages: multifd_wire::packet::PAGES_PER_PACKET,
        };
        driver.run_to_end(vm, abort, handles, || {
            done[0].store(true, Ordering::Release);
        });
        join_services(services);
        Ok(())
    })
}
