//! # multifd
//!
//! A QEMU 10.0-compatible *multifd* live-migration engine: guest RAM is
//! streamed over N parallel channels, each a thread with its own
//! connection, pages turned into packets by a pluggable payload method
//! (none, zlib, zstd), synchronised per dirty round, torn down without
//! races. The wire format is QEMU's own (see [`multifd_wire`]), so a real
//! QEMU can be either peer.
//!
//! ## Layers
//! * [`ram`]: named RAM blocks over `mmap` (file-backed, like a QEMU
//!   `memory-backend-file`, or anonymous).
//! * [`transport`]: TCP and Unix sockets, vectored I/O, shutdown.
//! * [`method`]: `pages -> prepare() -> I/O vectors`, and back.
//! * `send` / `recv`: channel threads, hand-off, the sync barrier, abort.
//! * [`qemu`]: the main stream plan and snapshot directories.
//! * [`migrate`]: the precopy source driver; [`recv::receive`] is the
//!   destination.
//!
//! ## Lifecycle guarantees
//! Every thread is spawned inside a scope that outlives nothing it
//! borrows; the first error is recorded once, every socket is shut down so
//! blocked I/O returns, the barrier wakes its waiters, and all threads are
//! joined before an error is returned.
#![deny(unsafe_code)]

mod abort;
mod barrier;
pub mod cancel;
pub mod config;
pub mod error;
pub mod method;
pub mod migrate;
pub mod qemu;
pub mod ram;
pub mod recv;
mod send;
pub mod stats;
pub mod transport;

pub use cancel::Cancel;
pub use config::{FlushMode, MethodConfig, MigrationConfig, ZeroPageDetection};
pub use error::{Error, Result};
pub use multifd_wire::packet::Compression;
pub use stats::{Progress, Stats};
