//! Reading a batch of pages through the block's file into the reader's own
//! memory instead of through the mapping.
//!
//! When a block is a shared mapping of a file this crate opened, the
//! file's page cache *is* guest memory, so `preadv` on the file reads the
//! same bytes the mapping shows, without mapping anything: no page fault
//! or `MADV_POPULATE_READ` per page, no page tables to tear down at exit,
//! and the bytes land in a small buffer that stays in the cache for the
//! zero-page scan and the copy into the socket. Mapping is what dominates
//! a sender on 4 KiB pages under load (measured: scanning a 4 GiB image
//! through `pread` into a 512 KiB buffer took 0.9-1.4 s where mapping it
//! and scanning the mapping took 2.8-4.8 s, with other processes busy).
//! With huge pages the mapping costs almost nothing, so those blocks keep
//! the mapping.
//!
//! The buffer is the reader's own memory, so scanning and sending it needs
//! no volatile accesses; a guest writing a page meanwhile gives one of the
//! page's states, as through the mapping (the page is dirty and is sent
//! again).
//!
//! A mapped-ram save reads the same way, one stretch of consecutive pages
//! at a time ([`Staging::read_stretch`]), and writes the stretch's runs of
//! data pages ([`Staging::runs`]) to the file from the buffer.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

use super::huge_own_pages::HugeOwnPages;
use super::page::PageBatch;
use super::zero::OwnPage;
use crate::transport::{IoSlice, IoSliceMut, sys};

/// A channel's buffer for one batch (or one stretch of it), reused from
/// batch to batch.
///
/// Its pages are [`OwnPage`]s, 4096-byte aligned each and laid out one
/// after the other, so a run of its pages can be written with `O_DIRECT`.
#[derive(Default)]
pub(crate) struct Staging {
    pages: Store,
    /// Index into `pages` of each data page, in the order of the data
    /// pages of the last [`Staging::read`].
    data: Vec<usize>,
}

/// Where a [`Staging`]'s pages are.
enum Store {
    /// The heap: grown a page at a time, kept small enough for the cache.
    Small(Vec<OwnPage>),
    /// Transparent huge pages, for direct I/O.
    Huge(HugeOwnPages),
}

impl Default for Store {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

// Direct I/O needs buffers aligned to the device's logical block size,
// 4096 bytes at most.
const _: () = assert!(std::mem::align_of::<OwnPage>() >= 4096);

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("pages", &self.slots().len())
            .finish_non_exhaustive()
    }
}

/// A run of pages of the last [`Staging::read_stretch`]: consecutive in
/// the block and in the buffer, all data pages or all zero pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StagedRun {
    /// The stretch's pages this run covers (also the buffer's).
    pub(crate) pages: Range<usize>,
    /// Whether they are zero pages (as scanned).
    pub(crate) zero: bool,
}

impl Staging {
    /// A staging buffer in transparent huge pages (best effort), for
    /// writing with direct I/O: the kernel pins a direct write's pages and
    /// the device gets one segment per contiguous piece, so huge pages make
    /// each write much cheaper. It grows in 2 MiB steps.
    pub(crate) fn in_huge_pages() -> Self {
        Self {
            pages: Store::Huge(HugeOwnPages::new(0)),
            data: Vec::new(),
        }
    }

    /// Reads the batch's pages through the block's file (one `pread` per
    /// run of consecutive offsets), except those known to be zero when
    /// `detect` is set, then sorts them as
    /// [`PageBatch::zero_pages_last`] does: fills `out` with the offsets,
    /// data pages first, and returns how many data pages lead it. With
    /// `detect` false every page is data. The data pages' bytes are then
    /// [`Staging::data_pages`]. `None` (nothing read) unless the block is
    /// a shared mapping of a file this crate opened, backed by 4 KiB pages.
    pub(crate) fn read(
        &mut self,
        batch: &PageBatch<'_>,
        detect: bool,
        out: &mut Vec<u64>,
    ) -> Option<io::Result<usize>> {
        let (file, start) = batch.block().read_through_file()?;
        if batch.block().page_size() != PAGE_SIZE_U64 {
            return None;
        }
        let offsets = batch.offsets();
        let known_zero = |i: usize| detect && batch.is_known_zero(i);
        self.grow(offsets.len());
        let fd = file.as_raw_fd();
        let mut i = 0;
        while i < offsets.len() {
            if known_zero(i) {
                i += 1;
                continue;
            }
            let j = i + stretch_len(batch, i, usize::MAX, detect);
            if let Err(e) = self.fill(fd, start + offsets[i], i..j) {
                return Some(Err(e));
            }
            i = j;
        }
        out.clear();
        out.resize(offsets.len(), 0);
        self.data.clear();
        let mut back = out.len();
        for (i, &offset) in offsets.iter().enumerate() {
            if detect && (known_zero(i) || self.slots()[i].is_zero()) {
                back -= 1;
                out[back] = offset;
            } else {
                out[self.data.len()] = offset;
                self.data.push(i);
            }
        }
        out[back..].reverse();
        Some(Ok(self.data.len()))
    }

    /// Reads one stretch of the batch through the block's file, with one
    /// `pread`, into the start of the buffer: the pages from index `from`
    /// on whose offsets follow each other, at most `max` of them, stopping
    /// before a page known to be zero when `detect` is set (page `from`
    /// itself must not be one). Returns the stretch's length; its pages'
    /// bytes are then [`Staging::run_bytes`] and its runs
    /// [`Staging::runs`]. `None` (nothing read) unless the block is a
    /// shared mapping of a file this crate opened, whatever its page size.
    pub(crate) fn read_stretch(
        &mut self,
        batch: &PageBatch<'_>,
        from: usize,
        max: usize,
        detect: bool,
    ) -> Option<io::Result<usize>> {
        let (file, start) = batch.block().read_through_file()?;
        debug_assert!(!(detect && batch.is_known_zero(from)));
        let n = stretch_len(batch, from, max.max(1), detect);
        self.grow(n);
        Some(
            self.fill(file.as_raw_fd(), start + batch.offsets()[from], 0..n)
                .map(|()| n),
        )
    }

    /// The runs of data pages and of zero pages among the buffer's first
    /// `n` pages (the stretch [`Staging::read_stretch`] read), in order.
    /// With `detect` false every page is data.
    pub(crate) fn runs(&self, n: usize, detect: bool) -> impl Iterator<Item = StagedRun> + '_ {
        let pages = &self.slots()[..n];
        let is_zero = move |k: usize| detect && pages[k].is_zero();
        let mut k = 0;
        std::iter::from_fn(move || {
            if k == pages.len() {
                return None;
            }
            let zero = is_zero(k);
            let first = k;
            k += 1;
            while k < pages.len() && is_zero(k) == zero {
                k += 1;
            }
            Some(StagedRun {
                pages: first..k,
                zero,
            })
        })
    }

    /// The buffer's pages `pages`, one after the other, as one I/O vector
    /// to write (4096-byte aligned, as direct I/O wants).
    pub(crate) fn run_bytes(&self, pages: Range<usize>) -> IoSlice<'_> {
        IoSlice::new(OwnPage::bytes(&self.slots()[pages]))
    }

    /// Number of data pages of the last [`Staging::read`].
    pub(crate) fn data_len(&self) -> usize {
        self.data.len()
    }

    /// The data pages of the last [`Staging::read`], in order.
    pub(crate) fn data_pages(&self) -> impl Iterator<Item = &[u8; PAGE_SIZE]> + '_ {
        self.data.iter().map(|&i| &self.slots()[i].0)
    }

    /// The data pages of the last [`Staging::read`], in order, as I/O
    /// vectors to send.
    pub(crate) fn data_slices(&self) -> impl Iterator<Item = IoSlice<'_>> + '_ {
        self.data_pages().map(|p| IoSlice::new(p))
    }

    /// The buffer's pages.
    fn slots(&self) -> &[OwnPage] {
        match &self.pages {
            Store::Small(v) => v,
            Store::Huge(h) => h.pages(),
        }
    }

    /// The buffer's pages, to read into.
    fn slots_mut(&mut self) -> &mut [OwnPage] {
        match &mut self.pages {
            Store::Small(v) => v,
            Store::Huge(h) => h.pages_mut(),
        }
    }

    /// Makes room for at least `pages` pages (what they held is lost when
    /// huge pages are replaced by more).
    fn grow(&mut self, pages: usize) {
        match &mut self.pages {
            Store::Small(v) => {
                while v.len() < pages {
                    v.push(OwnPage([0; PAGE_SIZE]));
                }
            }
            Store::Huge(h) if h.len() < pages => *h = HugeOwnPages::new(pages),
            Store::Huge(_) => {}
        }
    }

    /// Reads the file `fd` from `at` into the buffer's pages `slots`.
    fn fill(&mut self, fd: RawFd, at: u64, slots: Range<usize>) -> io::Result<()> {
        let into = IoSliceMut::new(OwnPage::bytes_mut(&mut self.slots_mut()[slots]));
        sys::preadv_exact(fd, at, &mut [into])
    }
}

/// Length of the stretch of `batch` from index `from` (which is not
/// skipped): the pages whose offsets follow each other, at most `max`,
/// up to the first page known to be zero when `detect` is set.
fn stretch_len(batch: &PageBatch<'_>, from: usize, max: usize, detect: bool) -> usize {
    let offsets = batch.offsets();
    let mut j = from + 1;
    while j < offsets.len()
        && j - from < max
        && offsets[j] == offsets[j - 1] + PAGE_SIZE_U64
        && !(detect && batch.is_known_zero(j))
    {
        j += 1;
    }
    j - from
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::test_files::{pattern, sparse};
    use crate::ram::{Access, RamBlock};

    const P: u64 = PAGE_SIZE_U64;

    /// A 16-page RAM file whose even pages carry their pattern and odd
    /// pages are zero, opened as a block like `--ram` opens it.
    fn block(dir: &std::path::Path) -> RamBlock {
        let even: Vec<u64> = (0..16).step_by(2).collect();
        let path = sparse(dir, 16, &even, &[]);
        RamBlock::open_file("m0", &path, Access::ReadOnly, None).unwrap()
    }

    fn sent(staging: &Staging) -> Vec<Vec<u8>> {
        staging.data_pages().map(|s| s.to_vec()).collect()
    }

    #[test]
    fn reads_through_the_file_and_puts_zero_pages_last() {
        let dir = tempfile::tempdir().unwrap();
        let b = block(dir.path());
        // Out of order, with a run (2, 3, 4), a lone page and a page known
        // to be zero that is in fact data (so it must not be read).
        let mut batch = PageBatch::new(&b, 8);
        for p in [9, 2, 3, 4, 0] {
            batch.push(p * P).unwrap();
        }
        batch.push_known_zero(6 * P).unwrap();
        let mut staging = Staging::default();
        let mut out = Vec::new();
        let normal = staging.read(&batch, true, &mut out).unwrap().unwrap();
        assert_eq!(normal, 3);
        assert_eq!(out, [2 * P, 4 * P, 0, 9 * P, 3 * P, 6 * P]);
        let want: Vec<Vec<u8>> = [2, 4, 0].iter().map(|&p| pattern(p).to_vec()).collect();
        assert_eq!(sent(&staging), want);

        // Without detection every page is data, in the batch's order, and
        // the known-zero page is read as it is.
        let normal = staging.read(&batch, false, &mut out).unwrap().unwrap();
        assert_eq!(normal, 6);
        assert_eq!(out, [9 * P, 2 * P, 3 * P, 4 * P, 0, 6 * P]);
        let got = sent(&staging);
        assert_eq!(got[1], pattern(2).to_vec());
        assert_eq!(got[0], vec![0; PAGE_SIZE]);
        assert_eq!(got[5], pattern(6).to_vec());
    }

    #[test]
    fn a_stale_buffer_does_not_leak_into_a_later_batch() {
        let dir = tempfile::tempdir().unwrap();
        let b = block(dir.path());
        let mut staging = Staging::default();
        let mut out = Vec::new();
        let mut first = PageBatch::new(&b, 4);
        for p in [0, 2, 4, 6] {
            first.push(p * P).unwrap();
        }
        assert_eq!(staging.read(&first, true, &mut out).unwrap().unwrap(), 4);
        // The same slots now hold zero pages of the file: all zero, none sent.
        let mut second = PageBatch::new(&b, 4);
        for p in [1, 3, 5, 7] {
            second.push(p * P).unwrap();
        }
        assert_eq!(staging.read(&second, true, &mut out).unwrap().unwrap(), 0);
        assert_eq!(sent(&staging).len(), 0);
    }

    #[test]
    fn a_stretch_is_read_at_the_buffer_start_and_split_into_runs() {
        let dir = tempfile::tempdir().unwrap();
        let b = block(dir.path());
        let mut batch = PageBatch::new(&b, 8);
        for p in [0, 1, 2, 3] {
            batch.push(p * P).unwrap();
        }
        batch.push_known_zero(4 * P).unwrap();
        for p in [5, 6, 9] {
            batch.push(p * P).unwrap();
        }
        let run = |pages: Range<usize>, zero| StagedRun { pages, zero };
        for mut staging in [Staging::default(), Staging::in_huge_pages()] {
            // Stops before the page known to be zero.
            let n = staging.read_stretch(&batch, 0, 64, true).unwrap().unwrap();
            assert_eq!(n, 4);
            let runs: Vec<_> = staging.runs(n, true).collect();
            assert_eq!(
                runs,
                [
                    run(0..1, false),
                    run(1..2, true),
                    run(2..3, false),
                    run(3..4, true)
                ]
            );
            let bytes: Vec<Vec<u8>> = staging.slots()[2..3].iter().map(|p| p.0.to_vec()).collect();
            assert_eq!(bytes, [pattern(2).to_vec()]);
            // Without detection, one run of data; at most `max` pages.
            let n = staging.read_stretch(&batch, 0, 3, false).unwrap().unwrap();
            assert_eq!(n, 3);
            assert_eq!(
                staging.runs(n, false).collect::<Vec<_>>(),
                [run(0..3, false)]
            );
            // Stops where the offsets stop following each other (6, then 9),
            // and the page known to be zero is read like any other without
            // detection.
            let n = staging.read_stretch(&batch, 4, 64, false).unwrap().unwrap();
            assert_eq!(n, 3);
            let n = staging.read_stretch(&batch, 5, 64, true).unwrap().unwrap();
            assert_eq!(n, 2);
            assert_eq!(
                staging.runs(n, true).collect::<Vec<_>>(),
                [run(0..1, true), run(1..2, false)]
            );
            let n = staging.read_stretch(&batch, 7, 64, true).unwrap().unwrap();
            assert_eq!(n, 1);
            assert_eq!(staging.runs(n, true).collect::<Vec<_>>(), [run(0..1, true)]);
        }
    }

    #[test]
    fn staged_pages_are_aligned_for_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let b = block(dir.path());
        let mut batch = PageBatch::new(&b, 16);
        for p in 0..16 {
            batch.push(p * P).unwrap();
        }
        for mut staging in [Staging::default(), Staging::in_huge_pages()] {
            let n = staging.read_stretch(&batch, 0, 16, true).unwrap().unwrap();
            assert_eq!(n, 16);
            for page in &staging.slots()[0..n] {
                assert!(page.0.as_ptr().addr().is_multiple_of(4096));
            }
            assert_eq!(staging.run_bytes(0..n).len(), n * PAGE_SIZE);
        }
    }

    #[test]
    fn only_shared_file_mappings_of_4k_pages_apply() {
        let anon = RamBlock::anonymous("m0", 4 * P).unwrap();
        let mut batch = PageBatch::new(&anon, 1);
        batch.push(0).unwrap();
        assert!(
            Staging::default()
                .read(&batch, true, &mut Vec::new())
                .is_none()
        );
    }

    #[test]
    fn a_file_cut_short_under_the_block_is_an_error_not_a_fault() {
        let dir = tempfile::tempdir().unwrap();
        let b = block(dir.path());
        let mut batch = PageBatch::new(&b, 2);
        batch.push(14 * P).unwrap();
        batch.push(15 * P).unwrap();
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("ram"))
            .unwrap()
            .set_len(15 * P)
            .unwrap();
        let err = Staging::default()
            .read(&batch, true, &mut Vec::new())
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
