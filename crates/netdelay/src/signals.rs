//! SIGINT and SIGTERM as events: blocked in every thread, taken by the main
//! thread with a bounded wait.

use std::time::Duration;

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds
    // valid signal numbers to that initialised set.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGTERM);
        s
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and in the threads it
/// spawns afterwards, so that only [`wait`] sees them.
pub fn block() -> std::io::Result<()> {
    let s = set();
    // SAFETY: a valid, initialised set; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits up to `timeout` for a blocked SIGINT or SIGTERM; returns the signal
/// taken, if any.
pub fn wait(timeout: Duration) -> Option<i32> {
    let s = set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: a valid set and timespec, live for the call; no siginfo asked.
    let sig = unsafe { libc::sigtimedwait(&s, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}
