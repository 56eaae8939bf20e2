//! Pages and RAM files for the unit tests of this module.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

/// Page `p`'s pattern: never all zero, different from its neighbours'.
pub(crate) fn pattern(p: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (p as u8).wrapping_mul(37) ^ (i as u8) | 1;
    }
    page
}

/// A sparse file `dir/ram` of `pages` pages where only `data` pages are
/// written: with their pattern, or with zeros (data to the file system,
/// zero to a scan) for the pages in `zero_data`.
pub(crate) fn sparse(dir: &Path, pages: u64, data: &[u64], zero_data: &[u64]) -> PathBuf {
    let path = dir.join("ram");
    let f = File::create(&path).unwrap();
    f.set_len(pages * PAGE_SIZE_U64).unwrap();
    for &p in data {
        f.write_all_at(&pattern(p), p * PAGE_SIZE_U64).unwrap();
    }
    for &p in zero_data {
        f.write_all_at(&[0; PAGE_SIZE], p * PAGE_SIZE_U64).unwrap();
    }
    f.sync_all().unwrap();
    path
}
