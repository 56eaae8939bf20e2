//! One mapped RAM block.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use vm_memory::FileOffset;
use vm_memory::mmap::MmapRegion;

use super::iov::IoVec;
use super::received::ReceivedBitmap;
use crate::error::{Error, Result};
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

fn check_len(name: &str, len: u64) -> Result<usize> {
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
        let size = check_len(name, len)?;
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
        check_len(name, len)?;
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
        let size = check_len(name, len)?;
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

    /// Address of the mapping in this process (to find it in
    /// `/proc/self/smaps`).
    pub fn host_addr(&self) -> usize {
        self.region.as_ptr() as usize
    }

    /// The file behind the mapping, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Pages received so far by a destination (QEMU's `receivedmap`).
    pub fn received(&self) -> &ReceivedBitmap {
        &self.received
    }

    /// Checks that `offset` names a whole page inside the block.
    pub fn check_page(&self, offset: u64) -> Result<()> {
        if !offset.is_multiple_of(PAGE_SIZE_U64)
            || offset
                .checked_add(PAGE_SIZE_U64)
                .is_none_or(|end| end > self.len)
        {
            return Err(Error::OffsetOutOfRange {
                block: self.name.clone(),
                offset,
                len: self.len,
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Err(Error::Config(format!(
                "RAM block {:?} is mapped read-only",
                self.name
            )));
        }
        Ok(())
    }

    /// Raw pointer to the page at `offset`; the offset must have passed `check_page`.
    fn page_ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(self.check_page(offset).is_ok());
        // SAFETY:
        // - `offset + PAGE_SIZE <= len` (checked by every caller through
        //   `check_page`), so the result stays inside the mapping;
        // - `offset < len <= isize::MAX` (the mapping exists), so the add
        //   cannot overflow.
        unsafe { self.region.as_ptr().add(offset as usize) }
    }

    /// True when the page at `offset` is all zero bytes
    /// (QEMU's `buffer_is_zero`). The guest may be writing the page
    /// meanwhile; then the answer is one of the page's states, and the
    /// dirty log re-sends it.
    pub fn is_zero_page(&self, offset: u64) -> Result<bool> {
        self.check_page(offset)?;
        // SAFETY: the page lies inside the mapping (checked above), which
        // is readable for as long as `self` lives.
        Ok(unsafe { super::zero::page_is_zero(self.page_ptr(offset)) })
    }

    /// Copies the page at `offset` into `out` (a private copy for a
    /// compressor: the guest may keep writing the original).
    pub fn read_page(&self, offset: u64, out: &mut [u8; PAGE_SIZE]) -> Result<()> {
        self.check_page(offset)?;
        // SAFETY:
        // - source: one page inside the mapping (checked above), readable;
        // - destination: `out` is exactly one page, exclusively borrowed;
        // - no overlap: `out` is not inside guest memory (guest memory is
        //   never exposed as a Rust reference, so `out` cannot point there).
        unsafe {
            std::ptr::copy_nonoverlapping(self.page_ptr(offset), out.as_mut_ptr(), PAGE_SIZE);
        }
        Ok(())
    }

    /// Writes one page of data at `offset` and marks it received, so a
    /// later zero page for it is applied.
    pub fn write_page(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_page(offset)?;
        self.check_writable()?;
        if data.len() != PAGE_SIZE {
            return Err(Error::Config(format!(
                "page write of {} bytes, expected 4096",
                data.len()
            )));
        }
        // SAFETY:
        // - destination: one page inside a writable mapping (checked above);
        // - source: `data` is exactly one page of initialised bytes;
        // - no overlap, as in `read_page`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.page_ptr(offset), PAGE_SIZE);
        }
        self.received.set(offset / PAGE_SIZE_U64);
        Ok(())
    }

    /// Fills the page at `offset` with zeros.
    pub fn zero_page(&self, offset: u64) -> Result<()> {
        self.check_page(offset)?;
        self.check_writable()?;
        // SAFETY: one page inside a writable mapping (checked above).
        unsafe { std::ptr::write_bytes(self.page_ptr(offset), 0, PAGE_SIZE) };
        Ok(())
    }

    /// Applies a zero page received from a source, the way a QEMU
    /// destination does: memory that may hold older data is zeroed, memory
    /// known to be untouched is left alone (so it is never faulted in).
    pub fn apply_zero_page(&self, offset: u64) -> Result<()> {
        self.check_page(offset)?;
        let seen_before = self.received.set(offset / PAGE_SIZE_U64);
        if (seen_before || !self.starts_zeroed) && !self.is_zero_page(offset)? {
            self.zero_page(offset)?;
        }
        Ok(())
    }

    /// An I/O vector over the page at `offset`, for a vectored write to a
    /// socket (the source side: the kernel reads the page).
    pub fn page_iov(&self, offset: u64) -> Result<IoVec<'_>> {
        self.check_page(offset)?;
        // SAFETY: the page lies inside the mapping (checked above), which
        // lives as long as `self`, and the IoVec borrows `self`.
        Ok(unsafe { IoVec::from_raw(self.page_ptr(offset), PAGE_SIZE) })
    }

    /// An I/O vector over the page at `offset`, for a vectored read from a
    /// socket straight into guest RAM (the destination side).
    pub fn page_iov_mut(&self, offset: u64) -> Result<IoVec<'_>> {
        self.check_writable()?;
        self.page_iov(offset)
    }

    /// Maps the pages of `offset..offset + len` into this process with one
    /// system call (`MADV_POPULATE_READ`) instead of one page fault per 16
    /// pages when they are first read; page faults are expensive on a
    /// virtual machine. Best effort: errors (old kernels) are ignored.
    pub fn populate_read(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end || self.check_page(offset).is_err() {
            return;
        }
        // SAFETY:
        // - `offset..end` lies inside the mapping (checked above), and
        //   `offset` is page-aligned, as madvise requires;
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

    /// Bytes of this block resident in memory (`mincore`).
    pub fn resident_bytes(&self) -> u64 {
        let pages = self.len as usize / PAGE_SIZE;
        let mut vec = vec![0u8; pages];
        // SAFETY:
        // - the address range is exactly our mapping (page-aligned, `len` bytes);
        // - `vec` has one byte per page, as mincore requires.
        let rc = unsafe {
            libc::mincore(
                self.region.as_ptr().cast(),
                self.len as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE_U64
    }

    /// Writes the whole block with zeros, faulting every page in. From then
    /// on the block is known to be zero where nothing was received, so zero
    /// pages cost nothing (what a QEMU destination assumes of fresh RAM).
    pub fn prefault(&mut self) -> Result<()> {
        self.check_writable()?;
        // SAFETY: the whole mapping, writable (checked above).
        unsafe { std::ptr::write_bytes(self.region.as_ptr(), 0, self.len as usize) };
        self.starts_zeroed = true;
        Ok(())
    }

    /// Copies `src`'s whole contents into this block (same length).
    pub fn copy_from(&self, src: &RamBlock) -> Result<()> {
        self.check_writable()?;
        if src.len != self.len {
            return Err(Error::Config(
                "copy between blocks of different length".into(),
            ));
        }
        // SAFETY:
        // - both ranges are whole mappings of `len` bytes, the destination writable;
        // - they are distinct mappings, so they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.region.as_ptr(),
                self.region.as_ptr(),
                self.len as usize,
            );
        }
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
        b.apply_zero_page(4096).unwrap();
        assert!(b.is_zero_page(4096).unwrap());
        assert!(matches!(
            b.read_page(4 * 4096, &mut page),
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert!(b.check_page(100).is_err(), "unaligned");
        assert!(b.check_page(u64::MAX - 4095).is_err(), "overflow");
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
        assert!(ro.write_page(0, &[1u8; PAGE_SIZE]).is_err());
        assert!(RamBlock::open_file("m0", &path, Access::ReadOnly, Some(4096)).is_err());
    }
}
