//! One mapped RAM block.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use vm_memory::FileOffset;
use vm_memory::mmap::MmapRegion;

use super::page::{Page, PageList};
use super::received::ReceivedBitmap;
use crate::error::{Error, Result};
use crate::transport::{IoSlice, IoSliceMut};
use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

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
        let size = check_name_and_len(name, len)?;
        let region = MmapRegion::build(
            None,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Map {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self::from_region(
            name,
            len,
            region,
            Access::ReadWrite,
            true,
            None,
        ))
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
        let size = check_name_and_len(name, len)?;
        // MAP_POPULATE: one kernel pass sets up every page-table entry,
        // instead of one fault per page later on the channel threads
        // (first-touch faults dominate a loopback migration here). A fresh
        // sparse file is never populated: that would allocate it whole.
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        let prot = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            size,
            prot,
            libc::MAP_SHARED | libc::MAP_NORESERVE | populate,
        )
        .map_err(|e| Error::Map {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self::from_region(
            name,
            len,
            region,
            access,
            starts_zeroed,
            Some(path.to_owned()),
        ))
    }

    fn from_region(
        name: &str,
        len: u64,
        region: MmapRegion<()>,
        access: Access,
        starts_zeroed: bool,
        path: Option<PathBuf>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            len,
            region,
            access,
            starts_zeroed,
            path,
            received: ReceivedBitmap::new(len / PAGE_SIZE_U64),
        }
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

    fn out_of_range(&self, offset: u64) -> Error {
        Error::OffsetOutOfRange {
            block: self.name.clone(),
            offset,
            len: self.len,
        }
    }

    /// Whether `offset` names a whole page inside the block.
    fn holds_page(&self, offset: u64) -> bool {
        offset.is_multiple_of(PAGE_SIZE_U64)
            && offset
                .checked_add(PAGE_SIZE_U64)
                .is_some_and(|end| end <= self.len)
    }

    /// The page at `offset`, checked to lie whole inside the block.
    pub(crate) fn page(&self, offset: u64) -> Result<Page<'_>> {
        if !self.holds_page(offset) {
            return Err(self.out_of_range(offset));
        }
        // SAFETY: `holds_page` just checked the offset.
        Ok(unsafe { Page::new_unchecked(self, offset) })
    }

    /// The pages at `offsets`, each checked once to lie whole inside the block.
    pub(crate) fn page_list<'o>(&self, offsets: &'o [u64]) -> Result<PageList<'_, 'o>> {
        if let Some(&bad) = offsets.iter().find(|&&off| !self.holds_page(off)) {
            return Err(self.out_of_range(bad));
        }
        // SAFETY: every offset was just checked.
        Ok(unsafe { PageList::new_unchecked(self, offsets) })
    }

    /// Fails unless the block is mapped writable.
    pub(crate) fn check_writable(&self) -> Result<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(Error::ReadOnlyBlock {
                block: self.name.clone(),
            }),
        }
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

    /// True when the page at `offset` is all zero bytes (QEMU's
    /// `buffer_is_zero`). The guest may be writing the page meanwhile; then
    /// the answer is one of the page's states, and the dirty log re-sends it.
    pub fn is_zero_page(&self, offset: u64) -> Result<bool> {
        Ok(self.page(offset)?.is_zero())
    }

    /// Copies the page at `offset` into `out`.
    pub fn read_page(&self, offset: u64, out: &mut [u8; PAGE_SIZE]) -> Result<()> {
        self.page(offset)?.copy_to(out);
        Ok(())
    }

    /// Writes one page of data at `offset` and marks it received, so a
    /// later zero page for it is applied.
    pub fn write_page(&self, offset: u64, data: &[u8; PAGE_SIZE]) -> Result<()> {
        self.page(offset)?.write(data)
    }

    /// An I/O vector over the page at `offset`, for a vectored write of
    /// guest memory straight to a socket ([`Connection::writev_all`]).
    ///
    /// [`Connection::writev_all`]: crate::Connection::writev_all
    pub fn page_io_slice(&self, offset: u64) -> Result<IoSlice<'_>> {
        Ok(self.page(offset)?.io_slice())
    }

    /// An I/O vector over the page at `offset`, for a vectored read from a
    /// socket straight into guest memory ([`Connection::readv_exact`]).
    /// Fails on a read-only block.
    ///
    /// [`Connection::readv_exact`]: crate::Connection::readv_exact
    pub fn page_io_slice_mut(&self, offset: u64) -> Result<IoSliceMut<'_>> {
        self.page(offset)?.io_slice_mut()
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

    /// Writes the whole block with zeros, faulting every page in. From then
    /// on the block is known to be zero where nothing was received, so zero
    /// pages cost nothing (what a QEMU destination assumes of fresh RAM).
    pub fn prefault(&mut self) -> Result<()> {
        self.check_writable()?;
        for offset in (0..self.len).step_by(PAGE_SIZE) {
            // SAFETY: `offset` steps through the block's pages, each whole
            // inside it (`len` is a multiple of 4096).
            unsafe { Page::new_unchecked(self, offset) }.fill_zero();
        }
        self.starts_zeroed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_pages_round_trip_and_bounds() {
        let b = RamBlock::anonymous("m0", 4 * 4096).unwrap();
        assert!(b.is_zero_page(0).unwrap());
        let mut page = [7u8; PAGE_SIZE];
        b.write_page(4096, &page).unwrap();
        assert!(!b.is_zero_page(4096).unwrap());
        page.fill(0);
        b.read_page(4096, &mut page).unwrap();
        assert!(page.iter().all(|&x| x == 7));
        b.page(4096).unwrap().apply_zero().unwrap();
        assert!(b.is_zero_page(4096).unwrap());
        assert!(matches!(
            b.read_page(4 * 4096, &mut page),
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert!(b.page(100).is_err(), "unaligned");
        assert!(b.page(u64::MAX - 4095).is_err(), "overflow");
        assert!(b.page_list(&[0, 4096, 3 * 4096]).is_ok());
        assert!(matches!(
            b.page_list(&[0, 4 * 4096]),
            Err(Error::OffsetOutOfRange { offset: 0x4000, .. })
        ));
    }

    #[test]
    fn last_byte_of_page_counts() {
        let b = RamBlock::anonymous("m0", 4096).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        page[4095] = 1;
        b.write_page(0, &page).unwrap();
        assert!(!b.is_zero_page(0).unwrap());
        for at in [0, 17, 255, 256, 2048, 4000] {
            page.fill(0);
            page[at] = 0x80;
            b.write_page(0, &page).unwrap();
            assert!(!b.is_zero_page(0).unwrap(), "byte {at}");
        }
    }

    #[test]
    fn file_blocks_are_shared_and_read_only_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let b = RamBlock::create_file("m0", &path, 8192).unwrap();
        b.write_page(4096, &[9u8; PAGE_SIZE]).unwrap();
        drop(b);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[4096], 9);
        let ro = RamBlock::open_file("m0", &path, Access::ReadOnly, Some(8192)).unwrap();
        assert!(matches!(
            ro.write_page(0, &[1u8; PAGE_SIZE]),
            Err(Error::ReadOnlyBlock { .. })
        ));
        assert!(RamBlock::open_file("m0", &path, Access::ReadOnly, Some(4096)).is_err());
    }

    #[test]
    fn prefault_zeroes_old_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, vec![0x5a; 3 * 4096]).unwrap();
        let mut b = RamBlock::open_file("m0", &path, Access::ReadWrite, None).unwrap();
        assert!(!b.starts_zeroed());
        b.prefault().unwrap();
        assert!(b.starts_zeroed());
        for off in [0, 4096, 8192] {
            assert!(b.is_zero_page(off).unwrap());
        }
    }
}
