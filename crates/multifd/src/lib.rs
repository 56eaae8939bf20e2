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
mod error;
mod lifecycle;
pub mod mapped_ram;
mod method;
mod ram;
pub mod snapshot;
mod source;
mod stats;
mod transport;

pub use config::{
    FlushMode, MethodConfig, MigrationConfig, ZeroPageDetection, format_uuid, parse_uuid,
};
pub use destination::{Incoming, RamProvider, ReceiveOptions, StreamSetup, receive};
pub use error::{Endpoint, Error, Result};
pub use lifecycle::Cancel;
pub use multifd_wire::packet::Compression;
pub use multifd_wire::stream::{Configuration, RamBlockInfo};
pub use ram::{Access, GuestRam, RamBlock, WriteTracker, WriteTrackerError};
pub use source::{SourceOptions, SourceVm, StaticRam, StreamPlan, migrate};
pub use stats::{Progress, Stats};
pub use transport::{Connection, IoSlice, IoSliceMut, Listener, TlsClient, TlsServer, Uri};
