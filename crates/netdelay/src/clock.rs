//! Time for the link model: nanoseconds on CLOCK_MONOTONIC, and waiting for
//! a file descriptor with nanosecond timeouts.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Nanoseconds since the clock was made, on CLOCK_MONOTONIC (what
/// [`Instant`] reads on Linux).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// Nanoseconds since [`Clock::new`].
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Asks the kernel to fire this thread's timers on time: the default slack
/// of 50 us would add up to 50 us to every wait, the whole one-way delay of
/// a 10 Gbit/s, 0.1 ms link. Returns whether it was accepted.
pub fn precise_timers() -> bool {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only changes the
    // calling thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) == 0 }
}

/// Waits until `fd` is readable or `timeout` has passed (ppoll, nanosecond
/// resolution). Returns whether it is readable; an interruption by a signal
/// counts as a timeout.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd and a valid timespec, both live for the call;
    // a null signal mask keeps the thread's own.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(std::io::Error::other(format!(
            "poll revents {:#x}",
            pfd.revents
        )));
    }
    Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
}
