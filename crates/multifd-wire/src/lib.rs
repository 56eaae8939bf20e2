//! Pure codecs for the wire format of QEMU 10.0's multifd live migration.
//!
//! Nothing here does I/O. Every decoder takes `&[u8]` and returns either a
//! validated value or a typed [`WireError`]; every length, count, offset and
//! name that comes from the wire is checked before it is used. The parts:
//!
//! * [`packet`]: what travels on a multifd channel: the 64-byte initial
//!   packet, the 12-byte common header, the 1344-byte RAM packet header and
//!   the 276-byte device-state packet header.
//! * [`stream`]: the main migration stream (`QEVM` header, configuration
//!   section, section framing, the `ram` section records, commands, EOF and
//!   the vmdesc trailer), decoded incrementally from a byte buffer.
//! * [`mapped_ram`]: the file format of `migrate file:` with the `mapped-ram`
//!   capability: the per-block header, where each block's bitmap and pages
//!   are in the file, and the bitmap itself ([`stream::file`] reads the main
//!   stream of such a file).
//!
//! Byte order is big-endian throughout, as on QEMU's wire (except the
//! mapped-ram bitmap, which is in the source host's order).
#![forbid(unsafe_code)]

pub mod error;
pub mod mapped_ram;
pub mod packet;
pub mod stream;

pub use error::WireError;

/// Target page size of an x86 guest: the unit of every RAM offset on the wire.
pub const PAGE_SIZE: usize = 4096;

/// Page size as a `u64`, for offset arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
