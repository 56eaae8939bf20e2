//! A cheap test for pages deflate cannot shrink (random, encrypted or
//! already compressed data), so that the zlib method can store them as
//! they are instead of spending its slowest work on them: deflate at level
//! 1 takes about twice as long on such a page as on a compressible one, and
//! its output is then a few percent larger than the page.
//!
//! The test samples the page's bytes and the differences between
//! neighbouring bytes and asks whether both spread almost evenly over all
//! 256 values. Either being uneven means deflate's Huffman coding (bytes) or
//! its matches (runs, ramps, small alphabets) find something. What it
//! cannot see, a page that repeats a long random stretch, costs only
//! compression ratio: a stored page is always decoded right.

/// Every `SAMPLE_STRIDE`-th byte is sampled: a third of the page. An odd
/// stride keeps the samples from lining up with word-sized structure.
const SAMPLE_STRIDE: usize = 3;

/// A histogram counts as even when the chance that two samples are equal
/// (the sum of squared counts over the square of their number) is at most
/// `1 / EVEN_SPREAD`: a collision entropy of at least log2(160) = 7.3 bits
/// per byte. Random bytes give about 7.8 here (the sample is finite); code
/// and text stay below 6.5.
const EVEN_SPREAD: u32 = 160;

/// Whether `page` looks like data deflate cannot shrink.
pub(super) fn looks_incompressible(page: &[u8]) -> bool {
    let mut bytes = [0u16; 256];
    let mut steps = [0u16; 256];
    let mut n = 0u32;
    let mut i = 0;
    while i + 1 < page.len() {
        bytes[usize::from(page[i])] += 1;
        steps[usize::from(page[i + 1].wrapping_sub(page[i]))] += 1;
        n += 1;
        i += SAMPLE_STRIDE;
    }
    let limit = n * n / EVEN_SPREAD;
    let collisions = |h: &[u16; 256]| h.iter().map(|&c| u32::from(c) * u32::from(c)).sum::<u32>();
    n > 0 && collisions(&bytes) <= limit && collisions(&steps) <= limit
}

#[cfg(test)]
mod tests {
    use multifd_wire::PAGE_SIZE;

    use super::*;

    fn random_page(seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn random_pages_are_incompressible() {
        for seed in 1..200 {
            assert!(looks_incompressible(&random_page(seed)), "seed {seed}");
        }
    }

    #[test]
    fn pages_deflate_shrinks_are_not() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let ramp: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        let wide_ramp: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + i / 256) as u8).collect();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let base64: Vec<u8> = random_page(9)
            .iter()
            .map(|b| alphabet[usize::from(b % 64)])
            .collect();
        // Random 16-bit values with a zero high byte, as in a table.
        let halves: Vec<u8> = random_page(5).chunks(2).flat_map(|c| [c[0], 0]).collect();
        let zero = vec![0u8; PAGE_SIZE];
        for (name, page) in [
            ("text", &text),
            ("ramp", &ramp),
            ("wide ramp", &wide_ramp),
            ("base64", &base64),
            ("halves", &halves),
            ("zero", &zero),
        ] {
            assert!(!looks_incompressible(page), "{name}");
        }
    }
}
