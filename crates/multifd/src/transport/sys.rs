//! The raw system calls behind vectored socket I/O and accept-with-timeout.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::activity::Activity;
use super::iov::{IoSlice, IoSliceMut, Vector};

/// Most iovecs one `writev`/`readv` takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Index of the first vector with bytes left after `n` bytes moved; that
/// vector is advanced past the bytes of it that moved.
fn drop_done<V: Vector>(iovs: &mut [V], mut n: usize) -> usize {
    let mut first = 0;
    while first < iovs.len() && n >= iovs[first].raw().iov_len {
        n -= iovs[first].raw().iov_len;
        first += 1;
    }
    if first < iovs.len() {
        iovs[first].advance(n);
    }
    first
}

/// Moves every byte of `iovs` with `writev` (an [`IoSlice`]) or `readv` (an
/// [`IoSliceMut`]), retrying on partial transfers and EINTR. Returns
/// `Ok(false)` if the call returned 0 before the first byte (for reads: the
/// peer closed cleanly), and `UnexpectedEof` / `WriteZero` if that happened
/// in the middle.
fn transfer_all<V: Vector>(fd: RawFd, mut iovs: &mut [V], activity: &Activity) -> io::Result<bool> {
    let mut raw: Vec<libc::iovec> = Vec::with_capacity(iovs.len().min(IOV_MAX));
    let mut moved_any = false;
    loop {
        // Empty vectors need no system call: it would return 0, which reads
        // as EOF (a compressed packet of zero pages has an empty payload).
        let first = drop_done(iovs, 0);
        iovs = &mut iovs[first..];
        if iovs.is_empty() {
            return Ok(true);
        }
        raw.clear();
        raw.extend(iovs.iter().take(IOV_MAX).map(V::raw));
        let count = raw.len() as libc::c_int;
        // SAFETY:
        // - `raw` holds `count` iovecs, each over memory its vector keeps
        //   mapped for at least this call (the vectors borrow it);
        // - `V::KERNEL_READS` is true only for `IoSlice`, made from readable
        //   memory, and `writev` only reads through the vectors; it is false
        //   only for `IoSliceMut`, made from exclusively borrowed buffers or
        //   writable guest memory no reference points into, and `readv`
        //   writes at most `iov_len` bytes into each.
        let n = activity.waiting(|| unsafe {
            if V::KERNEL_READS {
                libc::writev(fd, raw.as_ptr(), count)
            } else {
                libc::readv(fd, raw.as_ptr(), count)
            }
        });
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return match (V::KERNEL_READS, moved_any) {
                (false, false) => Ok(false),
                (false, true) => Err(io::ErrorKind::UnexpectedEof.into()),
                (true, _) => Err(io::ErrorKind::WriteZero.into()),
            };
        }
        moved_any = true;
        activity.moved(n as usize);
        let first = drop_done(iovs, n as usize);
        iovs = &mut iovs[first..];
    }
}

/// Writes every byte of `iovs` to `fd`.
pub(super) fn writev_all(
    fd: RawFd,
    iovs: &mut [IoSlice<'_>],
    activity: &Activity,
) -> io::Result<()> {
    transfer_all(fd, iovs, activity).map(drop)
}

/// Fills every byte of `iovs` from `fd`. Returns `Ok(false)` when the peer
/// closed the connection before the first byte (a clean end), and an
/// `UnexpectedEof` error when it closed in the middle.
pub(super) fn readv_exact(
    fd: RawFd,
    iovs: &mut [IoSliceMut<'_>],
    activity: &Activity,
) -> io::Result<bool> {
    transfer_all(fd, iovs, activity)
}

/// Moves every byte of `iovs` between memory and the file `fd` at file
/// offset `offset` with `pwritev` (an [`IoSlice`]: the file is written) or
/// `preadv` (an [`IoSliceMut`]: memory is written), retrying on partial
/// transfers and EINTR. Does not use or move the descriptor's file offset,
/// so threads may share nothing but the file. A read that reaches the end
/// of the file before the vectors are full is `UnexpectedEof`; a write
/// that moves nothing is `WriteZero`.
fn transfer_at<V: Vector>(fd: RawFd, offset: u64, mut iovs: &mut [V]) -> io::Result<()> {
    let mut raw: Vec<libc::iovec> = Vec::with_capacity(iovs.len().min(IOV_MAX));
    let mut at = offset;
    loop {
        let first = drop_done(iovs, 0);
        iovs = &mut iovs[first..];
        if iovs.is_empty() {
            return Ok(());
        }
        raw.clear();
        raw.extend(iovs.iter().take(IOV_MAX).map(V::raw));
        let count = raw.len() as libc::c_int;
        let pos = libc::off_t::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY:
        // - `raw` holds `count` iovecs, each over memory its vector keeps
        //   mapped for at least this call (the vectors borrow it);
        // - `V::KERNEL_READS` is true only for `IoSlice`, made from readable
        //   memory, and `pwritev` only reads through the vectors; it is
        //   false only for `IoSliceMut`, made from exclusively borrowed
        //   buffers or writable guest memory no reference points into, and
        //   `preadv` writes at most `iov_len` bytes into each;
        // - the offset is explicit: no shared descriptor state is used.
        let n = unsafe {
            if V::KERNEL_READS {
                libc::pwritev(fd, raw.as_ptr(), count, pos)
            } else {
                libc::preadv(fd, raw.as_ptr(), count, pos)
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(if V::KERNEL_READS {
                io::ErrorKind::WriteZero.into()
            } else {
                io::ErrorKind::UnexpectedEof.into()
            });
        }
        at += n as u64;
        let first = drop_done(iovs, n as usize);
        iovs = &mut iovs[first..];
    }
}

/// Writes every byte of `iovs` to the file `fd` at `offset` (`pwritev`).
pub(crate) fn pwritev_all(fd: RawFd, offset: u64, iovs: &mut [IoSlice<'_>]) -> io::Result<()> {
    transfer_at(fd, offset, iovs)
}

/// Fills every byte of `iovs` from the file `fd` at `offset` (`preadv`);
/// `UnexpectedEof` when the file ends first.
pub(crate) fn preadv_exact(fd: RawFd, offset: u64, iovs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
    transfer_at(fd, offset, iovs)
}

/// Tells the kernel that the cached pages of the file `fd` in
/// `offset..offset + len` will not be read again (`POSIX_FADV_DONTNEED`):
/// clean ones are dropped from the page cache at once. Advice only: file
/// systems without a page cache of their own (tmpfs) ignore it.
pub(crate) fn drop_cached(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    advise(fd, offset, len, libc::POSIX_FADV_DONTNEED)
}

/// Tells the kernel that `offset..offset + len` of the file `fd` will be
/// read soon (`POSIX_FADV_WILLNEED`): it starts reading those pages into
/// the page cache and returns. Advice only.
pub(crate) fn will_read(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    advise(fd, offset, len, libc::POSIX_FADV_WILLNEED)
}

/// `posix_fadvise(fd, offset, len, advice)`.
fn advise(fd: RawFd, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    let (offset, len) = file_range(offset, len)?;
    // SAFETY: posix_fadvise only reads its integer arguments; a descriptor
    // that is not an open file is an error (EBADF), not undefined behaviour.
    match unsafe { libc::posix_fadvise(fd, offset, len, advice) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// `offset` and `len` as the kernel's file offsets; `InvalidInput` past
/// what they can hold.
fn file_range(offset: u64, len: u64) -> io::Result<(libc::off_t, libc::off_t)> {
    match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        (Ok(offset), Ok(len)) => Ok((offset, len)),
        _ => Err(io::ErrorKind::InvalidInput.into()),
    }
}

/// How [`sync_range`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeSync {
    /// Starts writeback of the range's dirty pages and returns: waits only
    /// while the device's request queue is full.
    Start,
    /// Starts writeback and waits until every page of the range that was
    /// dirty when called is on the device.
    Wait,
}

/// `sync_file_range` on `offset..offset + len` of the file `fd`: the
/// range's dirty pages are written back (see [`RangeSync`]). It writes no
/// metadata and flushes no device cache: a way to pace writeback, not to
/// make data durable.
pub(crate) fn sync_range(fd: RawFd, offset: u64, len: u64, how: RangeSync) -> io::Result<()> {
    let (offset, len) = file_range(offset, len)?;
    let flags = match how {
        RangeSync::Start => libc::SYNC_FILE_RANGE_WRITE,
        RangeSync::Wait => {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        }
    };
    loop {
        // SAFETY: sync_file_range only reads its integer arguments; a
        // descriptor that is not an open file is an error (EBADF), not
        // undefined behaviour.
        if unsafe { libc::sync_file_range(fd, offset, len, flags) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What [`poll_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Readiness {
    /// `fd` is readable (or has a pending connection).
    Ready,
    /// The time ran out.
    Timeout,
    /// `wake` became readable first.
    Woken,
}

/// Waits until `fd` is readable, at most `timeout` (forever when `None`),
/// or until `wake` (if any) is readable.
pub(super) fn poll_readable(
    fd: RawFd,
    wake: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    poll_one(fd, libc::POLLIN, wake, timeout)
}

/// Waits until `fd` is writable (a non-blocking connect finished, well or
/// not), at most `timeout`, or until `wake` (if any) is readable.
pub(super) fn poll_writable(
    fd: RawFd,
    wake: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    poll_one(fd, libc::POLLOUT, wake, timeout)
}

/// Milliseconds for `poll`, rounded up (a wait of 0.3 ms must not become a
/// busy poll of 0 ms); -1 (forever) for `None`.
fn poll_ms(timeout: Option<Duration>) -> libc::c_int {
    timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
    })
}

/// `poll(2)` over `pfds`, retried when a signal interrupts it; the number
/// of entries with events (0 on timeout).
fn poll_fds(pfds: &mut [libc::pollfd], ms: libc::c_int) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: `pfds` is a valid, exclusively borrowed array of
        // `pfds.len()` pollfd entries, which the kernel writes `revents` of.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    wake: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    let mut pfds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let count = if wake.is_some() { 2 } else { 1 };
    let rc = poll_fds(&mut pfds[..count], poll_ms(timeout))?;
    Ok(if rc == 0 {
        Readiness::Timeout
    } else if wake.is_some() && pfds[1].revents != 0 {
        Readiness::Woken
    } else {
        Readiness::Ready
    })
}

/// Waits until any of `fds` is readable (or hung up), at most `timeout`
/// (forever when `None`); returns which are.
pub(crate) fn poll_readable_set(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    poll_fds(&mut pfds, poll_ms(timeout))?;
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Waits until one of `watch` shows that its peer hung up, reset, or sent
/// bytes (`POLLRDHUP`, `POLLHUP`, `POLLERR`, `POLLIN`), or until one of
/// `wake` is readable. Returns the index into `watch`, or `None` if woken.
pub(crate) fn wait_peer_event(watch: &[RawFd], wake: &[RawFd]) -> io::Result<Option<usize>> {
    wait_watched(watch, libc::POLLIN | libc::POLLRDHUP, wake)
}

/// Waits until one of `watch` shows that its peer hung up or reset
/// (`POLLRDHUP`, `POLLHUP`, `POLLERR`; bytes it sent do not count), or until
/// one of `wake` is readable. Returns the index into `watch`, or `None` if
/// woken.
pub(crate) fn wait_hangup(watch: &[RawFd], wake: &[RawFd]) -> io::Result<Option<usize>> {
    wait_watched(watch, libc::POLLRDHUP, wake)
}

/// Waits, without a timeout, until one of `watch` has one of `events` (or
/// `POLLHUP` / `POLLERR`, which poll always reports) or one of `wake` is
/// readable; the index into `watch`, or `None` if woken.
fn wait_watched(
    watch: &[RawFd],
    events: libc::c_short,
    wake: &[RawFd],
) -> io::Result<Option<usize>> {
    let mut pfds: Vec<libc::pollfd> = watch
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .chain(wake.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }))
        .collect();
    poll_fds(&mut pfds, -1)?;
    if pfds[watch.len()..].iter().any(|p| p.revents != 0) {
        return Ok(None);
    }
    Ok(pfds[..watch.len()].iter().position(|p| p.revents != 0))
}

/// Which pages of the file `fd` from `offset` (page-aligned) on are in
/// the page cache: byte `i` of `out` is set to 1 if page `i` is, 0 if not
/// (`mincore` over a fresh read-only mapping of that range, which reads
/// nothing and faults nothing in; pages past the end of the file are not
/// cached).
pub(crate) fn residency(fd: RawFd, offset: u64, out: &mut [u8]) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    // SAFETY: sysconf only reads system configuration.
    if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != 4096 {
        // `mincore` counts host pages; `out` counts 4 KiB ones.
        return Err(io::ErrorKind::Unsupported.into());
    }
    let len = out
        .len()
        .checked_mul(4096)
        .ok_or(io::ErrorKind::InvalidInput)?;
    let (offset, _) = file_range(offset, len as u64)?;
    // SAFETY: a new shared read-only mapping of `len` bytes of a file the
    // caller holds open; nothing reads through it, and it is unmapped
    // below. A bad descriptor or offset is an error (MAP_FAILED).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p..p + len` is the mapping made above; `out` has one byte
    // per page of it.
    let r = unsafe { libc::mincore(p, len, out.as_mut_ptr()) };
    let e = io::Error::last_os_error();
    // SAFETY: the mapping made above, used by nothing else and no longer.
    unsafe { libc::munmap(p, len) };
    if r != 0 {
        return Err(e);
    }
    for b in out.iter_mut() {
        *b &= 1;
    }
    Ok(())
}

/// Whether [`residency`] tells this process the truth about `file` (at
/// `path`): since Linux 5.2 `mincore` reports every page of a file
/// mapping as cached unless the caller owns the file, may write it, or
/// has `CAP_FOWNER` (taken here to be root).
pub(crate) fn residency_visible(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    match file.metadata() {
        Ok(_) if euid == 0 => return true,
        Ok(m) if m.uid() == euid => return true,
        Ok(_) => {}
        Err(_) => return false,
    }
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call,
    // which only reads it.
    unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
}

/// The alignment `O_DIRECT` needs of the file `fd` (`statx` with
/// `STATX_DIOALIGN`): of memory buffers, and of file offsets and lengths,
/// in bytes; 0 where the file does not take direct I/O. `None` where the
/// kernel or the file system does not tell.
pub(crate) fn direct_io_alignment(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH names `fd`
    // itself; `stx` is a valid statx the call fills and outlives it.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

#[cfg(test)]
/// How many of `file`'s first `pages` pages are in the page cache.
pub(crate) fn cached_pages(file: &std::fs::File, pages: usize) -> usize {
    let mut vec = vec![0u8; pages];
    residency(std::os::fd::AsRawFd::as_raw_fd(file), 0, &mut vec).unwrap();
    vec.iter().filter(|&&b| b != 0).count()
}

#[cfg(test)]
/// A file on the disk's file system (the build's own directory):
/// tmpfs pages are the file itself and are never written back or
/// dropped.
pub(crate) fn disk_file(pages: usize) -> (tempfile::TempDir, std::fs::File) {
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target");
    std::fs::create_dir_all(base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![7u8; pages * 4096]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (dir, file)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn positioned_vectored_io_round_trips_and_reports_a_short_file() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let (a, b) = (vec![1u8; 5000], vec![2u8; 3000]);
        pwritev_all(fd, 100, &mut [IoSlice::new(&a), IoSlice::new(&b)]).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8100);
        let (mut x, mut y) = (vec![0u8; 4600], vec![0u8; 3100]);
        preadv_exact(
            fd,
            400,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        )
        .unwrap();
        assert!(x.iter().all(|&v| v == 1));
        assert!(y[..100].iter().all(|&v| v == 1) && y[100..].iter().all(|&v| v == 2));
        // The descriptor's own offset was never used.
        let mut z = vec![0u8; 16];
        let e = preadv_exact(fd, 8090, &mut [IoSliceMut::new(&mut z)]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn residency_tells_cached_pages_from_the_rest() {
        // 4 MiB read in, then its second half dropped (whole 2 MiB
        // folios: the page cache may hold a file in folios of up to 2 MiB,
        // and one only partly in the range stays).
        let (_dir, file) = disk_file(1024);
        let fd = file.as_raw_fd();
        file.sync_all().unwrap();
        let mut buf = vec![0u8; 1024 * 4096];
        preadv_exact(fd, 0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        drop_cached(fd, 512 * 4096, 512 * 4096).unwrap();
        let mut out = vec![7u8; 768];
        residency(fd, 256 * 4096, &mut out).unwrap();
        assert!(out[..256].iter().all(|&b| b == 1), "before the drop");
        assert!(out[256..].iter().all(|&b| b == 0), "dropped");
        // Past the end of the file: not cached, and no fault.
        let mut past = vec![7u8; 16];
        residency(fd, 1020 * 4096, &mut past).unwrap();
        assert_eq!(past, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        residency(fd, 0, &mut []).unwrap();
        assert!(residency(-1, 0, &mut [0u8; 1]).is_err());
        assert!(residency(fd, 100, &mut [0u8; 1]).is_err(), "unaligned");
    }

    #[test]
    fn the_owner_sees_residency_and_the_disk_tells_its_direct_io_alignment() {
        let (dir, file) = disk_file(1);
        assert!(residency_visible(&file, &dir.path().join("f")));
        // ext4 (the build's own directory) tells, on kernels since 6.1.
        if let Some((mem, offset)) = direct_io_alignment(file.as_raw_fd()) {
            assert!(mem.is_power_of_two() && offset.is_power_of_two());
            assert!(mem <= 4096 && offset <= 4096, "{mem} {offset}");
        }
        assert_eq!(direct_io_alignment(-1), None);
    }

    #[test]
    fn dropping_cached_pages_empties_the_range_and_nothing_else() {
        // 4 MiB, the first 2 MiB dropped: the page cache may hold a file
        // in folios of up to 2 MiB, and a folio only partly in the range
        // stays.
        let (_dir, file) = disk_file(1024);
        file.sync_all().unwrap();
        let mut buf = vec![0u8; 1024 * 4096];
        preadv_exact(file.as_raw_fd(), 0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(cached_pages(&file, 1024), 1024);
        drop_cached(file.as_raw_fd(), 0, 512 * 4096).unwrap();
        assert_eq!(cached_pages(&file, 512), 0, "the range is dropped");
        assert_eq!(cached_pages(&file, 1024), 512, "the rest stays");
        assert!(drop_cached(-1, 0, 4096).is_err());
    }

    #[test]
    fn a_range_synced_and_waited_for_can_be_dropped() {
        // 4 MiB just written, dirty; the first 2 MiB (see above on
        // folios) synced and waited for.
        let (_dir, file) = disk_file(1024);
        let fd = file.as_raw_fd();
        sync_range(fd, 0, 512 * 4096, RangeSync::Start).unwrap();
        sync_range(fd, 0, 512 * 4096, RangeSync::Wait).unwrap();
        // Only clean pages are dropped: the range is clean now.
        drop_cached(fd, 0, 512 * 4096).unwrap();
        assert_eq!(cached_pages(&file, 512), 0, "the range is on the device");
        assert_eq!(cached_pages(&file, 1024), 512, "the rest stays");
        let mut buf = vec![0u8; 1024 * 4096];
        preadv_exact(fd, 0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert!(sync_range(-1, 0, 4096, RangeSync::Start).is_err());
        assert!(sync_range(fd, u64::MAX, 4096, RangeSync::Wait).is_err());
    }

    #[test]
    fn a_range_to_be_read_is_read_into_the_cache() {
        let (_dir, file) = disk_file(1024);
        let fd = file.as_raw_fd();
        file.sync_all().unwrap();
        drop_cached(fd, 0, 1024 * 4096).unwrap();
        assert_eq!(cached_pages(&file, 1024), 0);
        will_read(fd, 0, 512 * 4096).unwrap();
        // The reads are under way when it returns; a page counts once it
        // has been read (`mincore` counts up-to-date pages only).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cached_pages(&file, 512) < 512 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(cached_pages(&file, 512), 512, "the range is read");
        assert_eq!(cached_pages(&file, 1024), 512, "and nothing past it");
        assert!(will_read(-1, 0, 4096).is_err());
    }
}
