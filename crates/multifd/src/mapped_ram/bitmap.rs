//! A block's bitmap while a file is being written: set and cleared by
//! several channel threads at once, written out once at the end.

use std::sync::atomic::{AtomicU64, Ordering};

use multifd_wire::PAGE_SIZE_U64;

/// One bit per page; bit `k` set: page `k` is in the file.
#[derive(Debug)]
pub(crate) struct AtomicBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl AtomicBitmap {
    /// All clear, for a block of `len` bytes (a multiple of the page size).
    pub(crate) fn new(len: u64) -> Self {
        let pages = len / PAGE_SIZE_U64;
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Sets (`present`) or clears the bits of pages `first .. first + n`.
    /// Pages past the end are ignored (callers pass checked pages).
    pub(crate) fn set_range(&self, first: u64, n: u64, present: bool) {
        let end = first.saturating_add(n).min(self.pages);
        let mut k = first;
        while k < end {
            let word = k / 64;
            let bit = k % 64;
            let take = (64 - bit).min(end - k);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            let w = &self.words[word as usize];
            if present {
                w.fetch_or(mask, Ordering::Relaxed);
            } else {
                w.fetch_and(!mask, Ordering::Relaxed);
            }
            k += take;
        }
    }

    /// The bytes of the bitmap as QEMU writes them (64-bit little-endian
    /// words). Call once every writer is done.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multifd_wire::mapped_ram::Bitmap;

    #[test]
    fn ranges_across_words_read_back_through_the_wire_view() {
        let b = AtomicBitmap::new(200 * 4096);
        b.set_range(3, 100, true);
        b.set_range(60, 10, false);
        b.set_range(199, 5, true);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 32);
        let view = Bitmap::new(&bytes, 200).unwrap();
        let runs: Vec<_> = view.runs().collect();
        assert_eq!(runs, [3..60, 70..103, 199..200]);
        assert!(!view.has_stray_bits());
    }
}
