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
mod dispatch;
mod driver;
mod main_stream;
mod peer_watch;
mod plan;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_wire::packet::InitPacket;

pub use plan::StreamPlan;

use crate::config::MigrationConfig;
use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::{self, Abort, Cancel, Watchdog};
use crate::method;
use crate::ram::GuestRam;
use crate::stats::{Progress, Stats};
use crate::transport::{Connection, TlsClient, Uri};
use channel::ChannelWorker;
use driver::Driver;
use main_stream::MainStream;
use peer_watch::{StopOnDrop, watch_peer};

/// Batches a channel may hold beyond the one it is sending. Deeper queues
/// let the driver run ahead; shallow ones keep work flowing to whichever
/// channel is free. On loopback, 4 GiB, 4 channels: depth 1 reached 77% of
/// a raw TCP blast, 4 and 16 reached 86-88%. The driver sleeps while all
/// queues are full and is woken when one is down to half (see `dispatch`).
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
            cancel: None,
            tls: None,
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
    let result = lifecycle::watched(
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
    // Over TLS, the main handshake is complete before a channel connects:
    // a QEMU destination takes the first connection to complete its
    // handshake as the main channel.
    let open = |endpoint: Endpoint, wake: Option<&dyn AsRawFd>| -> Result<Connection> {
        let conn = Connection::connect(uri, cfg.connect_timeout, wake)?;
        abort.register_socket(&conn)?;
        match &opts.tls {
            Some(tls) => conn.start_tls_client(tls, uri, endpoint, cfg.handshake_timeout),
            None => Ok(conn),
        }
    };
    let mut main = open(Endpoint::Main, abort.wake_fd())?;
    // Over TLS 1.3 our handshake is complete before the destination has
    // checked our certificate: a refusal (an alert, or from QEMU a bare
    // close) comes later, on the main channel, which we never read. Until
    // every channel is open, connecting waits on the main channel too (the
    // abort path shuts it down, so that wakes as well) and it is looked at
    // after every channel: a refusal fails the migration now, saying why,
    // not later as a broken pipe (or after retrying to connect to a
    // receiver that gave up).
    let tls = opts.tls.is_some();
    let mut channels = Vec::with_capacity(cfg.channels.into());
    for id in 0..cfg.channels {
        let wake = if tls {
            Some(&main as &dyn AsRawFd)
        } else {
            abort.wake_fd()
        };
        let opened = open(Endpoint::Channel(id), wake).and_then(|mut conn| {
            let init = InitPacket { uuid: cfg.uuid, id }.encode();
            std::io::Write::write_all(&mut conn, &init).map_err(|e| {
                Error::io(format!("multifd channel {id}: writing initial packet"), e)
            })?;
            progress.add(&progress.bytes, init.len() as u64);
            Ok(conn)
        });
        if let Some(refused) = main.peer_refusal(Endpoint::Main) {
            return Err(refused);
        }
        channels.push(opened?);
    }

    let packet_num = AtomicU64::new(0);
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
        // Every thread is joined explicitly (so it has exited, not only
        // finished its work, when migrate returns).
        let mut services = Vec::new();
        let mut handles = Vec::new();
        // An error before the channels are all running must reach the
        // abort path before the scope joins the threads already started.
        let started = || -> Result<_> {
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
        let started = started();
        let join_services = |services: Vec<std::thread::ScopedJoinHandle<'_, Option<()>>>| {
            watchdog.stop();
            drop(stop_watch);
            for h in services {
                let _ = h.join();
            }
        };
        let dispatcher = match started {
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
        let mut driver = Driver {
            ram,
            opts,
            dispatcher,
            main: MainStream::new(main, opts.plan.ram_section_id, progress),
            progress,
            cancel,
            abort,
            watchdog,
        };
        let driven = lifecycle::catch_panic(abort, "multifd-driver", || driver.run(vm));
        // Closing the queues lets the channels drain and end.
        let Driver {
            dispatcher, main, ..
        } = driver;
        drop(dispatcher);
        // The channels end once their queues are empty (a panic or error
        // in one was already turned into the migration's error).
        for h in handles {
            let _ = h.join();
        }
        if driven.is_some() && !abort.is_aborted() {
            // All channel data is written: end the main stream.
            done[0].store(true, Ordering::Release);
            lifecycle::catch_panic(abort, "multifd-driver", || main.finish());
        }
        join_services(services);
        Ok(())
    })
}
