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

use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::Abort;
use crate::transport::Connection;

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

/// Runs `setup` (connecting the multifd channels) while a thread watches
/// the main connection: a destination that hangs up on it meanwhile fails
/// the migration at once, through `abort`, which also ends a channel's
/// connect or TLS handshake in progress. Without it, a destination that
/// refused us on the main channel after our side of the handshake was done
/// (a TLS 1.3 server checks the client's certificate after the client
/// finished) left the next channel's handshake waiting for its timeout
/// (found by the `reject-anon-client` stress: 5 s instead of milliseconds).
///
/// The watch holds the main connection meanwhile (nothing else reads it
/// during setup), so a TLS refusal is named from the alert the destination
/// sent before hanging up. Bytes alone do not count (a TLS server may send
/// session tickets), only a hang-up or reset; a refusal still waiting
/// unread when setup ends is named then.
pub(super) fn while_main_is_up<T>(
    main: &mut Connection,
    abort: &Abort<'_>,
    setup: impl FnOnce() -> Result<T>,
) -> Result<T> {
    use std::os::fd::AsRawFd;
    let (stop_r, stop_w) =
        std::io::pipe().map_err(|e| Error::io("creating the setup-watch pipe", e))?;
    let out = std::thread::scope(|s| {
        let watched = &mut *main;
        let watch = std::thread::Builder::new()
            .name("multifd-setup-watch".into())
            .spawn_scoped(s, move || {
                let mut wake = vec![stop_r.as_raw_fd()];
                wake.extend(abort.wake_fd().map(|w| w.as_raw_fd()));
                let fd = watched.as_raw_fd();
                if let Ok(Some(_)) = crate::transport::sys::wait_hangup(&[fd], &wake) {
                    let error = watched
                        .peer_refusal(Endpoint::Main)
                        .unwrap_or(Error::PeerClosed {
                            endpoint: Endpoint::Main,
                            when: "while the multifd channels were set up (the destination \
                                   refused or dropped the migration)",
                        });
                    abort.fail(error);
                }
            })
            .map_err(|e| Error::io("spawning the setup watch", e))?;
        let out = setup();
        // Closing the pipe's write end makes its read end readable.
        drop(stop_w);
        let _ = watch.join();
        out
    });
    // A refusal on the main channel is the cause even when the setup
    // failed first: a destination that refused our certificate on the
    // main channel and then gave up ends the next channel's handshake
    // with a close or reset, often before the watch has read the alert.
    match main.peer_refusal(Endpoint::Main) {
        Some(refused) => Err(refused),
        None => out,
    }
}
