//! A scripted peer: a source that connects to a receiver and writes
//! hand-made bytes, then closes or holds each connection, and reports
//! whether the receiver closed the ones it held.

use std::thread::JoinHandle;
use std::time::Duration;

use multifd::Uri;

use super::{Sock, spawn};

/// How a scripted connection ends after its bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Close at once (the peer dies right after these bytes).
    Close,
    /// Keep the connection open, silent, until the receiver closes it.
    Hold,
}

/// One connection of a scripted peer: bytes written first (before any
/// other connection's `body`), bytes written after all connections are up,
/// and how it ends.
#[derive(Debug, Clone)]
pub struct Conn {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    pub end: End,
}

impl Conn {
    pub fn new(head: Vec<u8>, body: Vec<u8>, end: End) -> Self {
        Self { head, body, end }
    }
}

/// What a scripted peer observed.
#[derive(Debug)]
pub struct PeerReport {
    /// Every held connection saw the receiver close it.
    pub all_closed_by_receiver: bool,
}

/// Runs a scripted peer on a helper thread: connects each connection in
/// order and writes its head, then writes the bodies in order, then closes
/// or holds each as scripted. Write errors (the receiver gave up) end the
/// writing quietly.
pub fn scripted_peer(uri: Uri, conns: Vec<Conn>) -> JoinHandle<PeerReport> {
    spawn("peer", move || {
        let mut socks = Vec::new();
        for c in &conns {
            let s = match Sock::connect(&uri) {
                Ok(s) => s,
                Err(_) => break,
            };
            let _ = s.write_all(&c.head);
            if c.end == End::Close && c.body.is_empty() {
                drop(s);
                continue;
            }
            socks.push((s, c));
        }
        let mut held = Vec::new();
        for (s, c) in socks {
            let _ = s.write_all(&c.body);
            match c.end {
                End::Close => drop(s),
                End::Hold => held.push(s),
            }
        }
        let mut all = true;
        for s in &held {
            all &= s.wait_closed(Duration::from_secs(10));
        }
        PeerReport {
            all_closed_by_receiver: all,
        }
    })
}
