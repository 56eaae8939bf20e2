//! # multifd
//!
//! A QEMU 10.0-compatible *multifd* live-migration engine: guest RAM is
//! streamed over N parallel channels, each a thread with its own
//! connection, pages turned into packets by a pluggable payload method
//! (none, zlib, zstd), synchronised per dirty round, torn down without
//! races. The wire format is QEMU's own (see [`multifd_wire`]), so a real
//! QEMU can be either peer.
//!
//! ## Embedding it
//! Guest RAM, the dirty log, device state and vCPU pause are yours; rounds,
//! channels, methods, convergence and teardown are ours.
//!
//! * The source calls [`migrate`] with its [`GuestRam`] and a [`SourceVm`]
//!   (the dirty log, pausing the vCPUs, device state) or [`StaticRam`] for
//!   memory that does not change.
//! * The destination calls [`receive`] on a [`Listener`] with a
//!   [`RamProvider`] that maps the blocks the source announces, and gets
//!   an [`Incoming`] back once every page has landed.
//! * Both sides take the same [`MigrationConfig`] (QEMU has no negotiation),
//!   report through [`Progress`] while running, return [`Stats`], can be
//!   stopped with a [`Cancel`], and fail with a typed [`Error`].
//! * [`snapshot`] stores an incoming migration in a directory and replays it.
//!
//! ```
//! use std::sync::Arc;
//! use multifd::{
//!     GuestRam, Listener, MigrationConfig, Progress, RamBlock, RamBlockInfo, RamProvider,
//!     ReceiveOptions, SourceOptions, StaticRam, Uri,
//! };
//!
//! // One 1 MiB block with a pattern on the source.
//! let mut ram = GuestRam::new();
//! ram.push(RamBlock::anonymous("m0", 1 << 20)?)?;
//! ram.blocks()[0].write_page(0x3000, &[0x5a; 4096])?;
//!
//! // The destination maps whatever blocks the source announces.
//! struct Fresh;
//! impl RamProvider for Fresh {
//!     fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
//!         let mut ram = GuestRam::new();
//!         for b in blocks {
//!             ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
//!         }
//!         Ok(ram)
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let uri = Uri::Unix(dir.path().join("mig.sock"));
//! let listener = Listener::bind(&uri)?;
//! let config = MigrationConfig { channels: 4, ..MigrationConfig::default() };
//! let recv_opts = ReceiveOptions { config: config.clone(), ..ReceiveOptions::default() };
//! let send_opts = SourceOptions { config, ..SourceOptions::default() };
//! let incoming = std::thread::scope(|s| {
//!     let dest = s.spawn(|| multifd::receive(&listener, &recv_opts, &mut Fresh, &Progress::default()));
//!     multifd::migrate(&uri, &ram, &mut StaticRam, &send_opts, &Progress::default())?;
//!     dest.join().expect("receiver thread")
//! })?;
//!
//! let mut page = [0u8; 4096];
//! incoming.ram.blocks()[0].read_page(0x3000, &mut page)?;
//! assert_eq!(page, [0x5a; 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Live migration of a running VM
//! The embedding API of a VMM: guest RAM is its vm-memory `GuestMemoryMmap`
//! (each region a named block, used in place, no copy); the driver asks the
//! VMM's [`SourceVm`] for the pages written since it last asked, throttles
//! the vCPUs when rounds stop shrinking ([`SourceOptions::auto_converge`]),
//! pauses them at the switchover and takes the device state as opaque
//! bytes ([`device_state_section`]); the destination's caller gets the
//! bytes back from [`Incoming::device_state`] once every page was applied.
//! A [`Cancel`] stops it (a paused VM is resumed), and
//! [`Progress::query`] gives `query-migrate` figures ([`MigrationInfo`])
//! from any thread while it runs. A migration that cannot converge within
//! [`SourceOptions::max_rounds`] / [`SourceOptions::max_time`] ends with
//! [`Error::NotConverging`], the VM still running.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//! use multifd::{
//!     AutoConverge, Cancel, GuestRam, Listener, MigrationStatus, Progress, RamBlock,
//!     RamBlockInfo, RamProvider, ReceiveOptions, SourceOptions, SourceVm, Uri,
//! };
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // The VMM's guest RAM, migrated in place.
//! let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! memory.write_obj(0x11u8, GuestAddress(0x1000))?;
//! let ram = GuestRam::from_guest_memory(&memory, |i, _| format!("ram{i}"))?;
//!
//! // The VMM's side. A real one asks KVM (KVM_GET_DIRTY_LOG, the dirty
//! // ring) or a multifd::WriteTracker for the pages written since the last
//! // call; this "vCPU" writes one page each time it is asked.
//! struct Vmm<'m> {
//!     memory: &'m GuestMemoryMmap,
//!     running: bool,
//!     registers: [u8; 8],
//! }
//! impl SourceVm for Vmm<'_> {
//!     fn collect_dirty(&mut self, _: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
//!         if self.running {
//!             self.memory.write_obj(0x22u8, GuestAddress(0x2000)).unwrap();
//!             dirty[0].push(0x2000);
//!         }
//!         Ok(())
//!     }
//!     fn pause(&mut self) -> multifd::Result<()> {
//!         self.running = false; // stop the vCPUs
//!         Ok(())
//!     }
//!     fn resume(&mut self) -> multifd::Result<()> {
//!         self.running = true; // only after a failed or cancelled switchover
//!         Ok(())
//!     }
//!     fn throttle(&mut self, _percent: u8) -> multifd::Result<()> {
//!         Ok(()) // auto-converge: let the vCPUs sleep this share of the time
//!     }
//!     fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
//!         multifd::device_state_section(2, &self.registers)
//!     }
//! }
//!
//! // The destination VMM creates its RAM once the source announced it.
//! struct Fresh;
//! impl RamProvider for Fresh {
//!     fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
//!         let mut ram = GuestRam::new();
//!         for b in blocks {
//!             ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
//!         }
//!         Ok(ram)
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let uri = Uri::Unix(dir.path().join("live.sock"));
//! let listener = Listener::bind(&uri)?;
//! let cancel = Arc::new(Cancel::new()); // cancel.cancel() from anywhere stops it
//! let opts = SourceOptions {
//!     downtime_limit: Duration::from_millis(300),
//!     max_bandwidth: Some(1 << 30),
//!     auto_converge: Some(AutoConverge::default()),
//!     cancel: Some(cancel.clone()),
//!     ..SourceOptions::default()
//! };
//! let mut vmm = Vmm { memory: &memory, running: true, registers: *b"rip=7c00" };
//! let progress = Progress::default();
//! let done = AtomicBool::new(false);
//! let incoming = std::thread::scope(|s| {
//!     let dest = s.spawn(|| {
//!         multifd::receive(&listener, &ReceiveOptions::default(), &mut Fresh, &Progress::default())
//!     });
//!     s.spawn(|| {
//!         while !done.load(Ordering::Acquire) {
//!             let info = progress.query(); // status, expected downtime, remaining, ...
//!             assert_ne!(info.status, MigrationStatus::Failed);
//!             std::thread::sleep(Duration::from_millis(1));
//!         }
//!     });
//!     let sent = multifd::migrate(&uri, &ram, &mut vmm, &opts, &progress);
//!     done.store(true, Ordering::Release);
//!     sent?;
//!     dest.join().expect("destination thread")
//! })?;
//!
//! let info = progress.query();
//! assert_eq!(info.status, MigrationStatus::Completed);
//! assert!(info.downtime.is_some() && info.dirty_sync_count >= 1);
//! // RAM and device state, handed over only after everything was applied.
//! assert_eq!(incoming.device_state()?, Some(&b"rip=7c00"[..]));
//! let mut page = [0u8; 4096];
//! incoming.ram.blocks()[0].read_page(0x2000, &mut page)?;
//! assert_eq!(page[0], 0x22);
//! incoming.ram.blocks()[0].read_page(0x1000, &mut page)?;
//! assert_eq!(page[0], 0x11);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Inside
//! Two wings over a shared core: `source` (the round driver, the dispatcher
//! and its queues, the channel threads, the main-stream writer, the peer
//! watch) and `destination` (accept and classify, the main-stream reader and
//! loop, the channel threads, the sync barrier) both stand on `ram` (guest
//! memory, checked pages, zero scan), `transport` (sockets, I/O vectors) and
//! `method` (`pages -> prepare() -> I/O vectors`, and back). Every thread
//! is spawned inside a scope that outlives nothing it borrows; the first
//! error is recorded once, every socket is shut down so blocked I/O
//! returns, the barrier wakes its waiters, and all threads are joined
//! before an error is returned.
#![deny(unsafe_code)]

mod config;
mod destination;
mod device_state;
mod error;
mod lifecycle;
pub mod mapped_ram;
mod method;
mod ram;
pub mod snapshot;
mod source;
mod stats;
mod sync;
mod transport;

pub use config::{
    FlushMode, MethodConfig, MigrationConfig, ZeroPageDetection, format_uuid, parse_uuid,
};
pub use destination::{Incoming, RamProvider, ReceiveOptions, StreamSetup, receive};
pub use device_state::{DEVICE_STATE_IDSTR, device_state_section};
pub use error::{Endpoint, Error, Result};
pub use lifecycle::Cancel;
pub use multifd_wire::packet::Compression;
pub use multifd_wire::stream::{Configuration, RamBlockInfo};
pub use ram::{Access, GuestRam, RamBlock, WriteTracker, WriteTrackerError};
pub use source::{
    AutoConverge, DowntimeRamp, OnLimit, SourceOptions, SourceVm, StaticRam, StreamPlan, migrate,
};
pub use stats::{MigrationInfo, MigrationStatus, Progress, Stats};
pub use transport::{Connection, IoSlice, IoSliceMut, Listener, TlsClient, TlsServer, Uri};
