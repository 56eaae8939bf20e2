//! How a restore reads a mapped-ram file's pages: with `O_DIRECT`, or
//! through the page cache, and whether what it read stays cached.
//!
//! A file that is not in the page cache is read once: through the cache it
//! would be read into the cache, copied out and dropped again, and on the
//! disk here the buffered reads of 4 threads left the device idle for much
//! of a restore (see docs/performance.md). So a cold file is read with
//! `O_DIRECT` where its file system allows it. A file that is mostly
//! cached already (a warm image kept for fast boots, or one QEMU has just
//! written through the cache; our own saves drop what they wrote) is read
//! from the cache and left there.

use std::fs::File;
use std::os::fd::AsRawFd;

use multifd_wire::PAGE_SIZE_U64;

use super::file;
use super::read::FileImage;
use super::{FileOptions, FileUri};
use crate::error::{Error, Result};
use crate::ram::{self, RamBlock};
use crate::transport::sys;

/// How the pages regions are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reading {
    /// With `O_DIRECT`: asked for, or the file was not cached.
    Direct,
    /// Through the page cache, and left there: the file was cached.
    CachedKept,
    /// Through the page cache, each stretch dropped once read: the file
    /// was not cached, and `O_DIRECT` was refused or not wanted.
    CachedDropped,
}

impl Reading {
    /// Whether the descriptors are `O_DIRECT`.
    pub(super) fn direct(self) -> bool {
        self == Reading::Direct
    }

    /// Whether each stretch is dropped from the page cache once read.
    pub(super) fn drops(self) -> bool {
        self == Reading::CachedDropped
    }
}

/// Pages of one sample of a block's pages region: 2 MiB.
const SAMPLE_PAGES: u64 = 512;

/// Most samples looked at per block: at most 128 Ki pages (512 MiB of the
/// file). `mincore` costs about 55 ns a page here: over every page of a 4
/// GiB file it took 59 ms, a tenth of a restore from /dev/shm.
const MAX_SAMPLES: u64 = 256;

/// Chooses how `image` (the file of `uri`) is read and opens `channels`
/// descriptors for it:
/// * `direct_io` asked for: `O_DIRECT` (a file system that refuses it is
///   [`Error::DirectIoUnsupported`]).
/// * On tmpfs, or at least half of the present pages in the page cache
///   (sampled; or none present): [`Reading::CachedKept`].
/// * Otherwise, with `direct_when_cold`: `O_DIRECT` where the file system
///   takes it, else [`Reading::CachedDropped`].
pub(super) fn open(
    uri: &FileUri,
    image: &FileImage,
    opts: &FileOptions,
    channels: u8,
) -> Result<(Reading, Vec<File>)> {
    let (reading, first) = choose(uri, image, opts)?;
    tracing::debug!(?reading, "reading the pages of {uri}");
    // The descriptor the choice was made with is the first channel's.
    let files = std::iter::once(Ok(first))
        .chain(
            (1..channels)
                .map(|_| file::open_channel(&uri.path, false, reading.direct(), image.id())),
        )
        .take(usize::from(channels))
        .collect::<Result<Vec<File>>>()?;
    Ok((reading, files))
}

/// How the file is read (see [`open`]), and one descriptor of it opened
/// that way.
fn choose(uri: &FileUri, image: &FileImage, opts: &FileOptions) -> Result<(Reading, File)> {
    if opts.direct_io {
        return Ok((
            Reading::Direct,
            file::open_channel(&uri.path, false, true, image.id())?,
        ));
    }
    let probe = file::open_channel(&uri.path, false, false, image.id())?;
    let warm = if ram::is_tmpfs(&probe) {
        // Its page cache is the file.
        true
    } else if !sys::residency_visible(&probe, &uri.path) {
        // `mincore` would call every page cached: nothing tells.
        tracing::debug!("the page cache of {uri} is not visible to this process");
        false
    } else {
        match sampled_pages_cached(&probe, image, SAMPLE_PAGES, MAX_SAMPLES) {
            Ok((cached, present)) => {
                tracing::debug!(cached, present, "sampled present pages of {uri} cached");
                present == 0 || cached >= present.div_ceil(2)
            }
            // A file that cannot be mapped (some FUSE file systems) counts
            // as cold: nothing tells otherwise.
            Err(e) => {
                tracing::debug!("cannot look into the page cache of {uri}: {e}");
                false
            }
        }
    };
    if warm {
        return Ok((Reading::CachedKept, probe));
    }
    if opts.direct_when_cold
        && let Some(direct) = direct_reader(uri, image)
    {
        return Ok((Reading::Direct, direct));
    }
    Ok((Reading::CachedDropped, probe))
}

/// An `O_DIRECT` descriptor of the file of `uri`, where it takes the
/// direct reads of a restore: its file system allows `O_DIRECT` with
/// buffers and offsets aligned to 4 KiB (where `statx` tells), and a
/// direct read of the first present page works (some file systems take
/// the flag and refuse the reads). Direct reads were not asked for, so any
/// failure here only means `None`.
fn direct_reader(uri: &FileUri, image: &FileImage) -> Option<File> {
    let f = match file::open_channel(&uri.path, false, true, image.id()) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!("no direct reads of {uri}: {e}");
            return None;
        }
    };
    if let Some((mem, offset)) = sys::direct_io_alignment(f.as_raw_fd()) {
        let fits = |a: u32| a != 0 && 4096 % a == 0;
        if !fits(mem) || !fits(offset) {
            tracing::debug!(mem, offset, "no direct reads of {uri}: alignment");
            return None;
        }
    }
    let first = image.layouts().iter().enumerate().find_map(|(i, layout)| {
        let run = image.bitmap(i).runs().next()?;
        Some(layout.pages_offset() + run.start * PAGE_SIZE_U64)
    });
    let Some(at) = first else {
        return Some(f);
    };
    // Page-aligned, as `O_DIRECT` needs.
    let read = RamBlock::anonymous("probe", PAGE_SIZE_U64).and_then(|page| {
        let mut iov = [page.page_run(0, 1)?.io_slice_mut()?];
        sys::preadv_exact(f.as_raw_fd(), at, &mut iov).map_err(|e| Error::io("a direct read", e))
    });
    match read {
        Ok(()) => Some(f),
        Err(e) => {
            tracing::debug!("no direct reads of {uri}: {e}");
            None
        }
    }
}

/// How many present pages of the samples of `image` are in the page
/// cache, and how many present pages the samples hold, looked at through
/// `file`. The samples are runs of `sample` pages spread evenly over each
/// block, at most `max_samples` of them per block (all of the block where
/// that covers it).
fn sampled_pages_cached(
    file: &File,
    image: &FileImage,
    sample: u64,
    max_samples: u64,
) -> std::io::Result<(u64, u64)> {
    let (mut cached, mut present) = (0u64, 0u64);
    let mut residency = Vec::new();
    for (i, layout) in image.layouts().iter().enumerate() {
        let pages = layout.num_pages();
        let bitmap = image.bitmap(i);
        let stride = pages.div_ceil(max_samples.max(1)).max(sample);
        let mut start = 0;
        while start < pages {
            let end = (start + sample).min(pages);
            let mut looked = false;
            for p in start..end {
                if bitmap.get(p) != Some(true) {
                    continue;
                }
                if !looked {
                    residency.resize((end - start) as usize, 0);
                    let at = layout.pages_offset() + start * PAGE_SIZE_U64;
                    sys::residency(file.as_raw_fd(), at, &mut residency)?;
                    looked = true;
                }
                present += 1;
                cached += u64::from(residency[(p - start) as usize]);
            }
            start += stride;
        }
    }
    Ok((cached, present))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapped_ram::restore::{RestoreOptions, load_pages};
    use crate::mapped_ram::{ReadLimits, read_file};
    use crate::ram::{Access, GuestRam, RamBlock};
    use crate::source::{SourceOptions, StaticRam};
    use crate::stats::Progress;

    /// Pages of the image: runs of data between runs of zero pages.
    const PAGES: u64 = 2048;

    fn page_byte(p: u64) -> u8 {
        if p % 7 < 2 { 0 } else { (p % 251) as u8 + 1 }
    }

    /// A mapped-ram file of one block saved on the disk's file system
    /// (the build's own directory: tmpfs pages are always cached), and
    /// the RAM it holds.
    fn saved_on_disk() -> (tempfile::TempDir, FileUri, GuestRam) {
        saved_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target"))
    }

    /// [`saved_on_disk`], in directory `base`.
    fn saved_in(base: &str) -> (tempfile::TempDir, FileUri, GuestRam) {
        std::fs::create_dir_all(base).unwrap();
        let dir = tempfile::tempdir_in(base).unwrap();
        let image = dir.path().join("image");
        let bytes: Vec<u8> = (0..PAGES)
            .flat_map(|p| std::iter::repeat_n(page_byte(p), 4096))
            .collect();
        std::fs::write(&image, bytes).unwrap();
        let mut ram = GuestRam::new();
        ram.push(RamBlock::open_file("m0", &image, Access::ReadOnly, None).unwrap())
            .unwrap();
        let uri = FileUri {
            path: dir.path().join("f.mr"),
            offset: 0,
        };
        crate::mapped_ram::save(
            &uri,
            &ram,
            &mut StaticRam,
            &SourceOptions::default(),
            &FileOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        (dir, uri, ram)
    }

    /// Takes the whole file out of the page cache.
    fn make_cold(uri: &FileUri) {
        let f = File::open(&uri.path).unwrap();
        f.sync_all().unwrap();
        sys::drop_cached(f.as_raw_fd(), 0, f.metadata().unwrap().len()).unwrap();
    }

    /// Restores the file into fresh anonymous memory with `opts` and
    /// checks every page; returns how it was read.
    fn restore_checked(uri: &FileUri, ram: &GuestRam, opts: FileOptions) -> Reading {
        let image = read_file(uri, &ReadLimits::default()).unwrap();
        let (reading, _) = open(uri, &image, &opts, 2).unwrap();
        let mut out = GuestRam::new();
        out.push(RamBlock::anonymous("m0", PAGES * 4096).unwrap())
            .unwrap();
        let ropts = RestoreOptions {
            channels: 2,
            file: opts,
            ..RestoreOptions::default()
        };
        load_pages(uri, &image, &out, &[0], &ropts, &Progress::default()).unwrap();
        let (mut want, mut got) = ([0u8; 4096], [0u8; 4096]);
        for p in 0..PAGES {
            ram.blocks()[0].read_page(p * 4096, &mut want).unwrap();
            out.blocks()[0].read_page(p * 4096, &mut got).unwrap();
            assert!(want == got, "page {p} read {reading:?}");
        }
        reading
    }

    /// Cached pages of the file's pages region.
    fn cached(uri: &FileUri) -> usize {
        let image = read_file(uri, &ReadLimits::default()).unwrap();
        let f = File::open(&uri.path).unwrap();
        let mut v = vec![0u8; PAGES as usize];
        sys::residency(f.as_raw_fd(), image.layouts()[0].pages_offset(), &mut v).unwrap();
        v.iter().filter(|&&b| b != 0).count()
    }

    #[test]
    fn a_cold_file_is_read_directly_and_a_warm_one_from_the_cache() {
        let (_dir, uri, ram) = saved_on_disk();
        let image = read_file(&uri, &ReadLimits::default()).unwrap();
        let direct_taken = direct_reader(&uri, &image).is_some();
        let cold = if direct_taken {
            Reading::Direct
        } else {
            Reading::CachedDropped
        };

        make_cold(&uri);
        assert_eq!(restore_checked(&uri, &ram, FileOptions::default()), cold);
        assert_eq!(cached(&uri), 0, "a cold file is not cached by a restore");

        make_cold(&uri);
        let buffered = FileOptions {
            direct_when_cold: false,
            ..FileOptions::default()
        };
        assert_eq!(
            restore_checked(&uri, &ram, buffered),
            Reading::CachedDropped
        );
        assert_eq!(cached(&uri), 0, "what was read is dropped");

        // Warm: read through the cache, as a boot from it would.
        std::fs::read(&uri.path).unwrap();
        assert_eq!(
            restore_checked(&uri, &ram, FileOptions::default()),
            Reading::CachedKept
        );
        assert_eq!(cached(&uri), PAGES as usize, "a warm file stays warm");

        if direct_taken {
            let direct = FileOptions {
                direct_io: true,
                ..FileOptions::default()
            };
            assert_eq!(restore_checked(&uri, &ram, direct), Reading::Direct);
        }
    }

    /// Whether `f` was opened with `O_DIRECT` (its `flags:` line in
    /// `/proc/self/fdinfo`, octal).
    fn is_direct(f: &File) -> bool {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| i64::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        flags & i64::from(libc::O_DIRECT) != 0
    }

    /// A file renamed over the checked one before its pages are read (a
    /// copy: same layout, same length) is refused whichever way it would
    /// be read, and no page is written: its pages need not match the
    /// layouts and bitmaps that were checked.
    #[test]
    fn a_file_replaced_after_it_was_checked_is_refused() {
        let (dir, uri, _ram) = saved_on_disk();
        let image = read_file(&uri, &ReadLimits::default()).unwrap();
        let copy = dir.path().join("copy.mr");
        std::fs::copy(&uri.path, &copy).unwrap();
        std::fs::rename(&copy, &uri.path).unwrap();
        for direct_io in [false, true] {
            let opts = FileOptions {
                direct_io,
                ..FileOptions::default()
            };
            let e = open(&uri, &image, &opts, 2).unwrap_err();
            assert!(matches!(e, Error::FileReplaced { .. }), "{e:?}");
            let mut out = GuestRam::new();
            out.push(RamBlock::anonymous("m0", PAGES * 4096).unwrap())
                .unwrap();
            out.blocks()[0].write_page(0, &[0x77; 4096]).unwrap();
            let ropts = RestoreOptions {
                channels: 2,
                file: opts,
                ..RestoreOptions::default()
            };
            let e = load_pages(&uri, &image, &out, &[0], &ropts, &Progress::default()).unwrap_err();
            assert!(matches!(e, Error::FileReplaced { .. }), "{e:?}");
            let mut page = [0u8; 4096];
            out.blocks()[0].read_page(0, &mut page).unwrap();
            assert_eq!(page, [0x77; 4096], "direct_io {direct_io}");
        }
        // Read again, the file at the path now is the one read.
        let image = read_file(&uri, &ReadLimits::default()).unwrap();
        assert_eq!(
            open(&uri, &image, &FileOptions::default(), 2)
                .unwrap()
                .1
                .len(),
            2
        );
    }

    #[test]
    fn every_channel_gets_a_descriptor_opened_the_chosen_way() {
        let (_dir, uri, _ram) = saved_on_disk();
        let image = read_file(&uri, &ReadLimits::default()).unwrap();
        for warm in [false, true] {
            make_cold(&uri);
            if warm {
                std::fs::read(&uri.path).unwrap();
            }
            for channels in [1u8, 3] {
                let (reading, files) =
                    open(&uri, &image, &FileOptions::default(), channels).unwrap();
                assert_eq!(files.len(), usize::from(channels));
                assert_eq!(warm, reading == Reading::CachedKept);
                for f in &files {
                    assert_eq!(is_direct(f), reading.direct(), "{reading:?}");
                }
            }
        }
        if direct_reader(&uri, &image).is_some() {
            let asked = FileOptions {
                direct_io: true,
                ..FileOptions::default()
            };
            let (reading, files) = open(&uri, &image, &asked, 3).unwrap();
            assert_eq!(reading, Reading::Direct);
            assert_eq!(files.len(), 3);
            assert!(files.iter().all(is_direct));
        }
    }

    #[test]
    fn a_file_on_tmpfs_is_read_from_its_pages() {
        let (_dir, uri, ram) = saved_in("/dev/shm");
        make_cold(&uri); // changes nothing on tmpfs
        assert_eq!(
            restore_checked(&uri, &ram, FileOptions::default()),
            Reading::CachedKept
        );
    }

    #[test]
    fn the_cached_share_counts_present_pages_only() {
        let (_dir, uri, _ram) = saved_on_disk();
        let image = read_file(&uri, &ReadLimits::default()).unwrap();
        let present = image.present_pages(0);
        assert_eq!(
            present,
            PAGES - (0..PAGES).filter(|&p| page_byte(p) == 0).count() as u64
        );
        let f = File::open(&uri.path).unwrap();
        let fd = f.as_raw_fd();
        let region = image.layouts()[0].pages_offset();
        // All read in, then dropped from the first 2 MiB boundary of the
        // file past the region's first 1024 pages on (whole folios: the
        // page cache may hold a file in naturally aligned folios of up to
        // 2 MiB, and one only partly in a dropped range stays).
        std::fs::read(&uri.path).unwrap();
        let boundary = (region + 1024 * 4096).next_multiple_of(2 << 20);
        sys::drop_cached(fd, boundary, 0).unwrap(); // 0: to the end
        let kept = (boundary - region) / 4096;
        let in_half = (0..kept).filter(|&p| page_byte(p) != 0).count() as u64;
        // Samples covering the block, of every size: one page, odd ones
        // that runs cross, the whole block and more.
        for sample in [1, 7, 100, 1000, PAGES, SAMPLE_PAGES, 1 << 16] {
            assert_eq!(
                sampled_pages_cached(&f, &image, sample, u64::MAX).unwrap(),
                (in_half, present),
                "samples of {sample}"
            );
        }
        // Four samples of 100 pages, 512 apart: the first ones cached,
        // the last not.
        let (cached, sampled) = sampled_pages_cached(&f, &image, 100, 4).unwrap();
        assert!(sampled < present / 4, "{sampled} of {present}");
        assert!(0 < cached && cached < sampled, "{cached} of {sampled}");
        make_cold(&uri);
        let (cached, sampled) = sampled_pages_cached(&f, &image, 100, 4).unwrap();
        assert!(cached == 0 && sampled > 0);
        std::fs::read(&uri.path).unwrap();
        assert_eq!(
            sampled_pages_cached(&f, &image, 100, 4).unwrap(),
            (sampled, sampled)
        );
    }
}
