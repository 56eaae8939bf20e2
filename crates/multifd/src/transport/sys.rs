//! The raw system calls behind vectored socket I/O and accept-with-timeout.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::ram::IoVec;

/// Most iovecs one `writev`/`readv` takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

fn drop_done(iovs: &mut [IoVec<'_>], mut n: usize) -> usize {
    let mut first = 0;
    while first < iovs.len() && n >= iovs[first].len() {
        n -= iovs[first].len();
        first += 1;
    }
    if first < iovs.len() {
        iovs[first].advance(n);
    }
    first
}

/// Writes every byte of `iovs` to `fd`, retrying on partial writes and EINTR.
pub(super) fn writev_all(fd: RawFd, mut iovs: &mut [IoVec<'_>]) -> io::Result<()> {
    let mut raw: Vec<libc::iovec> = Vec::with_capacity(iovs.len().min(IOV_MAX));
    loop {
        // Empty vectors need no system call (writev would return 0).
        let first = drop_done(iovs, 0);
        iovs = &mut iovs[first..];
        if iovs.is_empty() {
            break;
        }
        raw.clear();
        raw.extend(iovs.iter().take(IOV_MAX).map(IoVec::raw));
        // SAFETY:
        // - `raw` holds `raw.len()` valid iovecs; each points at memory that
        //   its IoVec keeps valid for at least this call;
        // - writev only reads through them.
        let n = unsafe { libc::writev(fd, raw.as_ptr(), raw.len() as libc::c_int) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let first = drop_done(iovs, n as usize);
        iovs = &mut iovs[first..];
    }
    Ok(())
}

/// Fills every byte of `iovs` from `fd`. Returns `Ok(false)` when the peer
/// closed the connection before the first byte (a clean end), and an
/// `UnexpectedEof` error when it closed in the middle.
pub(super) fn readv_exact(fd: RawFd, mut iovs: &mut [IoVec<'_>]) -> io::Result<bool> {
    let mut raw: Vec<libc::iovec> = Vec::with_capacity(iovs.len().min(IOV_MAX));
    let mut got_any = false;
    loop {
        // Empty vectors need no system call: readv would return 0, which
        // reads as EOF (a compressed packet of zero pages only has an empty
        // payload).
        let first = drop_done(iovs, 0);
        iovs = &mut iovs[first..];
        if iovs.is_empty() {
            break;
        }
        raw.clear();
        raw.extend(iovs.iter().take(IOV_MAX).map(IoVec::raw));
        // SAFETY:
        // - `raw` holds valid iovecs over memory that each IoVec keeps valid
        //   and writable for at least this call (guest pages of a writable
        //   mapping, or exclusively borrowed buffers);
        // - readv writes at most `iov_len` bytes into each.
        let n = unsafe { libc::readv(fd, raw.as_ptr(), raw.len() as libc::c_int) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return if got_any {
                Err(io::ErrorKind::UnexpectedEof.into())
            } else {
                Ok(false)
            };
        }
        got_any = true;
        let first = drop_done(iovs, n as usize);
        iovs = &mut iovs[first..];
    }
    Ok(true)
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
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    let mut pfds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let count = if wake.is_some() { 2 } else { 1 };
    loop {
        // SAFETY: `pfds` holds `count` (1 or 2) valid pollfd entries.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(if rc == 0 {
            Readiness::Timeout
        } else if pfds[1].revents != 0 && wake.is_some() {
            Readiness::Woken
        } else {
            Readiness::Ready
        });
    }
}

/// Waits until one of `watch` shows that its peer hung up, reset, or sent
/// bytes (`POLLRDHUP`, `POLLHUP`, `POLLERR`, `POLLIN`), or until one of
/// `wake` is readable. Returns the index into `watch`, or `None` if woken.
pub(crate) fn wait_peer_event(watch: &[RawFd], wake: &[RawFd]) -> io::Result<Option<usize>> {
    let mut pfds: Vec<libc::pollfd> = watch
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .chain(wake.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }))
        .collect();
    loop {
        // SAFETY: `pfds` holds `pfds.len()` valid pollfd entries.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if pfds[watch.len()..].iter().any(|p| p.revents != 0) {
            return Ok(None);
        }
        return Ok(pfds[..watch.len()].iter().position(|p| p.revents != 0));
    }
}
