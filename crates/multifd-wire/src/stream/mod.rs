//! The main migration stream: the one byte stream of a migration that is not
//! a multifd channel.
//!
//! # What travels on it
//!
//! With multifd, guest pages travel on the multifd channels; the main stream
//! only frames the migration and carries small control records. It is a flat
//! sequence of *elements*, each introduced by a one-byte type ([`element`]),
//! with no overall length prefix and no padding:
//!
//! ```text
//! "QEVM" v3                         file header (8 bytes)
//! 0x07 len "none" [0x05 subsection…] configuration (machine type, optional
//!                                    target page bits / capabilities / UUID)
//! [0x08 commands]                   e.g. OPEN_RETURN_PATH, PING 1
//! 0x01 id "ram" 0 4 | records | 0x7E id      START of the ram section
//! 0x02 id | records | 0x7E id                   zero or more PARTs
//! 0x08 SWITCHOVER_START
//! 0x03 id | records | 0x7E id                   END of the ram section
//! 0x04 id "timer" … | 0x7E id                 FULL device sections (opaque)
//! 0x00                                          EOF
//! 0x06 len {json}                               optional vmdesc trailer
//! ```
//!
//! Inside a ram section the payload is a run of *records*. Each record begins
//! with a big-endian u64: its low 12 bits are [`ram_flags`], the rest a
//! page-aligned offset inside a RAM block (for `MEM_SIZE`, a byte count).
//! The first record of the START section lists the RAM blocks (`MEM_SIZE`);
//! after that a multifd stream holds only `MULTIFD_FLUSH` sync markers, and,
//! with `zero-page-detection=legacy`, `ZERO` records naming zero pages. A
//! `ZERO` or `PAGE` record names its block unless it carries `CONTINUE`, in
//! which case it reuses the block named last (across sections). Every run
//! ends with `EOS`, after which the section footer must follow.
//!
//! Device sections (`FULL`) are the devices' own vmstate encodings, which
//! are not self-describing; this crate does not parse them. The [`Decoder`]
//! stops at the first one ([`Event::DeviceTail`]) and the caller keeps the
//! rest of the connection as an opaque blob, checked with [`check_tail`].
//!
//! # How to use it
//!
//! [`Encoder`] writes a whole precopy stream and keeps its grammar (chunks
//! closed, CONTINUE for the same block, nothing after EOF); [`encode`] has
//! the single elements it is made of, for tests and tools that need to
//! write a stream the grammar forbids. [`Decoder`] is an incremental
//! decoder: hand it the unconsumed bytes; it returns one [`Event`] and how
//! many bytes it used, or asks for more bytes without changing its state.
//! The main stream of a mapped-ram migration file, whose block list is
//! interleaved with the blocks' bitmaps and pages, is read with
//! [`file::FileDecoder`] instead.

use crate::WireError;

mod command;
mod config;
mod cursor;
mod decode;
pub mod encode;
mod encoder;
pub mod file;
mod ram;
mod tail;
#[cfg(test)]
mod tests;

pub use decode::{Decoded, Decoder, Event};
pub use encoder::Encoder;
pub use tail::check_tail;

/// Magic of the main stream: `"QEVM"`.
pub const QEVM_MAGIC: u32 = 0x5145_564D;
/// The only stream version QEMU speaks (version 2 is refused as obsolete).
pub const STREAM_VERSION: u32 = 3;
/// Idstr of the RAM live section.
pub const RAM_SECTION_IDSTR: &str = "ram";
/// Version of the RAM live section.
pub const RAM_SECTION_VERSION: u32 = 4;
/// Largest vmdesc JSON we accept or write (QEMU's are ~1 KiB to ~50 KiB).
pub const MAX_VMDESC_LEN: u32 = 16 << 20;
/// Largest number of RAM blocks accepted in a `MEM_SIZE` list.
pub const MAX_RAM_BLOCKS: usize = 1024;
/// Largest number of capabilities accepted in the configuration section
/// (QEMU only ever sends the validated ones, at most two).
pub const MAX_CAPABILITIES: usize = 64;
/// Longest machine-type name accepted or written.
pub const MAX_MACHINE_NAME_LEN: usize = 255;

/// Flag bits in the low 12 bits of a RAM record header.
pub mod ram_flags {
    /// A page that is all zero (legacy zero-page detection): block name
    /// unless CONTINUE, then a fill byte that must be 0.
    pub const ZERO: u64 = 0x2;
    /// The RAM block list (first record of the ram START section only).
    pub const MEM_SIZE: u64 = 0x4;
    /// A raw page: block name unless CONTINUE, then 4096 bytes.
    pub const PAGE: u64 = 0x8;
    /// End of this section's RAM records.
    pub const EOS: u64 = 0x10;
    /// Modifier of ZERO/PAGE: same block as the previous record, no name.
    pub const CONTINUE: u64 = 0x20;
    /// Delta-encoded page; never used with multifd (rejected).
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook (rejected).
    pub const HOOK: u64 = 0x80;
    /// Old compressed page, removed in QEMU 9.1 (rejected).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd sync point: every channel sends a SYNC packet for it.
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// The bits of a record header that are flags (below the page size).
    pub const MASK: u64 = 0xFFF;
}

/// Element type bytes of the main stream.
pub mod element {
    /// End of the device state.
    pub const EOF: u8 = 0x00;
    /// First chunk of a live section.
    pub const START: u8 = 0x01;
    /// Middle chunk of a live section.
    pub const PART: u8 = 0x02;
    /// Last chunk of a live section.
    pub const END: u8 = 0x03;
    /// Complete state of a non-iterable device.
    pub const FULL: u8 = 0x04;
    /// Subsection inside vmstate data (and the configuration).
    pub const SUBSECTION: u8 = 0x05;
    /// JSON description trailer after EOF.
    pub const VMDESCRIPTION: u8 = 0x06;
    /// The configuration section right after the header.
    pub const CONFIGURATION: u8 = 0x07;
    /// A command.
    pub const COMMAND: u8 = 0x08;
    /// Footer closing every section.
    pub const FOOTER: u8 = 0x7E;
}

/// The configuration section: the source's machine type and the optional
/// subsections QEMU adds when needed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Configuration {
    /// Machine type name, e.g. `pc-q35-10.0` or `none`.
    pub machine: String,
    /// `configuration/target-page-bits` (never sent for x86).
    pub target_page_bits: Option<u32>,
    /// `configuration/capabilities`: the validated capabilities that are on.
    pub capabilities: Vec<String>,
    /// `configuration/uuid` (sent with `-uuid` and `validate-uuid`).
    pub uuid: Option<[u8; 16]>,
}

/// One entry of the `MEM_SIZE` list: a RAM block and its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// RAM block id, e.g. `m0`, `pc.ram`, `/rom@etc/acpi/tables`.
    pub idstr: String,
    /// Used length in bytes (page-aligned).
    pub used_length: u64,
}

/// A command (`0x08`) of a plain precopy stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The destination should open the return path.
    OpenReturnPath,
    /// Ping with a value the destination echoes in a PONG.
    Ping(u32),
    /// Switchover is about to start (sent just before the ram END).
    SwitchoverStart,
}

/// The error for element type byte `ty` found where it is not allowed: an
/// unknown byte is [`WireError::UnknownElement`], a known one misplaced is
/// [`WireError::UnexpectedElement`].
fn misplaced(ty: u8, context: &'static str) -> WireError {
    use element::*;
    match ty {
        EOF | START | PART | END | FULL | SUBSECTION | VMDESCRIPTION | CONFIGURATION | COMMAND
        | FOOTER => WireError::UnexpectedElement {
            element: ty,
            context,
        },
        _ => WireError::UnknownElement(ty),
    }
}
