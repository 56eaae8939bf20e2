//! The file target: QEMU's mapped-ram migration files (`migrate
//! file:PATH[,offset=N]` with the `mapped-ram` capability), both ways.
//!
//! * [`save`]: RAM (images, a snapshot, or a running source through the
//!   [`SourceVm`](crate::SourceVm) of the network source) into a file that
//!   a QEMU destination loads with `migrate-incoming file:PATH`. The
//!   source's round driver runs unchanged; its channels write runs of
//!   pages in place with `pwritev`, each on its own descriptor (optionally
//!   `O_DIRECT`), and its main stream is laid out as the file's.
//! * [`restore`]: a file (QEMU's or ours) into RAM from a
//!   [`RamProvider`](crate::RamProvider): the structure is read and
//!   checked first ([`read_file`]), then N threads `preadv` stretches of
//!   present pages straight into guest memory (short holes between them
//!   are read into a discard buffer, never into guest RAM).
//! * [`Capture`]: a network migration (from QEMU or from us) stored as a
//!   file, by [`crate::receive`] into mappings of the file's pages regions.
//! * [`play`]: a file sent to a network destination (a QEMU started with
//!   `-incoming defer`, multifd on).
//!
//! The format itself (headers, layouts, bitmaps, the file's main stream)
//! is the wire crate's [`multifd_wire::mapped_ram`] and
//! [`multifd_wire::stream::file`]. Every offset and length read from a
//! file is checked against the file's length and the other regions before
//! it is used, the RAM it announces against a limit before anything is
//! sized by it ([`ReadLimits`]), and pages are only ever written into
//! guest RAM through checked page runs. Each channel opens the path again
//! and must find the file that was checked or created there
//! ([`Error::FileReplaced`](crate::Error::FileReplaced) otherwise).

mod bitmap;
mod capture;
mod file;
mod play;
mod read;
mod reading;
mod restore;
mod save;
mod uri;
mod write_behind;

pub use capture::Capture;
pub use play::play;
pub use read::{FileImage, ReadLimits, read_file};
pub use restore::{MAX_HOLE_READ_OVER, MAX_READ, RestoreOptions, restore};
pub use save::save;
pub use uri::FileUri;

/// How a mapped-ram file is accessed.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Open the channels' descriptors with `O_DIRECT` (QEMU's
    /// `direct-io`): pages bypass the page cache. The main stream and the
    /// bitmaps use a descriptor without it, as QEMU's do. A file system
    /// that refuses it is [`Error::DirectIoUnsupported`](crate::Error::DirectIoUnsupported).
    pub direct_io: bool,
    /// When restoring without `direct_io`, read a file that is mostly not
    /// in the page cache with `O_DIRECT` where its file system allows it:
    /// it is read once, and the device is kept busier than by buffered
    /// reads. A file mostly cached is read from the cache and left there
    /// (a warm image stays warm). Off: a cold file is read through the
    /// cache, each stretch dropped once read.
    pub direct_when_cold: bool,
    /// When saving, reserve the file's space up to the end of the last
    /// pages region before any page is written, so a full file system
    /// fails the save at once (not on tmpfs, where that would allocate
    /// memory for every zero page); runs of at least 1 MiB of zero pages
    /// are given back at the end.
    pub reserve: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            direct_io: false,
            direct_when_cold: true,
            reserve: true,
        }
    }
}
