//! Drives the receiver's whole state machine: one input becomes a main
//! stream and the streams of 1 to 3 multifd channels, written over real
//! Unix socket connections to `multifd::receive`. Whatever the bytes, the
//! receiver must return (no hang: a bound of 10 s per input, far above the
//! timeouts it is given), must not panic, and must fail, if it fails, with
//! an error that names a cause (never `Panicked`, `Internal` or a bare
//! `Aborted`).
//!
//! Input: one flags byte (bits 0-1: channels - 1, capped at 3; bits 2-3:
//! compression none/zlib/zstd; bit 4: per-section flushing), then for the
//! main stream and each channel but the last a little-endian u16 length and
//! that many bytes; the rest of the input is the last channel's stream. A
//! channel's stream starts with its initial packet, like any other bytes.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use multifd::{
    Compression, Error, FlushMode, GuestRam, Listener, MethodConfig, MigrationConfig, Progress,
    RamBlock, RamBlockInfo, RamProvider, ReceiveOptions, Uri,
};

/// Fresh anonymous RAM for whatever blocks the stream announces (within
/// the receiver's RAM limit).
struct Anon;

impl RamProvider for Anon {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
        }
        Ok(ram)
    }
}

/// Splits the input into the configuration and the connections' bytes.
fn split(data: &[u8]) -> Option<(u8, Vec<&[u8]>)> {
    let (&flags, mut rest) = data.split_first()?;
    let channels = (flags & 3).min(2) + 1;
    let mut parts = Vec::new();
    for _ in 0..channels {
        let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let body = rest.get(2..2 + len)?;
        parts.push(body);
        rest = &rest[2 + len..];
    }
    parts.push(rest);
    Some((flags, parts))
}

fuzz_target!(|data: &[u8]| {
    let Some((flags, parts)) = split(data) else {
        return;
    };
    let channels = parts.len() as u8 - 1;
    let compression = match (flags >> 2) & 3 {
        1 => Compression::Zlib,
        2 => Compression::Zstd,
        _ => Compression::None,
    };
    let opts = ReceiveOptions {
        config: MigrationConfig {
            channels,
            method: MethodConfig {
                compression,
                ..MethodConfig::default()
            },
            flush_mode: if flags & 0x10 != 0 {
                FlushMode::PerSection
            } else {
                FlushMode::PerRound
            },
            handshake_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(500),
            ..MigrationConfig::default()
        },
        accept_timeout: Some(Duration::from_secs(2)),
        max_ram: 64 << 20,
        max_tail: 1 << 20,
        ..ReceiveOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = Uri::Unix(dir.path().join("r.sock"));
    let listener = Listener::bind(&uri).expect("bind");
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let opts = &opts;
        let receiver = s.spawn(move || {
            let r = multifd::receive(&listener, opts, &mut Anon, &Progress::default());
            // Connections still queued are refused once the listener is
            // gone, so their writers end too.
            drop(listener);
            let _ = tx.send(r.map(|_| ()));
        });
        // One writer per connection, in order (main first), each closing
        // its connection when its bytes are out (or the receiver gave up).
        let Uri::Unix(path) = &uri else { unreachable!() };
        let mut writers = Vec::new();
        for part in &parts {
            let Ok(mut conn) = UnixStream::connect(path) else {
                break;
            };
            writers.push(s.spawn(move || {
                let _ = conn.write_all(part);
            }));
        }
        let outcome = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the receiver did not return within 10 s");
        if let Err(e) = outcome {
            assert!(
                !matches!(e, Error::Panicked(_) | Error::Internal(_) | Error::Aborted),
                "untyped failure: {e:?}"
            );
        }
        // Joined explicitly, so every thread has exited (not only finished
        // its work) before the next input: the leak checker looks then.
        for w in writers {
            let _ = w.join();
        }
        let _ = receiver.join();
    });
});
