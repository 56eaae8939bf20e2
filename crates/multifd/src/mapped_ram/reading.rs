//! How a restore reads a mapped-ram file's pages: with `O_DIRECT`, or
//! through the page cache, and whether what it read stays cached.
//!
//! A file that is not in the page cache is read once: through the cache it
//! would be read into the cache, copied out and dropped again, and on the
//! disk here the buffered reads of 4 threads left the device idle for much
//! of a restore (see docs/performance.md). So a cold file is read with
//! `O_DIRECT` where its file system allows it. A file that is mostly
//! cached already (a warm image kept for fast boots, or one just written
//! through the cache) is read from the cache and left there.

use std::fs::File;
use std::os::fd::AsRawFd;

use multifd_wire::PAGE_SIZE_U64;

use super::file;
use super::read::FileImage;
use super::{FileOptions, FileUri};
use crate::error::{Error, Result};
use crate::ram::RamBlock;
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

/// Most pages one `mincore` looks at: 64 Ki pages, 256 MiB of the file
/// (a 64 KiB vector).
const WINDOW_PAGES: u64 = 1 << 16;

/// Chooses how `image` (the file of `uri`) is read and opens `channels`
/// descriptors for it:
/// * `direct_io` asked for: `O_DIRECT` (a file system that refuses it is
///   [`Error::DirectIoUnsupported`]).
/// * At least half of the present pages in the page cache (or none
///   present): [`Reading::CachedKept`].
/// * Otherwise, with `direct_when_cold`: `O_DIRECT` where the file system
///   takes it, else [`Reading::CachedDropped`].
pub(super) fn open(
    uri: &FileUri,
    image: &FileImage,
    opts: &FileOptions,
    channels: u8,
) -> Result<(Reading, Vec<File>)> {
    let open_all = |direct: bool| {
        (0..channels)
            .map(|_| file::open_channel(&uri.path, false, direct))
            .collect::<Result<Vec<File>>>()
    };
    if opts.direct_io {
        return Ok((Reading::Direct, open_all(true)?));
    }
    let probe = file::open_channel(&uri.path, false, false)?;
    let warm = match present_pages_cached(&probe, image) {
        Ok((cached, present)) => {
            tracing::debug!(cached, present, "present pages of {uri} in the page cache");
            present == 0 || cached >= present.div_ceil(2)
        }
        // A file that cannot be mapped (some FUSE file systems) counts as
        // cold: nothing tells otherwise.
        Err(e) => {
            tracing::debug!("cannot look into the page cache of {uri}: {e}");
            false
        }
    };
    let reading = if warm {
        Reading::CachedKept
    } else if opts.direct_when_cold {
        match file::open_channel(&uri.path, false, true) {
            Ok(f) if direct_read_works(&f, uri, image)? => Reading::Direct,
            Ok(_) | Err(Error::DirectIoUnsupported { .. }) => Reading::CachedDropped,
            Err(e) => return Err(e),
        }
    } else {
        Reading::CachedDropped
    };
    tracing::debug!(?reading, "reading the pages of {uri}");
    Ok((reading, open_all(reading.direct())?))
}

/// Whether a direct read of the first present page through `file` (an
/// `O_DIRECT` descriptor) works: some file systems take the flag and
/// refuse the reads (`EINVAL`).
fn direct_read_works(file: &File, uri: &FileUri, image: &FileImage) -> Result<bool> {
    let first = image.layouts.iter().enumerate().find_map(|(i, layout)| {
        let run = image.bitmap(i).runs().next()?;
        Some(layout.pages_offset() + run.start * PAGE_SIZE_U64)
    });
    let Some(at) = first else {
        return Ok(true);
    };
    // Page-aligned, as `O_DIRECT` needs.
    let page = RamBlock::anonymous("probe", PAGE_SIZE_U64)?;
    let mut iov = [page.page_run(0, 1)?.io_slice_mut()?];
    match sys::preadv_exact(file.as_raw_fd(), at, &mut iov) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(Error::io(
            format!("reading a page of {uri} with O_DIRECT"),
            e,
        )),
    }
}

/// How many of the present pages of `image` are in the page cache, and
/// how many there are, looked at through `file`.
fn present_pages_cached(file: &File, image: &FileImage) -> std::io::Result<(u64, u64)> {
    let (mut cached, mut present) = (0u64, 0u64);
    let mut window = Vec::new();
    for (i, layout) in image.layouts.iter().enumerate() {
        // The window held in `window`: its first page and its pages.
        let mut held = 0..0u64;
        for run in image.bitmap(i).runs() {
            present += run.end - run.start;
            let mut page = run.start;
            while page < run.end {
                if !held.contains(&page) {
                    let end = (page + WINDOW_PAGES).min(layout.num_pages());
                    window.resize((end - page) as usize, 0);
                    let at = layout.pages_offset() + page * PAGE_SIZE_U64;
                    sys::residency(file.as_raw_fd(), at, &mut window)?;
                    held = page..end;
                }
                let upto = run.end.min(held.end);
                let from = (page - held.start) as usize;
                let to = (upto - held.start) as usize;
                cached += window[from..to].iter().map(|&b| u64::from(b)).sum::<u64>();
                page = upto;
            }
        }
    }
    Ok((cached, present))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapped_ram::read_file;
    use crate::mapped_ram::restore::{RestoreOptions, load_pages};
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
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target");
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
        let image = read_file(uri, 1 << 20).unwrap();
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
        let image = read_file(uri, 1 << 20).unwrap();
        let f = File::open(&uri.path).unwrap();
        let mut v = vec![0u8; PAGES as usize];
        sys::residency(f.as_raw_fd(), image.layouts[0].pages_offset(), &mut v).unwrap();
        v.iter().filter(|&&b| b != 0).count()
    }

    #[test]
    fn a_cold_file_is_read_directly_and_a_warm_one_from_the_cache() {
        let (_dir, uri, ram) = saved_on_disk();
        let image = read_file(&uri, 1 << 20).unwrap();
        let direct_taken = file::open_channel(&uri.path, false, true)
            .is_ok_and(|f| direct_read_works(&f, &uri, &image).unwrap());
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

    #[test]
    fn the_cached_share_counts_present_pages_only() {
        let (_dir, uri, _ram) = saved_on_disk();
        let image = read_file(&uri, 1 << 20).unwrap();
        let present = image.present_pages(0);
        assert_eq!(
            present,
            PAGES - (0..PAGES).filter(|&p| page_byte(p) == 0).count() as u64
        );
        let f = File::open(&uri.path).unwrap();
        make_cold(&uri);
        assert_eq!(present_pages_cached(&f, &image).unwrap(), (0, present));
        std::fs::read(&uri.path).unwrap();
        assert_eq!(
            present_pages_cached(&f, &image).unwrap(),
            (present, present)
        );
    }
}
