//! One mapped RAM block.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use vm_memory::FileOffset;
use vm_memory::mmap::MmapRegion;

use super::received::ReceivedBitmap;
use crate::error::{Error, Result};
use multifd_wire::PAGE_SIZE_U64;

/// Whether a block may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mapped read-only (a migration source reading an image).
    ReadOnly,
    /// Mapped read-write (a destination).
    ReadWrite,
}

/// A named RAM block mapped into this process.
///
/// Invariants: the mapping is `len` bytes long, page-aligned, and lives as
/// long as the `RamBlock`; `len` is a non-zero multiple of 4096.
pub struct RamBlock {
    name: String,
    len: u64,
    region: MmapRegion<()>,
    access: Access,
    /// True when the memory is known to read as zero where nothing was
    /// written yet (fresh anonymous memory or a file we just created), so a
    /// zero page that was never received needs no write.
    starts_zeroed: bool,
    path: Option<PathBuf>,
    received: ReceivedBitmap,
}

impl std::fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamBlock")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("access", &self.access)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Checks a block's name and length: the name must fit the wire (1 to 255
/// bytes, QEMU's `idstr`), the length be a non-zero multiple of 4096 that
/// this process can map.
fn check_name_and_len(name: &str, len: u64) -> Result<usize> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::Config(format!(
            "RAM block name {name:?}: must be 1 to 255 bytes"
        )));
    }
    if len == 0 || !len.is_multiple_of(PAGE_SIZE_U64) {
        return Err(Error::Config(format!(
            "RAM block {name:?}: length {len} is not a non-zero multiple of 4096"
        )));
    }
    usize::try_from(len)
        .map_err(|_| Error::Config(format!("RAM block {name:?}: length {len} too large")))
}

impl RamBlock {
    /// Anonymous, zero-filled memory.
    pub fn anonymous(name: &str, len: u64) -> Result<Self> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        Self::map(name, len, None, Access::ReadWrite, true, flags)
    }

    /// Maps an existing file of exactly `len` bytes (or any length when
    /// `len` is `None`), shared, like a QEMU `memory-backend-file`.
    pub fn open_file(name: &str, path: &Path, access: Access, len: Option<u64>) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .map_err(|e| Error::io(format!("opening RAM file {}", path.display()), e))?;
        let actual = file
            .metadata()
            .map_err(|e| Error::io(format!("reading size of {}", path.display()), e))?
            .len();
        if let Some(want) = len
            && want != actual
        {
            return Err(Error::Config(format!(
                "RAM file {} is {actual} bytes but block {name:?} is {want} bytes",
                path.display()
            )));
        }
        // A destination is populated up front (write faults come one page
        // at a time); a source is not: read faults map 16 pages each, spread
        // over the channel threads, which beats one serial populate pass.
        let populate = access == Access::ReadWrite;
        Self::map_file(name, path, file, actual, access, false, populate)
    }

    /// Creates (or truncates) a sparse file of `len` bytes and maps it
    /// read-write. Used for snapshot blocks and `--ram` files that do not
    /// exist yet.
    pub fn create_file(name: &str, path: &Path, len: u64) -> Result<Self> {
        check_name_and_len(name, len)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating RAM file {}", path.display()), e))?;
        file.set_len(len)
            .map_err(|e| Error::io(format!("sizing RAM file {}", path.display()), e))?;
        Self::map_file(name, path, file, len, Access::ReadWrite, true, false)
    }

    fn map_file(
        name: &str,
        path: &Path,
        file: File,
        len: u64,
        access: Access,
        starts_zeroed: bool,
        populate: bool,
    ) -> Result<Self> {
        // MAP_POPULATE: one kernel pass sets up every page-table entry,
        // instead of one fault per page later on the channel threads
        // (first-touch faults dominate a loopback migration here). A fresh
        // sparse file is never populated: that would allocate it whole.
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE | populate;
        Self::map(name, len, Some((file, path)), access, starts_zeroed, flags)
    }

    /// Maps `len` bytes of `backing` (a file and its path) or of anonymous
    /// memory, with mmap `flags`.
    fn map(
        name: &str,
        len: u64,
        backing: Option<(File, &Path)>,
        access: Access,
        starts_zeroed: bool,
        flags: libc::c_int,
    ) -> Result<Self> {
        let size = check_name_and_len(name, len)?;
        let prot = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let (file, path) = match backing {
            Some((file, path)) => (Some(FileOffset::new(file, 0)), Some(path.to_owned())),
            None => (None, None),
        };
        let region = MmapRegion::build(file, size, prot, flags).map_err(|e| Error::Map {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            name: name.to_owned(),
            len,
            region,
            access,
            starts_zeroed,
            path,
            received: ReceivedBitmap::new(len / PAGE_SIZE_U64),
        })
    }

    /// The block's id (QEMU's RAMBlock idstr).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes (QEMU's used_length).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: blocks have at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE_U64
    }

    /// The file behind the mapping, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether the block may be written.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Pages received so far by a destination (QEMU's `receivedmap`).
    pub(crate) fn received(&self) -> &ReceivedBitmap {
        &self.received
    }

    /// Whether a destination received the page at `offset` (as data or as
    /// a zero page) in this migration.
    pub fn is_received(&self, offset: u64) -> bool {
        offset.is_multiple_of(PAGE_SIZE_U64) && self.received.get(offset / PAGE_SIZE_U64)
    }

    /// How many of the block's pages a destination received.
    pub fn received_pages(&self) -> u64 {
        self.received.count()
    }

    /// Whether a never-received page is known to read as zero.
    pub(crate) fn starts_zeroed(&self) -> bool {
        self.starts_zeroed
    }

    /// Records that every page not received since reads as zero.
    pub(super) fn set_starts_zeroed(&mut self) {
        self.starts_zeroed = true;
    }

    /// Whether `offset` names a whole page inside the block.
    pub(super) fn holds_page(&self, offset: u64) -> bool {
        offset.is_multiple_of(PAGE_SIZE_U64)
            && offset
                .checked_add(PAGE_SIZE_U64)
                .is_some_and(|end| end <= self.len)
    }

    /// Raw pointer to the page at `offset`.
    ///
    /// # Safety
    /// `offset` must be a multiple of 4096 with `offset + 4096 <= len()`
    /// (what [`RamBlock::page`] checks; a [`Page`] carries that proof).
    /// The pointer is valid for as long as `self` is borrowed; it points to
    /// guest memory, which may only be accessed through volatile reads and
    /// writes or handed to the kernel, never turned into a reference.
    pub(crate) unsafe fn page_ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(self.holds_page(offset));
        // SAFETY: by the contract `offset + 4096 <= len`, and `len` is the
        // mapping's size, so the result stays inside the mapping; `offset <
        // len <= isize::MAX` (the mapping exists), so the add cannot overflow.
        unsafe { self.region.as_ptr().add(offset as usize) }
    }

    /// Maps the pages of `offset..offset + len` into this process with one
    /// system call (`MADV_POPULATE_READ`) instead of one page fault per 16
    /// pages when they are first read; page faults are expensive on a
    /// virtual machine. Best effort: errors (old kernels) are ignored.
    pub fn populate_read(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end || !self.holds_page(offset) {
            return;
        }
        // SAFETY:
        // - `offset` names a page inside the block (checked above), so the
        //   pointer is in the mapping and page-aligned, as madvise requires;
        //   `offset..end` stays inside the mapping (`end <= len`);
        // - MADV_POPULATE_READ only faults pages in for reading; it changes
        //   no memory contents and no mapping attributes.
        unsafe {
            libc::madvise(
                self.page_ptr(offset).cast(),
                (end - offset) as usize,
                libc::MADV_POPULATE_READ,
            );
        }
    }
}

/// This host's physical memory in bytes (`u64::MAX` when unknown).
pub(crate) fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration; these names are
    // valid on every Linux system.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s),
        _ => u64::MAX,
    }
}
