//! Write-behind for buffered saves to a file system with a page cache of
//! its own (not tmpfs): each channel starts writeback of the ranges it has
//! just written, and once a few more are under way waits for the oldest
//! and drops its pages from the page cache.
//!
//! Left to itself the kernel starts writeback only once a tenth of memory
//! is dirty, then throttles the writers to whatever its flusher manages;
//! the save's pages also stay in the page cache, which a save of guest RAM
//! never reads again and which the next allocation must reclaim. Started
//! here, each channel keeps its own few ranges in flight from the first
//! batch on.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::RawFd;

use crate::transport::sys::{self, RangeSync};

/// Ranges each channel keeps in writeback before it waits for the oldest:
/// with batches of 4 MiB, 32 MiB per channel.
pub(super) const IN_FLIGHT: usize = 8;

/// The ranges one channel has written and not yet seen on the device.
#[derive(Debug)]
pub(super) struct WriteBehind {
    fd: RawFd,
    in_flight: VecDeque<Range<u64>>,
    depth: usize,
}

impl WriteBehind {
    /// Write-behind on the file `fd` (which must stay open while this
    /// lives), keeping at most `depth` ranges in writeback.
    pub(super) fn new(fd: RawFd, depth: usize) -> Self {
        Self {
            fd,
            in_flight: VecDeque::with_capacity(depth + 1),
            depth: depth.max(1),
        }
    }

    /// `range` of the file has just been written: starts its writeback,
    /// and waits for the oldest ranges beyond the depth and drops them
    /// from the page cache.
    pub(super) fn written(&mut self, range: Range<u64>) -> std::io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        sys::sync_range(
            self.fd,
            range.start,
            range.end - range.start,
            RangeSync::Start,
        )?;
        self.in_flight.push_back(range);
        while self.in_flight.len() > self.depth {
            if let Some(old) = self.in_flight.pop_front() {
                self.settle(old)?;
            }
        }
        Ok(())
    }

    /// Waits for every range still in writeback and drops it from the
    /// page cache.
    pub(super) fn finish(&mut self) -> std::io::Result<()> {
        while let Some(old) = self.in_flight.pop_front() {
            self.settle(old)?;
        }
        Ok(())
    }

    fn settle(&self, range: Range<u64>) -> std::io::Result<()> {
        let len = range.end - range.start;
        sys::sync_range(self.fd, range.start, len, RangeSync::Wait)?;
        // Advice only; a failure loses nothing.
        let _ = sys::drop_cached(self.fd, range.start, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::sys::{cached_pages, disk_file};
    use std::os::fd::AsRawFd;

    /// Ranges beyond the depth are on the device and out of the page
    /// cache as soon as the next is written; `finish` settles the rest;
    /// the file reads back as written.
    #[test]
    fn ranges_beyond_the_depth_are_written_back_and_dropped() {
        // Four ranges of 2 MiB (the page cache may hold a file in folios
        // of up to 2 MiB, and a folio only partly in a range stays).
        let range = |i: u64| i * (2 << 20)..(i + 1) * (2 << 20);
        let (_dir, file) = disk_file(2048);
        let mut behind = WriteBehind::new(file.as_raw_fd(), 1);
        for i in 0..4u64 {
            let data = vec![i as u8 + 1; 2 << 20];
            sys::pwritev_all(
                file.as_raw_fd(),
                range(i).start,
                &mut [crate::transport::iov::IoSlice::new(&data)],
            )
            .unwrap();
            behind.written(range(i)).unwrap();
        }
        // Ranges 0..3 settled; range 3 may still be cached.
        assert_eq!(cached_pages(&file, 1536), 0, "settled ranges are dropped");
        assert!(
            cached_pages(&file, 2048) > 0,
            "the last range is still in flight"
        );
        behind.finish().unwrap();
        assert_eq!(cached_pages(&file, 2048), 0, "finish settles every range");
        behind.written(0..0).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        sys::preadv_exact(
            file.as_raw_fd(),
            0,
            &mut [crate::transport::iov::IoSliceMut::new(&mut buf)],
        )
        .unwrap();
        for (i, chunk) in buf.chunks(2 << 20).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8 + 1), "range {i}");
        }
    }

    #[test]
    fn a_bad_descriptor_is_an_error() {
        let mut behind = WriteBehind::new(-1, 1);
        assert!(behind.written(0..4096).is_err());
    }
}
