//! A buffer of this process's own pages in transparent huge pages, for
//! direct I/O: the kernel pins every page of an `O_DIRECT` buffer for each
//! request and hands the device one segment per physically contiguous
//! piece, so reads and writes from 2 MiB pages cost it far less than from
//! 4 KiB ones: `O_DIRECT` reads of 4 MiB from a mapped-ram file on the
//! ext4 disk here (4 threads, caches dropped) took 2.1-2.4 s per 4 GiB
//! into huge pages against 6.3 s into small ones (see
//! docs/performance.md).
//!
//! The chunks are 2 MiB-aligned by their type, on any kernel: an anonymous
//! `mmap` of a multiple of 2 MiB is placed on a 2 MiB boundary only since
//! Linux 6.7, and a misaligned 4 MiB buffer gets one huge page at most.
#![allow(unsafe_code)]

use multifd_wire::PAGE_SIZE;

use super::zero::OwnPage;

/// Pages per chunk: one 2 MiB huge page.
const CHUNK_PAGES: usize = 512;

/// 2 MiB of pages, aligned to 2 MiB so that a huge page can back it.
#[repr(C, align(2097152))]
struct Chunk([OwnPage; CHUNK_PAGES]);

// Chunks laid out one after the other, without padding, so their pages are
// one slice.
const _: () = assert!(std::mem::size_of::<Chunk>() == CHUNK_PAGES * PAGE_SIZE);
const _: () = assert!(std::mem::align_of::<Chunk>() == CHUNK_PAGES * PAGE_SIZE);

/// Zeroed [`OwnPage`]s in 2 MiB chunks aligned to 2 MiB, advised for
/// transparent huge pages (`MADV_HUGEPAGE`) before they are first touched.
/// Best effort: where the kernel gives no huge page, they are ordinary
/// pages.
pub(crate) struct HugeOwnPages {
    chunks: Vec<Chunk>,
}

impl HugeOwnPages {
    /// At least `pages` zeroed pages (a whole number of chunks). Panics
    /// where the memory cannot be had; [`HugeOwnPages::try_new`] returns
    /// the refusal instead.
    pub(crate) fn new(pages: usize) -> Self {
        match Self::try_new(pages) {
            Ok(buf) => buf,
            Err(e) => panic!("{pages} pages of buffer: {e}"),
        }
    }

    /// At least `pages` zeroed pages (a whole number of chunks), or the
    /// allocator's refusal.
    pub(crate) fn try_new(pages: usize) -> Result<Self, std::collections::TryReserveError> {
        let n = pages.div_ceil(CHUNK_PAGES);
        let mut chunks: Vec<Chunk> = Vec::new();
        chunks.try_reserve_exact(n)?;
        if n > 0 {
            let len = n * std::mem::size_of::<Chunk>();
            // SAFETY: the range is the vector's own allocation (capacity
            // for `n` chunks, 2 MiB aligned by the type); `MADV_HUGEPAGE`
            // changes neither its contents nor who owns it, and a refusal
            // is harmless. Given before the zeroing below touches it, so
            // that the first touch can fault in huge pages.
            unsafe { libc::madvise(chunks.as_mut_ptr().cast(), len, libc::MADV_HUGEPAGE) };
            // SAFETY: zeroes the `n` chunks the capacity holds, then makes
            // them the vector's elements: a chunk is bytes only, so zero
            // bytes are a valid one. Written in place: a chunk is too big
            // to build on a thread's stack.
            unsafe {
                chunks.as_mut_ptr().write_bytes(0, n);
                chunks.set_len(n);
            }
        }
        Ok(Self { chunks })
    }

    /// Number of pages.
    pub(crate) fn len(&self) -> usize {
        self.chunks.len() * CHUNK_PAGES
    }

    /// The pages, one after the other.
    pub(crate) fn pages(&self) -> &[OwnPage] {
        // SAFETY: `Chunk` is `repr(C)` over `[OwnPage; CHUNK_PAGES]` with no
        // padding (asserted above), so `len()` pages follow each other from
        // the first chunk's start; borrowed shared for the result's
        // lifetime.
        unsafe { std::slice::from_raw_parts(self.chunks.as_ptr().cast::<OwnPage>(), self.len()) }
    }

    /// The pages, one after the other, to write into.
    pub(crate) fn pages_mut(&mut self) -> &mut [OwnPage] {
        let len = self.len();
        // SAFETY: as in `pages`; borrowed exclusively for the result's
        // lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.chunks.as_mut_ptr().cast::<OwnPage>(), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_zeroed_aligned_and_writable() {
        let mut buf = HugeOwnPages::new(513);
        assert_eq!(buf.len(), 1024, "whole chunks");
        assert_eq!(buf.pages().as_ptr() as usize % (2 << 20), 0);
        assert!(buf.pages().iter().all(OwnPage::is_zero));
        buf.pages_mut()[1023].0[4095] = 9;
        assert_eq!(buf.pages()[1023].0[4095], 9);
        assert!(!buf.pages()[1023].is_zero());
        assert_eq!(HugeOwnPages::new(0).len(), 0);
        assert!(
            HugeOwnPages::try_new(usize::MAX / 2).is_err(),
            "refused, not aborted"
        );
        assert!(HugeOwnPages::new(0).pages().is_empty());
    }
}
