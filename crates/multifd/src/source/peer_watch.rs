//! The peer watch of a sending migration.
//!
//! A destination sends nothing on its connections (there is no return
//! path), so a hang-up, reset or data means it gave up on that connection,
//! for example after a channel error. A QEMU destination then shuts its
//! sockets down but keeps them open with a zero window, which would leave a
//! writer blocked forever. The watch shuts our side of that socket down: a
//! write still pending on it fails at once (and aborts the migration),
//! while a channel that has nothing more to send is not disturbed. Sockets
//! whose writer already finished are left out.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::lifecycle::Abort;

/// Writes to the watch's stop pipe when dropped, so the watch ends on
/// every way out of the scope that runs it.
pub(super) struct StopOnDrop(pub(super) std::io::PipeWriter);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::io::Write::write_all(&mut self.0, &[1]);
    }
}

/// Watches the sockets registered with `abort` (`done[i]`: socket `i`'s
/// writer finished) until every one is done or gone, `stop` is readable,
/// or the migration aborts.
pub(super) fn watch_peer(abort: &Abort<'_>, done: &[AtomicBool], stop: &std::io::PipeReader) {
    use std::os::fd::AsRawFd;
    let fds = abort.socket_fds();
    let mut wake = vec![stop.as_raw_fd()];
    wake.extend(abort.wake_fd().map(|w| w.as_raw_fd()));
    let mut gone = vec![false; fds.len()];
    loop {
        let active: Vec<usize> = (0..fds.len().min(done.len()))
            .filter(|&i| !gone[i] && !done[i].load(Ordering::Acquire))
            .collect();
        if active.is_empty() {
            return;
        }
        let watch: Vec<_> = active.iter().map(|&i| fds[i]).collect();
        match crate::transport::sys::wait_peer_event(&watch, &wake) {
            Ok(None) | Err(_) => return,
            Ok(Some(k)) => {
                let i = active[k];
                gone[i] = true;
                if !done[i].load(Ordering::Acquire) {
                    tracing::debug!(socket = i, "destination hung up; shutting the socket down");
                    abort.shutdown_socket(i);
                }
            }
        }
    }
}
