//! Pages in a file's holes: zero pages known without reading them.
//!
//! A source block that is a shared mapping of a sparse file (a guest RAM
//! file most of which was never written) reads as zero wherever the file
//! has a hole. Reading such a page to scan it costs a page fault that maps
//! a zero page (or, on tmpfs, allocates one) and a 4 KiB scan; asking the
//! file system where its data is (`SEEK_DATA` / `SEEK_HOLE`) answers for
//! whole ranges at once.
//!
//! [`Holes`] is a cursor over one block for one pass over its pages in
//! ascending order. Each lookup is at most two `lseek` calls and tells
//! what lies from the asked page to the start of the next data extent
//! after it: the data it is in, if any, and the hole that follows.
//! Lookups are spent at most once per [`GROUP_PAGES`] pages: a file
//! fragmented finer than that costs no more than two `lseek`s per group,
//! the rest of the group being scanned as usual. A file whose data runs to
//! its end from some page on costs one lookup for that stretch, and a file
//! with space for all of its length is not asked at all; a file system
//! that cannot tell reports everything as data
//! (the generic `lseek`), and one whose `lseek` fails is asked no more.
//!
//! A page reported as a hole is sent as a zero page. The answer is what
//! the file held when it was asked: a page the guest writes after that (a
//! hole filled during the round) is zero in this round and, since the
//! write comes after dirty tracking started, is logged dirty and sent again
//! in a later round with its data, the same way as a page written after the
//! zero scan read it.

use std::fs::File;

use multifd_wire::PAGE_SIZE_U64;

use super::RamBlock;
use super::block::seek;

/// Pages per lookup budget: at most one lookup (two `lseek`s) for each
/// aligned group of this many pages.
pub(crate) const GROUP_PAGES: u64 = 64;

const GROUP_BYTES: u64 = GROUP_PAGES * PAGE_SIZE_U64;

/// Where the holes of one block's file are, found lazily while its pages
/// are visited in ascending order.
#[derive(Debug)]
pub(crate) struct Holes<'b> {
    file: &'b File,
    /// File offset of the block's first byte.
    base: u64,
    /// The block's length.
    len: u64,
    /// What the last lookup found, as block offsets: `from..data_end`
    /// holds data, `data_end..hole_end` is a hole; nothing is known
    /// outside `from..hole_end`.
    from: u64,
    data_end: u64,
    hole_end: u64,
    /// The group the last lookup was spent on.
    spent: Option<u64>,
    /// No more lookups: the file system could not tell.
    gave_up: bool,
    lseeks: u64,
    hole_pages: u64,
}

impl<'b> Holes<'b> {
    /// A cursor over `block`, or `None` when its memory is not a shared
    /// mapping of a file of ours (anonymous memory, a private mapping
    /// whose written pages are not in the file, or a caller's mapping whose
    /// descriptor position we must not move), or when the file has space
    /// for every byte of its length (see [`is_dense`]).
    pub(crate) fn new(block: &'b RamBlock) -> Option<Self> {
        let (file, base) = block.own_shared_file()?;
        if is_dense(file) {
            return None;
        }
        Some(Self {
            file,
            base,
            len: block.len(),
            from: 0,
            data_end: 0,
            hole_end: 0,
            spent: None,
            gave_up: false,
            lseeks: 0,
            hole_pages: 0,
        })
    }

    /// Whether the page at `offset` (a page of the block) lies in a hole
    /// of the file, so it reads as zero without being read. `false` means
    /// "not known": the page is data, or the lookup budget of its group
    /// was spent.
    pub(crate) fn is_hole(&mut self, offset: u64) -> bool {
        if !(self.from..self.hole_end).contains(&offset) && !self.look_up(offset) {
            return false;
        }
        let hole = offset >= self.data_end && offset + PAGE_SIZE_U64 <= self.hole_end;
        self.hole_pages += u64::from(hole);
        hole
    }

    /// Lookups made so far, in `lseek` calls.
    pub(crate) fn lseeks(&self) -> u64 {
        self.lseeks
    }

    /// Pages reported as holes so far.
    pub(crate) fn hole_pages(&self) -> u64 {
        self.hole_pages
    }

    /// Finds the data from `at` on and the hole after it (`SEEK_HOLE`,
    /// then `SEEK_DATA` from that hole; `at` in a hole finds no data
    /// first); false when nothing may or can be known about `at`.
    fn look_up(&mut self, at: u64) -> bool {
        let group = at / GROUP_BYTES;
        if self.gave_up || self.spent == Some(group) {
            return false;
        }
        self.spent = Some(group);
        let (start, end) = (self.base + at, self.base + self.len);
        self.lseeks += 1;
        let hole = match seek(self.file, start, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.clamp(start, end),
            // `at` past the end of the file (it shrank): reads would fail
            // anyway; claim nothing.
            Ok(None) => return false,
            Err(e) => return self.give_up(e),
        };
        let data = if hole >= end {
            // Data to the end of the block: no more lookups this pass.
            end
        } else {
            self.lseeks += 1;
            match seek(self.file, hole, libc::SEEK_DATA) {
                Ok(Some(d)) => d.clamp(hole, end),
                // Nothing but holes past `hole`.
                Ok(None) => end,
                Err(e) => return self.give_up(e),
            }
        };
        self.from = at;
        self.data_end = hole - self.base;
        self.hole_end = (data - self.base).max(self.data_end + 1);
        true
    }

    fn give_up(&mut self, e: std::io::Error) -> bool {
        tracing::debug!(error = %e, "SEEK_DATA/SEEK_HOLE failed: scanning every page");
        self.gave_up = true;
        false
    }
}

/// Whether `file` has at least as much space as its length, so it holds
/// no hole worth asking for: a `SEEK_HOLE` on such a file walks all of it
/// (about 11 ms per GiB on tmpfs) before the first page can be sent.
/// Space past the end (`FALLOC_FL_KEEP_SIZE`) can make a file with holes
/// look dense; its pages are then scanned like any other, as when the file
/// system cannot tell. A failed `fstat` says "not dense": the lookups
/// handle their own failures.
fn is_dense(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .is_ok_and(|m| m.blocks().saturating_mul(512) >= m.size())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use super::*;
    use crate::ram::Access;
    use crate::ram::test_files::{pattern, sparse};

    const P: u64 = PAGE_SIZE_U64;

    /// A read-only block over a new sparse file (see [`sparse`]).
    fn sparse_block(dir: &Path, pages: u64, data: &[u64], zero_data: &[u64]) -> RamBlock {
        let path = sparse(dir, pages, data, zero_data);
        RamBlock::open_file("m0", &path, Access::ReadOnly, None).unwrap()
    }

    /// Runs one ascending pass and returns the pages reported as holes.
    fn holes_of(block: &RamBlock) -> (Vec<u64>, u64) {
        let mut h = Holes::new(block).expect("a file block");
        let holes = (0..block.pages()).filter(|&p| h.is_hole(p * P)).collect();
        (holes, h.lseeks())
    }

    /// Directories on tmpfs and on the disk's file system, where present.
    fn bases() -> Vec<std::path::PathBuf> {
        let mut v = vec![std::env::temp_dir()];
        if Path::new("/dev/shm").is_dir() {
            v.push("/dev/shm".into());
        }
        v
    }

    #[test]
    fn hole_pages_are_zero_and_data_pages_are_left_to_the_scan() {
        for base in bases() {
            let dir = tempfile::tempdir_in(&base).unwrap();
            // Data in three extents, one of them with a written zero page;
            // a large hole between, the tail a hole.
            let data: Vec<u64> = (0..8).chain(200..260).chain([300]).collect();
            let block = sparse_block(dir.path(), 1024, &data, &[230]);
            let (holes, lseeks) = holes_of(&block);
            for &p in &holes {
                assert!(
                    block.is_zero_page(p * P).unwrap(),
                    "{base:?}: hole page {p}"
                );
                assert!(
                    !data.contains(&p) && p != 230,
                    "{base:?}: data page {p} as hole"
                );
            }
            // Only pages the file system reports as holes are skipped;
            // everything else (the written zero page too) is for the scan.
            assert!(!holes.contains(&230), "{base:?}");
            assert!(block.is_zero_page(230 * P).unwrap());
            // Most of the never-written pages are known without a read
            // (file systems may report a little more as data, never less).
            assert!(holes.len() >= 600, "{base:?}: {} hole pages", holes.len());
            assert!(holes.contains(&500) && holes.contains(&1023), "{base:?}");
            // At most two lseeks per group of 64 pages.
            assert!(
                lseeks <= 2 * 1024 / GROUP_PAGES,
                "{base:?}: {lseeks} lseeks"
            );
        }
    }

    #[test]
    fn a_dense_file_is_not_asked() {
        for base in bases() {
            let dir = tempfile::tempdir_in(&base).unwrap();
            let all: Vec<u64> = (0..512).collect();
            let block = sparse_block(dir.path(), 512, &all, &[]);
            assert!(Holes::new(&block).is_none(), "{base:?}");
            // One hole page makes it a file worth asking.
            let dir = tempfile::tempdir_in(&base).unwrap();
            let block = sparse_block(dir.path(), 512, &all[..511], &[]);
            assert!(Holes::new(&block).is_some(), "{base:?}");
        }
    }

    #[test]
    fn a_file_with_its_data_first_costs_one_lookup_per_pass() {
        for base in bases() {
            let dir = tempfile::tempdir_in(&base).unwrap();
            // Data to the end but for the last page: one SEEK_HOLE finds the
            // hole, one SEEK_DATA finds nothing after it.
            let data: Vec<u64> = (0..511).collect();
            let block = sparse_block(dir.path(), 512, &data, &[]);
            let (holes, lseeks) = holes_of(&block);
            assert!(holes.iter().all(|&p| p == 511), "{base:?}: {holes:?}");
            assert!(lseeks <= 2, "{base:?}: {lseeks} lseeks");
        }
    }

    #[test]
    fn a_finely_fragmented_file_costs_two_lseeks_per_group() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        // Every other page written: one lookup per page would be 1024 lseeks.
        let data: Vec<u64> = (0..1024).step_by(2).collect();
        let block = sparse_block(dir.path(), 1024, &data, &[]);
        let (holes, lseeks) = holes_of(&block);
        assert!(lseeks <= 2 * 1024 / GROUP_PAGES, "{lseeks} lseeks");
        for &p in &holes {
            assert!(p % 2 == 1, "data page {p} as hole");
        }
    }

    #[test]
    fn an_answer_is_what_the_file_held_when_asked() {
        for base in bases() {
            let dir = tempfile::tempdir_in(&base).unwrap();
            let path = sparse(dir.path(), 256, &[0], &[]);
            // The source reads the file; the guest (another process) writes
            // it.
            let block = RamBlock::open_file("m0", &path, Access::ReadOnly, None).unwrap();
            let guest = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut h = Holes::new(&block).unwrap();
            assert!(h.is_hole(100 * P), "{base:?}");
            // The guest fills the hole after the cursor looked: this pass
            // still reports its neighbours from the same answer (the page
            // itself is logged dirty and sent again); a new pass sees the
            // data.
            guest.write_all_at(&pattern(100), 100 * P).unwrap();
            assert!(h.is_hole(101 * P), "{base:?}");
            assert!(!block.is_zero_page(100 * P).unwrap());
            let mut again = Holes::new(&block).unwrap();
            assert!(
                !again.is_hole(100 * P),
                "{base:?}: the written page is data"
            );
        }
    }

    #[test]
    fn memory_not_backed_by_our_shared_file_has_no_holes() {
        let b = RamBlock::anonymous("m0", 16 * P).unwrap();
        assert!(Holes::new(&b).is_none());
    }
}
