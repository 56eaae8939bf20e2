//! Pure codecs for the wire format of QEMU 10.0's multifd live migration.
//!
//! Nothing here does I/O. Every decoder takes `&[u8]` and returns either a
//! validated value or a typed [`WireError`]; every length, count, offset and
//! name that comes from the wire is checked before it is used. The two halves:
//!
//! * [`packet`]: what travels on a multifd channel: the 64-byte initial
//!   packet, the 12-byte common header, the 1344-byte RAM packet header and
//!   the 276-byte device-state packet header.
//! * [`stream`]: the main migration stream (`QEVM` header, configuration
//!   section, section framing, the `ram` section records, commands, EOF and
//!   the vmdesc trailer), decoded incrementally from a byte buffer.
//!
//! Byte order is big-endian throughout, as on QEMU's wire.
#![forbid(unsafe_code)]

pub mod error;
pub mod packet;
pub mod stream;

pub use error::WireError;

/// Target page size of an x86 guest: the unit of every RAM offset on the wire.
pub const PAGE_SIZE: usize = 4096;

/// Page size as a `u64`, for offset arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
