//! Deterministic guest-RAM-like images: a mix of zero pages, compressible
//! pages (pieces of system binaries and text) and random pages.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

const PAGE: usize = 4096;

/// SplitMix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Mix of page kinds.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Fraction of zero pages.
    pub zero: f64,
    /// Fraction of compressible pages.
    pub compressible: f64,
    /// Mean length of a drawn run of pages (a kind drawn, then a run
    /// length, geometric with this mean). 1: every page is drawn on its
    /// own, scattered as finely as the fractions allow. The next draw may
    /// give the same kind again, so with the default fractions stretches
    /// of zero pages average `run_pages / 0.6` pages and stretches of data
    /// pages `run_pages / 0.4`. A guest's RAM is closer to long runs: zero
    /// pages lie in whole free regions.
    pub run_pages: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            zero: 0.4,
            compressible: 0.4,
            run_pages: 1,
        }
    }
}

/// The kinds of page an image is made of.
#[derive(Clone, Copy)]
enum Kind {
    Zero,
    Compressible,
    Random,
}

/// A run length with mean `mean` (geometric: each further page continues
/// the run with probability 1 - 1/mean).
fn run_length(rng: &mut Rng, mean: u32) -> u64 {
    if mean <= 1 {
        return 1;
    }
    let go_on = 1.0 - 1.0 / f64::from(mean);
    // In (0, 1], so the logarithm is finite.
    let u = 1.0 - rng.next_f64();
    1 + (u.ln() / go_on.ln()) as u64
}

/// Real-world compressible bytes: the first MiB of system binaries and
/// copyright texts (sorted, so the same machine gives the same corpus),
/// with a synthetic fallback.
fn corpus() -> Vec<u8> {
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for dir in ["/usr/bin"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut v: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            v.sort();
            files.extend(v.into_iter().take(400));
        }
    }
    let mut out = Vec::new();
    for f in files {
        if let Ok(mut file) = std::fs::File::open(&f) {
            let mut buf = Vec::new();
            let _ =
                std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, 1 << 20), &mut buf);
            out.extend_from_slice(&buf);
        }
        if out.len() > 64 << 20 {
            break;
        }
    }
    if out.len() < 1 << 20 {
        let words = [
            "migration ",
            "page ",
            "channel ",
            "qemu ",
            "guest ",
            "memory ",
            "sync ",
            "zero ",
        ];
        let mut rng = Rng::new(7);
        while out.len() < 8 << 20 {
            out.extend_from_slice(words[rng.below(words.len())].as_bytes());
        }
    }
    out
}

/// Writes `size` bytes (a multiple of 4096) of image to `path`.
pub fn generate(path: &Path, size: u64, mix: Mix, seed: u64) -> Result<()> {
    anyhow::ensure!(
        size > 0 && size.is_multiple_of(PAGE as u64),
        "size must be a multiple of 4096"
    );
    let corpus = corpus();
    let mut rng = Rng::new(seed);
    let mut random = vec![0u8; 64 << 20];
    for chunk in random.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(4 << 20, file);
    let zero = [0u8; PAGE];
    let (mut kind, mut left) = (Kind::Zero, 0u64);
    for _ in 0..size / PAGE as u64 {
        if left == 0 {
            let r = rng.next_f64();
            kind = if r < mix.zero {
                Kind::Zero
            } else if r < mix.zero + mix.compressible {
                Kind::Compressible
            } else {
                Kind::Random
            };
            left = run_length(&mut rng, mix.run_pages);
        }
        left -= 1;
        let page: &[u8] = match kind {
            Kind::Zero => &zero,
            Kind::Compressible => {
                let o = rng.below(corpus.len() - PAGE) & !63;
                &corpus[o..o + PAGE]
            }
            Kind::Random => {
                let o = rng.below(random.len() - PAGE) & !7;
                &random[o..o + PAGE]
            }
        };
        out.write_all(page)?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Fills `size` bytes of `path` with zeros (pre-faults a destination file).
pub fn zero_file(path: &Path, size: u64) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(16 << 20, file);
    let chunk = vec![0u8; 16 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_mixed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        generate(&a, 1 << 20, Mix::default(), 42).unwrap();
        generate(&b, 1 << 20, Mix::default(), 42).unwrap();
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(x, y);
        let zeros = x.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count();
        assert!((60..150).contains(&zeros), "{zeros} zero pages of 256");
    }

    /// Zero pages of `image`: how many, and in how many runs.
    fn zero_runs(image: &[u8]) -> (usize, usize) {
        let zero: Vec<bool> = image
            .chunks(PAGE)
            .map(|p| p.iter().all(|&b| b == 0))
            .collect();
        let runs = (0..zero.len())
            .filter(|&i| zero[i] && (i == 0 || !zero[i - 1]))
            .count();
        (zero.iter().filter(|&&z| z).count(), runs)
    }

    #[test]
    fn pages_come_in_runs_of_the_mean_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let size = 64 << 20; // 16,384 pages
        let mut means = Vec::new();
        for run_pages in [1, 64] {
            let mix = Mix {
                run_pages,
                ..Mix::default()
            };
            generate(&path, size, mix, 7).unwrap();
            let (zeros, runs) = zero_runs(&std::fs::read(&path).unwrap());
            let share = zeros as f64 / (size / PAGE as u64) as f64;
            assert!((0.25..0.55).contains(&share), "{run_pages}: {share} zero");
            means.push(zeros as f64 / runs as f64);
        }
        // A stretch of zero pages ends when the next draw is not zero
        // (60% of draws): 1 / 0.6 = 1.67 pages scattered, 64 / 0.6 = 107
        // in runs (less where pages of the corpus are zero).
        assert!((1.4..2.0).contains(&means[0]), "{means:?}");
        assert!((75.0..150.0).contains(&means[1]), "{means:?}");
    }
}
