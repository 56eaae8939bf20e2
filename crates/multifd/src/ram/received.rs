//! Per-block "received" bitmap of a destination (QEMU's `receivedmap`).
//!
//! The block's length comes from the source, so the bitmap is allocated
//! lazily: one bit per page, in chunks of one 4 KiB page of bitmap (32768
//! guest pages, 128 MiB of guest RAM), each allocated on the first page set
//! in it. A block the source announces but never sends costs one pointer
//! and one `Once` per 128 MiB (16 bytes: 128 KiB for 1 TiB); a hostile
//! source that sends one page per chunk makes us allocate as much bitmap as
//! it made us write guest RAM, never more.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bitmap words per chunk (4 KiB of bitmap).
const CHUNK_WORDS: usize = 512;
/// Pages one chunk covers.
const CHUNK_PAGES: u64 = CHUNK_WORDS as u64 * 64;

type Chunk = [AtomicU64; CHUNK_WORDS];

/// One bit per page, set when the page first arrives (as data or as a zero
/// page). Shared by all channel threads; lock-free once a chunk exists
/// (its creation is a one-time `OnceLock` initialisation).
#[derive(Debug)]
pub(crate) struct ReceivedBitmap {
    chunks: Box<[OnceLock<Box<Chunk>>]>,
    pages: u64,
}

fn new_chunk() -> Box<Chunk> {
    Box::new([const { AtomicU64::new(0) }; CHUNK_WORDS])
}

impl ReceivedBitmap {
    /// A bitmap of `pages` clear bits; no chunk is allocated yet.
    pub(crate) fn new(pages: u64) -> Self {
        // `pages` is at most a mapping's length / 4096, so the chunk count
        // fits a usize on any host that could map the block.
        let n = usize::try_from(pages.div_ceil(CHUNK_PAGES)).unwrap_or(usize::MAX);
        Self {
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
            pages,
        }
    }

    fn locate(page: u64) -> (usize, usize, u64) {
        let chunk = (page / CHUNK_PAGES) as usize;
        let bit = page % CHUNK_PAGES;
        (chunk, (bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Sets the bit of `page`; returns whether it was already set.
    /// `page` must be below the bitmap's page count.
    pub(crate) fn set(&self, page: u64) -> bool {
        assert!(page < self.pages, "page {page} out of range");
        let (chunk, word, bit) = Self::locate(page);
        let words = self.chunks[chunk].get_or_init(new_chunk);
        words[word].fetch_or(bit, Ordering::Relaxed) & bit != 0
    }

    /// Whether `page` was received.
    pub(crate) fn get(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (chunk, word, bit) = Self::locate(page);
        self.chunks[chunk]
            .get()
            .is_some_and(|w| w[word].load(Ordering::Relaxed) & bit != 0)
    }

    /// Number of pages received.
    pub(crate) fn count(&self) -> u64 {
        self.chunks
            .iter()
            .filter_map(OnceLock::get)
            .flat_map(|w| w.iter())
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Bytes of bitmap allocated so far (chunks only).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.chunks.iter().filter(|c| c.get().is_some()).count() * std::mem::size_of::<Chunk>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_previous_state() {
        let b = ReceivedBitmap::new(130);
        assert!(!b.set(129));
        assert!(b.set(129));
        assert!(b.get(129));
        assert!(!b.get(128));
        assert!(!b.get(1000));
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn chunks_are_allocated_on_first_set_only() {
        // 1 TiB of pages: nothing but the chunk table up front.
        let pages = (1u64 << 40) / 4096;
        let b = ReceivedBitmap::new(pages);
        assert_eq!(b.allocated_bytes(), 0);
        assert_eq!(b.chunks.len(), 8192);
        assert!(!b.get(pages - 1));
        assert_eq!(b.allocated_bytes(), 0, "a read allocates nothing");
        assert!(!b.set(pages - 1));
        assert!(!b.set(0));
        assert!(!b.set(CHUNK_PAGES - 1), "same chunk as page 0");
        assert_eq!(b.allocated_bytes(), 2 * 4096);
        assert!(b.get(pages - 1) && b.get(0) && b.get(CHUNK_PAGES - 1));
        assert!(!b.get(CHUNK_PAGES));
        assert_eq!(b.count(), 3);
    }

    #[test]
    fn concurrent_sets_count_each_page_once() {
        let b = ReceivedBitmap::new(4 * CHUNK_PAGES);
        let firsts = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for p in (0..4 * CHUNK_PAGES).step_by(97) {
                        if !b.set(p) {
                            firsts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let expect = (4 * CHUNK_PAGES).div_ceil(97);
        assert_eq!(firsts.into_inner(), expect);
        assert_eq!(b.count(), expect);
    }
}
