//! Zero-page detection over guest memory (QEMU's `buffer_is_zero`).
//!
//! The scan is the one piece of per-byte work a sender does that a plain
//! copy does not: every zero page must be read in full. It is bound by
//! memory bandwidth, so the widest vector unit the CPU has is picked at run
//! time (AVX-512, then AVX2, then the SSE2 baseline); on the 2-core
//! machines here AVX-512 scans zero pages about 25% faster than SSE2.
//!
//! Guest memory may be written meanwhile by a running guest or another
//! process, so every load is a *volatile* read of a whole vector (aligned:
//! pages are 4096-byte aligned): the compiler neither merges, splits nor
//! re-reads them, which is what keeps a racing write from being undefined
//! behaviour under vm-memory's model. Reads go 256 bytes per step and stop
//! at the first non-zero stretch, so a data page usually costs four cache
//! lines.
#![allow(unsafe_code)]

use multifd_wire::PAGE_SIZE;

/// Bytes checked between two early-exit tests.
const STEP: usize = 256;

/// Alignment every page handed to [`page_is_zero`] has (the widest load).
pub(crate) const SCAN_ALIGN: usize = 64;

/// One page of this process's own memory (not guest memory), aligned
/// as the scan wants it (and as `O_DIRECT` would).
#[repr(C, align(4096))]
pub(crate) struct OwnPage(pub(crate) [u8; PAGE_SIZE]);

// Pages laid out one after the other, without padding.
const _: () = assert!(std::mem::size_of::<OwnPage>() == PAGE_SIZE);

impl OwnPage {
    /// The bytes of `pages`, one after the other.
    pub(crate) fn bytes(pages: &[OwnPage]) -> &[u8] {
        // SAFETY: `OwnPage` is `repr(C)` over `[u8; PAGE_SIZE]` and exactly
        // PAGE_SIZE long (asserted above), so a slice of them is
        // `pages.len() * PAGE_SIZE` initialized bytes; this process's own
        // memory, borrowed shared for the result's lifetime.
        unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), size_of_val(pages)) }
    }

    /// The bytes of `pages`, one after the other, to write into.
    pub(crate) fn bytes_mut(pages: &mut [OwnPage]) -> &mut [u8] {
        // SAFETY: as in `bytes`; borrowed exclusively for the result's
        // lifetime, and any byte value is a valid page.
        unsafe {
            std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), size_of_val(pages))
        }
    }

    /// Whether every byte is zero.
    pub(crate) fn is_zero(&self) -> bool {
        // SAFETY: the pointer is to this page's own PAGE_SIZE bytes,
        // 4096-byte aligned (the type's alignment, a multiple of
        // SCAN_ALIGN), borrowed shared for the call so nothing writes them.
        unsafe { page_is_zero(self.0.as_ptr()) }
    }
}

/// Whether the [`PAGE_SIZE`] bytes at `page` are all zero.
///
/// # Safety
/// `page` must be [`SCAN_ALIGN`]-byte aligned and point to `PAGE_SIZE`
/// mapped, readable bytes that no `&mut` reference points into. Other
/// threads or processes may write them meanwhile; the answer is then one
/// of the states the page went through.
pub(crate) unsafe fn page_is_zero(page: *const u8) -> bool {
    debug_assert!(page.addr().is_multiple_of(SCAN_ALIGN));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above); the caller
            // guarantees an aligned, readable page.
            return unsafe { x86::avx512(page) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above); the caller
            // guarantees an aligned, readable page.
            return unsafe { x86::avx2(page) };
        }
        // SAFETY: SSE2 is part of the x86_64 baseline; the caller
        // guarantees an aligned, readable page.
        unsafe { x86::sse2(page) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: the caller guarantees an aligned, readable page.
        unsafe { portable(page) }
    }
}

/// Any architecture: volatile 8-byte loads.
///
/// # Safety
/// As [`page_is_zero`].
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
unsafe fn portable(page: *const u8) -> bool {
    let words = page.cast::<u64>();
    for i in (0..PAGE_SIZE / 8).step_by(STEP / 8) {
        let mut acc = 0u64;
        for j in 0..STEP / 8 {
            // SAFETY: word `i + j` lies inside the page (`(i + j) * 8 + 8 <=
            // PAGE_SIZE`), which is 8-byte aligned (the caller's contract).
            acc |= unsafe { words.add(i + j).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! One function per vector width. Every load reads `page + i + j` with
    //! `i + j + width <= PAGE_SIZE` and `i + j` a multiple of the width, so
    //! with the page 64-byte aligned every load is in bounds and aligned.
    use super::{PAGE_SIZE, STEP};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU supports AVX-512F; `page` as in [`super::page_is_zero`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(page: *const u8) -> bool {
        let v = page.cast::<__m512i>();
        for i in (0..PAGE_SIZE / 64).step_by(STEP / 64) {
            // SAFETY: four aligned 64-byte loads inside the page (see the
            // module comment); the feature is enabled by the caller's check.
            let all = unsafe {
                let a = _mm512_or_si512(v.add(i).read_volatile(), v.add(i + 1).read_volatile());
                let b = _mm512_or_si512(v.add(i + 2).read_volatile(), v.add(i + 3).read_volatile());
                _mm512_or_si512(a, b)
            };
            if _mm512_test_epi64_mask(all, all) != 0 {
                return false;
            }
        }
        true
    }

    /// # Safety
    /// The CPU supports AVX2; `page` as in [`super::page_is_zero`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(page: *const u8) -> bool {
        let v = page.cast::<__m256i>();
        for i in (0..PAGE_SIZE / 32).step_by(STEP / 32) {
            let mut acc = _mm256_setzero_si256();
            for j in 0..STEP / 32 {
                // SAFETY: an aligned 32-byte load inside the page.
                acc = _mm256_or_si256(acc, unsafe { v.add(i + j).read_volatile() });
            }
            if _mm256_testz_si256(acc, acc) == 0 {
                return false;
            }
        }
        true
    }

    /// # Safety
    /// `page` as in [`super::page_is_zero`] (SSE2 is always there).
    pub(super) unsafe fn sse2(page: *const u8) -> bool {
        let v = page.cast::<__m128i>();
        // SAFETY: SSE2 is part of the x86_64 baseline; every load is an
        // aligned 16-byte load inside the page.
        unsafe {
            let zero = _mm_setzero_si128();
            for i in (0..PAGE_SIZE / 16).step_by(STEP / 16) {
                let mut acc = zero;
                for j in 0..STEP / 16 {
                    acc = _mm_or_si128(acc, v.add(i + j).read_volatile());
                }
                if _mm_movemask_epi8(_mm_cmpeq_epi8(acc, zero)) != 0xFFFF {
                    return false;
                }
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan, as a function pointer.
    type Scan = unsafe fn(*const u8) -> bool;

    /// Every scan this CPU can run, by name.
    fn scans() -> Vec<(&'static str, Scan)> {
        let mut v: Vec<(&'static str, Scan)> =
            vec![("dispatch", page_is_zero), ("portable", portable)];
        #[cfg(target_arch = "x86_64")]
        {
            v.push(("sse2", x86::sse2));
            if std::arch::is_x86_feature_detected!("avx2") {
                v.push(("avx2", x86::avx2));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(("avx512", x86::avx512));
            }
        }
        v
    }

    /// One page, aligned as guest pages are.
    #[repr(C, align(4096))]
    struct AlignedPage([u8; PAGE_SIZE]);

    #[test]
    fn every_scan_finds_any_single_nonzero_bit() {
        let mut page = Box::new(AlignedPage([0; PAGE_SIZE]));
        for (name, scan) in scans() {
            page.0.fill(0);
            // SAFETY: the page is a private, aligned 4096-byte buffer.
            assert!(unsafe { scan(page.0.as_ptr()) }, "{name}: zero page");
            for at in (0..PAGE_SIZE).step_by(61).chain([63, 64, 255, 256, 4095]) {
                for bit in [0x01, 0x80] {
                    page.0.fill(0);
                    page.0[at] = bit;
                    // SAFETY: as above.
                    let zero = unsafe { scan(page.0.as_ptr()) };
                    assert!(!zero, "{name}: byte {at} = {bit:#x}");
                }
            }
        }
    }
}
