//! Checked pages: an offset proven once to name a whole page of a block,
//! carried as a type so nothing downstream checks it again.
//!
//! [`RamBlock::page`] and [`RamBlock::page_list`] validate offsets; a
//! [`Page`] or [`PageList`] exists only for offsets that passed, and borrows
//! its block, so the proof cannot be used with another (shorter) block.
//! Every access to a page's bytes is volatile (vm-memory's
//! [`VolatileSlice`]) or a hand-off to the kernel, so a guest or another
//! process writing the same page concurrently is not undefined behaviour.
#![allow(unsafe_code)]

use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};
use vm_memory::VolatileSlice;

use super::block::{Access, RamBlock};
use super::zero;
use crate::error::{Error, Result};
use crate::transport::{IoSlice, IoSliceMut};

/// Zeros to copy from when a page is cleared.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Access to a block's pages: every offset is checked here, once, and then
/// carried as a `Page` or `PageList`.
impl RamBlock {
    fn out_of_range(&self, offset: u64) -> Error {
        Error::OffsetOutOfRange {
            block: self.name().to_owned(),
            offset,
            len: self.len(),
        }
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
        match self.access() {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(Error::ReadOnlyBlock {
                block: self.name().to_owned(),
            }),
        }
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

    /// Writes the whole block with zeros, faulting every page in. From then
    /// on the block is known to be zero where nothing was received, so zero
    /// pages cost nothing (what a QEMU destination assumes of fresh RAM).
    pub fn prefault(&mut self) -> Result<()> {
        self.check_writable()?;
        for offset in (0..self.len()).step_by(PAGE_SIZE) {
            // SAFETY: `offset` steps through the block's pages, each whole
            // inside it (`len` is a multiple of 4096).
            unsafe { Page::new_unchecked(self, offset) }.fill_zero();
        }
        self.set_starts_zeroed();
        self.set_populated();
        Ok(())
    }
}

/// One page of a block.
///
/// Invariant: `offset` is a multiple of 4096 and `offset + 4096 <=
/// block.len()`.
#[derive(Clone, Copy)]
pub(crate) struct Page<'b> {
    block: &'b RamBlock,
    offset: u64,
}

impl std::fmt::Debug for Page<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{:#x}", self.block.name(), self.offset)
    }
}

impl<'b> Page<'b> {
    /// # Safety
    /// `offset` must name a whole page inside `block` (the invariant).
    pub(super) unsafe fn new_unchecked(block: &'b RamBlock, offset: u64) -> Self {
        Self { block, offset }
    }

    /// Index of the page inside its block.
    fn index(&self) -> u64 {
        self.offset / PAGE_SIZE_U64
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: the invariant of `Page` is `page_ptr`'s contract.
        unsafe { self.block.page_ptr(self.offset) }
    }

    /// The page as a vm-memory volatile slice.
    fn volatile(&self) -> VolatileSlice<'b> {
        // SAFETY: the page is PAGE_SIZE bytes of the block's mapping, which
        // stays mapped while the block is borrowed for 'b; guest memory is
        // only ever accessed volatilely or by the kernel.
        unsafe { VolatileSlice::new(self.ptr(), PAGE_SIZE) }
    }

    /// True when every byte is zero (one of the page's states if it is
    /// being written meanwhile).
    pub(crate) fn is_zero(&self) -> bool {
        // SAFETY: the page is inside the mapping and readable; mappings and
        // page offsets are 4096-byte aligned, so the pointer is too.
        unsafe { zero::page_is_zero(self.ptr()) }
    }

    /// Copies the page into `out` (a private copy, for a compressor or a
    /// comparison).
    pub(crate) fn copy_to(&self, out: &mut [u8; PAGE_SIZE]) {
        self.volatile().copy_to(&mut out[..]);
    }

    /// Writes `data` into the page and marks it received.
    pub(crate) fn write(&self, data: &[u8; PAGE_SIZE]) -> Result<()> {
        self.block.check_writable()?;
        self.volatile().copy_from(&data[..]);
        self.mark_received();
        Ok(())
    }

    /// Clears the page. The block must be writable (checked by callers).
    pub(super) fn fill_zero(&self) {
        self.volatile().copy_from(&ZERO_PAGE[..]);
    }

    /// Marks the page received; returns whether it was already.
    pub(crate) fn mark_received(&self) -> bool {
        self.block.received().set(self.index())
    }

    /// Applies a zero page received from a source, the way a QEMU
    /// destination does: memory that may hold older data is zeroed, memory
    /// known to be untouched is left alone (so it is never faulted in).
    pub(crate) fn apply_zero(&self) -> Result<()> {
        self.block.check_writable()?;
        let seen_before = self.mark_received();
        if (seen_before || !self.block.starts_zeroed()) && !self.is_zero() {
            self.fill_zero();
        }
        Ok(())
    }

    /// A vector over the page for a vectored write (the kernel reads it).
    pub(crate) fn io_slice(&self) -> IoSlice<'b> {
        // SAFETY: the page is mapped and readable for as long as the block
        // is borrowed ('b).
        unsafe { IoSlice::from_raw_parts(self.ptr(), PAGE_SIZE) }
    }

    /// A vector over the page for a vectored read straight into guest RAM
    /// (the kernel writes it). Fails on a read-only block.
    pub(crate) fn io_slice_mut(&self) -> Result<IoSliceMut<'b>> {
        self.block.check_writable()?;
        // SAFETY: the page is mapped writable (checked above) for as long
        // as the block is borrowed ('b), and no Rust reference ever points
        // into guest memory.
        Ok(unsafe { IoSliceMut::from_raw_parts(self.ptr(), PAGE_SIZE) })
    }
}

/// Pages of one block, every offset checked once.
///
/// Invariant: every offset names a whole page inside `block`.
#[derive(Clone, Copy)]
pub(crate) struct PageList<'b, 'o> {
    block: &'b RamBlock,
    offsets: &'o [u64],
}

impl<'b, 'o> PageList<'b, 'o> {
    /// # Safety
    /// Every offset must name a whole page inside `block` (the invariant).
    pub(super) unsafe fn new_unchecked(block: &'b RamBlock, offsets: &'o [u64]) -> Self {
        Self { block, offsets }
    }

    /// The block.
    pub(crate) fn block(&self) -> &'b RamBlock {
        self.block
    }

    /// The offsets, in order.
    pub(crate) fn offsets(&self) -> &'o [u64] {
        self.offsets
    }

    /// Number of pages.
    pub(crate) fn len(&self) -> usize {
        self.offsets.len()
    }

    /// The pages, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Page<'b>> + use<'b, 'o> {
        let block = self.block;
        self.offsets
            .iter()
            .map(move |&offset| Page { block, offset })
    }

    /// The first `n` pages and the rest.
    ///
    /// # Panics
    /// If `n > len()`.
    pub(crate) fn split_at(&self, n: usize) -> (Self, Self) {
        let (a, b) = self.offsets.split_at(n);
        (
            Self {
                block: self.block,
                offsets: a,
            },
            Self {
                block: self.block,
                offsets: b,
            },
        )
    }

    /// Writes the offsets into `out`, data pages first and zero pages after
    /// them (QEMU's `multifd_send_zero_page_detect()` order); returns the
    /// reordered list and how many data pages lead it. With `detect` false
    /// every page counts as data. Pages whose index is set in the bit set
    /// `known_zero` (bit `i % 64` of word `i / 64`; missing words are
    /// clear) count as zero without being scanned.
    fn split_zero_pages<'v>(
        &self,
        detect: bool,
        known_zero: &[u64],
        out: &'v mut Vec<u64>,
    ) -> (PageList<'b, 'v>, usize) {
        out.clear();
        out.resize(self.offsets.len(), 0);
        // Data pages fill `out` from the front, zero pages from the back
        // (reversed, then put back in order): no second buffer.
        let (mut front, mut back) = (0, out.len());
        for (i, page) in self.iter().enumerate() {
            if detect && (bit(known_zero, i) || page.is_zero()) {
                back -= 1;
                out[back] = page.offset;
            } else {
                out[front] = page.offset;
                front += 1;
            }
        }
        out[back..].reverse();
        let normal = front;
        let list = PageList {
            block: self.block,
            offsets: &out[..],
        };
        (list, normal)
    }

    /// Maps each run of consecutive pages with one system call before they
    /// are read (see [`RamBlock::populate_read`]), leaving out the pages
    /// whose index is set in `skip` (a bit set as for
    /// [`PageList::split_zero_pages`]).
    fn populate_read_except(&self, skip: &[u64]) {
        let batch = self.offsets;
        let mut i = 0;
        while i < batch.len() {
            if bit(skip, i) {
                i += 1;
                continue;
            }
            let start = batch[i];
            let mut j = i + 1;
            while j < batch.len() && batch[j] == batch[j - 1] + PAGE_SIZE_U64 && !bit(skip, j) {
                j += 1;
            }
            if j - i > 1 {
                self.block
                    .populate_read(start, (j - i) as u64 * PAGE_SIZE_U64);
            }
            i = j;
        }
    }
}

/// Whether bit `i` of the bit set `words` is set (missing words are clear).
fn bit(words: &[u64], i: usize) -> bool {
    words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Consecutive pages of one block: what one positioned read or write of a
/// mapped-ram file moves (a run of present pages in the file is a run of
/// consecutive pages in the block, and so one span of guest memory).
///
/// Invariant: `offset` is a multiple of 4096, `pages > 0` and
/// `offset + pages * 4096 <= block.len()`.
#[derive(Clone, Copy)]
pub(crate) struct PageRun<'b> {
    block: &'b RamBlock,
    offset: u64,
    pages: u64,
}

impl std::fmt::Debug for PageRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{:#x}+{}p",
            self.block.name(),
            self.offset,
            self.pages
        )
    }
}

impl RamBlock {
    /// The `pages` pages from `offset` on, checked to lie whole inside the
    /// block (and `pages > 0`).
    pub(crate) fn page_run(&self, offset: u64, pages: u64) -> Result<PageRun<'_>> {
        let end = pages
            .checked_mul(PAGE_SIZE_U64)
            .and_then(|len| offset.checked_add(len));
        match end {
            Some(end) if pages > 0 && offset.is_multiple_of(PAGE_SIZE_U64) && end <= self.len() => {
                Ok(PageRun {
                    block: self,
                    offset,
                    pages,
                })
            }
            _ => Err(self.out_of_range(offset)),
        }
    }
}

impl<'b> PageRun<'b> {
    /// Offset of the first page in the block.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of pages.
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.pages * PAGE_SIZE_U64
    }

    /// Raw pointer to the run's first byte; the run's `len()` bytes from
    /// it are mapped while the block is borrowed ('b). Guest memory: never
    /// to be turned into a reference.
    pub(super) fn ptr(&self) -> *mut u8 {
        // SAFETY: the invariant makes `offset` a whole page inside the
        // block, which is `page_ptr`'s contract.
        unsafe { self.block.page_ptr(self.offset) }
    }

    /// Fails unless the run's block is mapped writable.
    pub(super) fn check_writable(&self) -> Result<()> {
        self.block.check_writable()
    }

    /// One vector over the whole run, for a positioned write of guest
    /// memory to a file (the kernel reads it).
    pub(crate) fn io_slice(&self) -> IoSlice<'b> {
        // SAFETY: the run lies inside the block's mapping (the invariant),
        // which stays mapped and readable while the block is borrowed ('b).
        unsafe { IoSlice::from_raw_parts(self.ptr(), self.len() as usize) }
    }

    /// One vector over the whole run, for a positioned read from a file
    /// straight into guest memory (the kernel writes it). Fails on a
    /// read-only block.
    pub(crate) fn io_slice_mut(&self) -> Result<IoSliceMut<'b>> {
        self.block.check_writable()?;
        // SAFETY: the run lies inside the block's mapping (the invariant),
        // mapped writable (checked above) while the block is borrowed
        // ('b); no Rust reference ever points into guest memory.
        Ok(unsafe { IoSliceMut::from_raw_parts(self.ptr(), self.len() as usize) })
    }

    /// Copies `src` (this process's own bytes, exactly the run's length)
    /// into this run. Fails on a read-only block or a length that differs.
    pub(crate) fn write_from(&self, src: &[u8]) -> Result<()> {
        self.block.check_writable()?;
        if src.len() as u64 != self.len() {
            return Err(Error::Config(format!(
                "writing {} bytes into {self:?}: not the run's length",
                src.len()
            )));
        }
        self.volatile().copy_from(src);
        Ok(())
    }

    /// The run as a vm-memory volatile slice.
    fn volatile(&self) -> VolatileSlice<'b> {
        // SAFETY: the run lies inside the block's mapping (the invariant),
        // which stays mapped while the block is borrowed for 'b; guest
        // memory is only ever accessed volatilely or by the kernel.
        unsafe { VolatileSlice::new(self.ptr(), self.len() as usize) }
    }

    /// The run's pages.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Page<'b>> + use<'b> {
        let (block, offset) = (self.block, self.offset);
        (0..self.pages).map(move |k| Page {
            block,
            offset: offset + k * PAGE_SIZE_U64,
        })
    }

    /// Marks every page received (after the kernel filled them).
    pub(crate) fn mark_received(&self) {
        for page in self.iter() {
            page.mark_received();
        }
    }

    /// Makes every page of the run read as zero, the way a destination
    /// applies zero pages ([`Page::apply_zero`]): memory known to be
    /// untouched is left alone. Fails on a read-only block.
    pub(crate) fn apply_zero(&self) -> Result<()> {
        for page in self.iter() {
            page.apply_zero()?;
        }
        Ok(())
    }
}

impl<'b> PageList<'b, '_> {
    /// The maximal runs of consecutive ascending offsets, in list order.
    pub(crate) fn runs(&self) -> impl Iterator<Item = PageRun<'b>> + '_ {
        let block = self.block;
        let offsets = self.offsets;
        let mut i = 0;
        std::iter::from_fn(move || {
            let start = *offsets.get(i)?;
            let mut j = i + 1;
            while j < offsets.len() && offsets[j] == offsets[j - 1] + PAGE_SIZE_U64 {
                j += 1;
            }
            let pages = (j - i) as u64;
            i = j;
            // Every offset of the list names a whole page inside the block
            // (the list's invariant), so consecutive ones form a run inside it.
            Some(PageRun {
                block,
                offset: start,
                pages,
            })
        })
    }
}

/// Pages of one block collected for one packet, each checked as it is
/// added: what the source's driver hands a channel. Pages known to read as
/// zero (they lie in a hole of the block's file, see [`super::Holes`]) are
/// marked, so zero-page detection neither reads nor scans them.
#[derive(Debug)]
pub(crate) struct PageBatch<'b> {
    block: &'b RamBlock,
    offsets: Vec<u64>,
    /// Bit `i` set: page `i` is known to be zero. Empty when none is.
    known_zero: Vec<u64>,
}

impl<'b> PageBatch<'b> {
    /// An empty batch of `block`'s pages with room for `capacity`.
    pub(crate) fn new(block: &'b RamBlock, capacity: usize) -> Self {
        Self {
            block,
            offsets: Vec::with_capacity(capacity),
            known_zero: Vec::new(),
        }
    }

    /// Adds the page at `offset`, checked to lie inside the block.
    pub(crate) fn push(&mut self, offset: u64) -> Result<()> {
        self.block.page(offset)?;
        self.offsets.push(offset);
        Ok(())
    }

    /// Adds the page at `offset`, known to read as zero (it was in a hole
    /// of the block's file when that was asked), checked to lie inside the
    /// block.
    pub(crate) fn push_known_zero(&mut self, offset: u64) -> Result<()> {
        self.push(offset)?;
        let i = self.offsets.len() - 1;
        if self.known_zero.len() <= i / 64 {
            self.known_zero.resize(i / 64 + 1, 0);
        }
        self.known_zero[i / 64] |= 1 << (i % 64);
        Ok(())
    }

    /// Number of pages.
    pub(crate) fn len(&self) -> usize {
        self.offsets.len()
    }

    /// True when it holds no page.
    pub(crate) fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The block the pages are of.
    pub(crate) fn block(&self) -> &'b RamBlock {
        self.block
    }

    /// The pages' offsets, in the order they were added.
    pub(super) fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// Whether the batch's `i`-th page is known to be zero.
    pub(crate) fn is_known_zero(&self, i: usize) -> bool {
        bit(&self.known_zero, i)
    }

    /// The batch as a checked list.
    pub(crate) fn as_list(&self) -> PageList<'b, '_> {
        PageList {
            block: self.block,
            offsets: &self.offsets,
        }
    }

    /// Maps the pages that are to be read (see [`PageList::populate_read_except`]):
    /// with zero-page detection (`detect`), not those known to be zero,
    /// which are never read.
    pub(crate) fn populate_read(&self, detect: bool) {
        let skip: &[u64] = if detect { &self.known_zero } else { &[] };
        self.as_list().populate_read_except(skip);
    }

    /// The batch's pages, data pages first and zero pages after them (see
    /// [`PageList::split_zero_pages`]); pages known to be zero count as
    /// zero pages without being scanned.
    pub(crate) fn zero_pages_last<'v>(
        &self,
        detect: bool,
        out: &'v mut Vec<u64>,
    ) -> (PageList<'b, 'v>, usize) {
        self.as_list()
            .split_zero_pages(detect, &self.known_zero, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

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

    #[test]
    fn zero_pages_go_last_in_order() {
        let b = RamBlock::anonymous("m0", 8 * 4096).unwrap();
        b.write_page(2 * 4096, &[1; PAGE_SIZE]).unwrap();
        b.write_page(5 * 4096, &[2; PAGE_SIZE]).unwrap();
        let mut batch = PageBatch::new(&b, 8);
        for p in 0..8 {
            batch.push(p * 4096).unwrap();
        }
        let mut out = Vec::new();
        let (sorted, normal) = batch.zero_pages_last(true, &mut out);
        assert_eq!(normal, 2);
        assert_eq!(
            sorted.offsets(),
            &[0x2000, 0x5000, 0, 0x1000, 0x3000, 0x4000, 0x6000, 0x7000]
        );
        let (data, zeros) = sorted.split_at(normal);
        assert_eq!(data.len(), 2);
        assert!(zeros.iter().all(|p| p.is_zero()));
        let (_, normal) = batch.zero_pages_last(false, &mut out);
        assert_eq!(normal, 8, "no detection: every page is data");
    }

    #[test]
    fn known_zero_pages_are_neither_scanned_nor_taken_for_data() {
        let b = RamBlock::anonymous("m0", 8 * 4096).unwrap();
        b.write_page(2 * 4096, &[1; PAGE_SIZE]).unwrap();
        b.write_page(3 * 4096, &[1; PAGE_SIZE]).unwrap();
        let mut batch = PageBatch::new(&b, 8);
        for p in 0..8 {
            if p == 3 || p == 6 {
                // Marked zero: taken as it is, whatever the page holds
                // (the marking is what a hole lookup found earlier).
                batch.push_known_zero(p * 4096).unwrap();
            } else {
                batch.push(p * 4096).unwrap();
            }
        }
        let mut out = Vec::new();
        let (sorted, normal) = batch.zero_pages_last(true, &mut out);
        assert_eq!(normal, 1);
        assert_eq!(
            sorted.offsets(),
            &[0x2000, 0, 0x1000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000]
        );
        let (_, normal) = batch.zero_pages_last(false, &mut out);
        assert_eq!(normal, 8, "no detection: every page is data");
        assert!(batch.push_known_zero(8 * 4096).is_err());
        batch.populate_read(true);
    }

    #[test]
    fn runs_are_maximal_and_checked() {
        let b = RamBlock::anonymous("m0", 8 * 4096).unwrap();
        let offsets = [0, 0x1000, 0x2000, 0x5000, 0x7000, 0x6000];
        let list = b.page_list(&offsets).unwrap();
        let runs: Vec<(u64, u64)> = list.runs().map(|r| (r.offset(), r.pages())).collect();
        assert_eq!(runs, [(0, 3), (0x5000, 1), (0x7000, 1), (0x6000, 1)]);
        assert_eq!(b.page_run(0x6000, 2).unwrap().len(), 0x2000);
        assert!(b.page_run(0x7000, 2).is_err(), "past the end");
        assert!(b.page_run(0x1000, 0).is_err(), "empty");
        assert!(b.page_run(0x800, 1).is_err(), "unaligned");
        assert!(b.page_run(0x1000, u64::MAX / 2).is_err(), "overflow");
        let run = b.page_run(0x1000, 2).unwrap();
        assert_eq!(run.io_slice().len(), 0x2000);
        b.write_page(0x2000, &[3; PAGE_SIZE]).unwrap();
        run.apply_zero().unwrap();
        assert!(b.is_zero_page(0x2000).unwrap());
    }

    #[test]
    fn a_run_is_written_from_bytes_of_its_length_only() {
        let b = RamBlock::anonymous("m0", 4 * 4096).unwrap();
        let run = b.page_run(0x1000, 2).unwrap();
        let bytes: Vec<u8> = (0..0x2000).map(|i| (i % 251) as u8).collect();
        run.write_from(&bytes).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        b.read_page(0x2000, &mut page).unwrap();
        assert_eq!(page[..], bytes[0x1000..]);
        assert!(run.write_from(&bytes[..0x1000]).is_err(), "too short");
        assert!(b.is_zero_page(0).unwrap() && b.is_zero_page(0x3000).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, vec![0u8; 0x2000]).unwrap();
        let ro = RamBlock::open_file("ro", &path, crate::ram::Access::ReadOnly, None).unwrap();
        let ro_run = ro.page_run(0, 2).unwrap();
        assert!(ro_run.write_from(&bytes).is_err(), "read-only");
    }

    #[test]
    fn a_batch_refuses_offsets_outside_its_block() {
        let b = RamBlock::anonymous("m0", 2 * 4096).unwrap();
        let mut batch = PageBatch::new(&b, 4);
        batch.push(4096).unwrap();
        assert!(batch.push(2 * 4096).is_err());
        assert!(batch.push(17).is_err());
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn zero_page_is_applied_only_where_needed() {
        let b = RamBlock::anonymous("m0", 2 * 4096).unwrap();
        let p = b.page(4096).unwrap();
        p.apply_zero().unwrap();
        assert!(p.mark_received(), "marked on the first zero page");
        p.write(&[3; PAGE_SIZE]).unwrap();
        p.apply_zero().unwrap();
        assert!(p.is_zero(), "a received page is cleared");
    }
}
