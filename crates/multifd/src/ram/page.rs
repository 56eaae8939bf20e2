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

use super::block::RamBlock;
use super::zero;
use crate::error::Result;
use crate::transport::{IoSlice, IoSliceMut};

/// Zeros to copy from when a page is cleared.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

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
    /// every page counts as data.
    pub(crate) fn zero_pages_last<'v>(
        &self,
        detect: bool,
        out: &'v mut Vec<u64>,
    ) -> (PageList<'b, 'v>, usize) {
        out.clear();
        out.resize(self.offsets.len(), 0);
        // Data pages fill `out` from the front, zero pages from the back
        // (reversed, then put back in order): no second buffer.
        let (mut front, mut back) = (0, out.len());
        for page in self.iter() {
            if detect && page.is_zero() {
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
    /// are read (see [`RamBlock::populate_read`]).
    pub(crate) fn populate_read(&self) {
        let batch = self.offsets;
        let mut i = 0;
        while i < batch.len() {
            let start = batch[i];
            let mut j = i + 1;
            while j < batch.len() && batch[j] == batch[j - 1] + PAGE_SIZE_U64 {
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

/// Pages of one block collected for one packet, each checked as it is
/// added: what the source's driver hands a channel.
#[derive(Debug)]
pub(crate) struct PageBatch<'b> {
    block: &'b RamBlock,
    offsets: Vec<u64>,
}

impl<'b> PageBatch<'b> {
    /// An empty batch of `block`'s pages with room for `capacity`.
    pub(crate) fn new(block: &'b RamBlock, capacity: usize) -> Self {
        Self {
            block,
            offsets: Vec::with_capacity(capacity),
        }
    }

    /// Adds the page at `offset`, checked to lie inside the block.
    pub(crate) fn push(&mut self, offset: u64) -> Result<()> {
        self.block.page(offset)?;
        self.offsets.push(offset);
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

    /// The batch as a checked list.
    pub(crate) fn as_list(&self) -> PageList<'b, '_> {
        PageList {
            block: self.block,
            offsets: &self.offsets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_go_last_in_order() {
        let b = RamBlock::anonymous("m0", 8 * 4096).unwrap();
        b.write_page(2 * 4096, &[1; PAGE_SIZE]).unwrap();
        b.write_page(5 * 4096, &[2; PAGE_SIZE]).unwrap();
        let offsets: Vec<u64> = (0..8).map(|p| p * 4096).collect();
        let list = b.page_list(&offsets).unwrap();
        let mut out = Vec::new();
        let (sorted, normal) = list.zero_pages_last(true, &mut out);
        assert_eq!(normal, 2);
        assert_eq!(
            sorted.offsets(),
            &[0x2000, 0x5000, 0, 0x1000, 0x3000, 0x4000, 0x6000, 0x7000]
        );
        let (data, zeros) = sorted.split_at(normal);
        assert_eq!(data.len(), 2);
        assert!(zeros.iter().all(|p| p.is_zero()));
        let (_, normal) = list.zero_pages_last(false, &mut out);
        assert_eq!(normal, 8, "no detection: every page is data");
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
