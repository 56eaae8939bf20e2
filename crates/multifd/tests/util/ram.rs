//! Guest RAM for the tests: destination providers (anonymous, or files a
//! test can read after the mapping is gone), deterministic source
//! contents, a guest that dirties pages between rounds, and a page-by-page
//! comparison.

use std::path::PathBuf;

use multifd::SourceVm;
use multifd::{GuestRam, RamBlock, RamProvider};
use multifd_wire::stream::RamBlockInfo;
use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

/// Gives anonymous, zero-filled blocks for whatever the source announces.
#[derive(Debug, Default)]
pub struct AnonRam;

impl RamProvider for AnonRam {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
        }
        Ok(ram)
    }
}

/// Gives blocks backed by (shared-mapped) files in a directory, so a test
/// can inspect what was written into guest RAM after a failed migration
/// dropped the mapping. Only announced blocks of `expect` are accepted.
#[derive(Debug)]
pub struct FileRam {
    pub dir: PathBuf,
}

impl FileRam {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ram"))
    }

    /// The whole contents of block `name` as it is now.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("block file")
    }
}

impl RamProvider for FileRam {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::create_file(
                &b.idstr,
                &self.path(&b.idstr),
                b.used_length,
            )?)?;
        }
        Ok(ram)
    }
}

/// Deterministic page contents: every third page zero, the rest patterned.
pub fn pattern_page(page: u64, seed: u64) -> Option<[u8; PAGE_SIZE]> {
    if (page + seed).is_multiple_of(3) {
        return None;
    }
    let mut p = [0u8; PAGE_SIZE];
    let mut x =
        page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1;
    for chunk in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    Some(p)
}

/// Anonymous block with every page non-zero (cheap fill: the sender must
/// move real payload, so socket buffers fill up).
pub fn dense_block(name: &str, pages: u64) -> RamBlock {
    let b = RamBlock::anonymous(name, pages * PAGE_SIZE_U64).unwrap();
    let mut data = [0u8; PAGE_SIZE];
    for p in 0..pages {
        data[..8].copy_from_slice(&p.to_le_bytes());
        data[8..].fill((p as u8) | 1);
        b.write_page(p * PAGE_SIZE_U64, &data).unwrap();
    }
    b
}

/// Source RAM: anonymous blocks filled with [`pattern_page`], except
/// blocks whose name starts with `zero`, which stay all zero.
pub fn source_ram(blocks: &[(&str, u64)], seed: u64) -> GuestRam {
    let mut ram = GuestRam::new();
    for (i, &(name, pages)) in blocks.iter().enumerate() {
        let b = RamBlock::anonymous(name, pages * PAGE_SIZE_U64).unwrap();
        let fill = if name.starts_with("zero") { 0 } else { pages };
        for p in 0..fill {
            if let Some(data) = pattern_page(p, seed + i as u64 * 1000) {
                b.write_page(p * PAGE_SIZE_U64, &data).unwrap();
            }
        }
        ram.push(b).unwrap();
    }
    ram
}

/// Compares two RAMs page by page; describes the first difference.
pub fn ram_diff(a: &GuestRam, b: &GuestRam) -> Option<String> {
    if a.blocks().len() != b.blocks().len() {
        return Some(format!(
            "{} vs {} blocks",
            a.blocks().len(),
            b.blocks().len()
        ));
    }
    let mut pa = [0u8; PAGE_SIZE];
    let mut pb = [0u8; PAGE_SIZE];
    for (x, y) in a.blocks().iter().zip(b.blocks()) {
        if x.name() != y.name() || x.len() != y.len() {
            return Some(format!(
                "block {:?}/{} vs {:?}/{}",
                x.name(),
                x.len(),
                y.name(),
                y.len()
            ));
        }
        let mut bad = 0u64;
        let mut first = None;
        for p in 0..x.pages() {
            x.read_page(p * PAGE_SIZE_U64, &mut pa).unwrap();
            y.read_page(p * PAGE_SIZE_U64, &mut pb).unwrap();
            if pa != pb {
                bad += 1;
                first.get_or_insert(p);
            }
        }
        if let Some(first) = first {
            return Some(format!(
                "block {:?}: {bad} of {} pages differ, first at page {first}",
                x.name(),
                x.pages()
            ));
        }
    }
    None
}

/// A source whose guest writes some pages between rounds (and once more
/// after the pause), and reports them dirty: the migration then has several
/// rounds and SYNC points, and the receiver must end with the final state.
#[derive(Debug)]
pub struct Dirtier {
    pub calls: u64,
    pub seed: u64,
    /// Pages written per call.
    pub per_call: u64,
    /// Stop dirtying after this many calls (`u64::MAX`: never).
    pub calls_limit: u64,
}

impl SourceVm for Dirtier {
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        self.calls += 1;
        if self.calls > self.calls_limit {
            return Ok(());
        }
        for (b, block) in ram.blocks().iter().enumerate() {
            let pages = block.pages();
            for k in 0..self.per_call.min(pages) {
                let p = (self.calls * 7919 + k * 31 + self.seed) % pages;
                let off = p * PAGE_SIZE_U64;
                let mut data =
                    pattern_page(p, self.seed + self.calls * 77 + 1).unwrap_or([0; PAGE_SIZE]);
                data[0] = self.calls as u8;
                block.write_page(off, &data)?;
                if !dirty[b].contains(&off) {
                    dirty[b].push(off);
                }
            }
        }
        Ok(())
    }

    fn pause(&mut self) -> multifd::Result<()> {
        Ok(())
    }

    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        Ok(Vec::new())
    }
}
