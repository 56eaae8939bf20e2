//! Per-block "received" bitmap of a destination (QEMU's `receivedmap`).

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page, set when the page first arrives (as data or as a zero
/// page). Shared by all channel threads; lock-free.
#[derive(Debug)]
pub(crate) struct ReceivedBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl ReceivedBitmap {
    /// A bitmap of `pages` clear bits.
    pub(crate) fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Sets the bit of `page`; returns whether it was already set.
    /// `page` must be below the bitmap's page count.
    pub(crate) fn set(&self, page: u64) -> bool {
        assert!(page < self.pages, "page {page} out of range");
        let bit = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit != 0
    }

    /// Whether `page` was received.
    pub(crate) fn get(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1u64 << (page % 64)) != 0
    }

    /// Number of pages received.
    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
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
}
