//! Accepting and classifying the N+1 connections of a migration
//! (QEMU's `migration_ioc_process_incoming()`).
//!
//! Connections may arrive in any order. Each must identify itself within
//! the handshake timeout by its first 4 bytes: `QEVM` opens the main
//! stream, the multifd magic opens a 64-byte initial packet whose UUID and
//! channel id are checked. Reading the bytes (instead of peeking) works the
//! same on every transport; the main channel's 4 bytes are handed on.

use std::time::{Duration, Instant};

use multifd_wire::WireError;
use multifd_wire::packet::{INIT_PACKET_SIZE, InitPacket, MULTIFD_MAGIC};
use multifd_wire::stream::QEVM_MAGIC;

use crate::config::{MigrationConfig, format_uuid};
use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::Abort;
use crate::transport::{Connection, Listener};

/// The classified connections of one migration.
pub(super) struct Accepted {
    pub(super) main: Connection,
    /// The 4 bytes already read from the main channel.
    pub(super) main_head: [u8; 4],
    /// Multifd channels indexed by id.
    pub(super) channels: Vec<Connection>,
}

fn read_handshake(
    conn: &mut Connection,
    buf: &mut [u8],
    timeout: Duration,
    who: Endpoint,
) -> Result<()> {
    match conn.read_exact_or_eof(buf) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::PeerClosed {
            endpoint: who,
            when: "before identifying itself",
        }),
        Err(e) => Err(Error::from_read(
            e,
            who,
            "in the middle of its handshake",
            |_| Error::HandshakeTimeout {
                endpoint: who,
                timeout_ms: timeout.as_millis() as u64,
            },
        )),
    }
}

/// Accepts until the main channel and all N multifd channels are there.
/// The first connection may take `first_timeout` (forever when `None`);
/// the rest must follow within the handshake timeout.
pub(super) fn accept_all(
    listener: &Listener,
    cfg: &MigrationConfig,
    first_timeout: Option<Duration>,
    abort: &Abort<'_>,
) -> Result<Accepted> {
    let n = usize::from(cfg.channels);
    let hs = cfg.handshake_timeout;
    let mut main: Option<(Connection, [u8; 4])> = None;
    let mut channels: Vec<Option<Connection>> = (0..n).map(|_| None).collect();
    let mut have = 0usize;
    let mut deadline: Option<Instant> = None;
    while main.is_none() || have < n {
        let wait = match deadline {
            None => first_timeout,
            Some(d) => Some(d.saturating_duration_since(Instant::now())),
        };
        let Some(mut conn) = listener.accept_or_wake(wait, abort.wake_fd())? else {
            if deadline.is_some() && main.is_some() && have < n {
                let missing: Vec<String> = channels
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_none())
                    .map(|(id, _)| id.to_string())
                    .collect();
                return Err(Error::Mismatch(format!(
                    "only {have} of {n} multifd channels connected within {} ms \
                     (missing ids {}): is multifd-channels the same on both sides?",
                    hs.as_millis(),
                    missing.join(",")
                )));
            }
            return Err(Error::HandshakeTimeout {
                endpoint: if main.is_none() {
                    Endpoint::Main
                } else {
                    Endpoint::Unclassified
                },
                timeout_ms: wait.unwrap_or_default().as_millis() as u64,
            });
        };
        abort.register_socket(&conn)?;
        deadline.get_or_insert_with(|| Instant::now() + hs);
        conn.set_read_timeout(Some(hs))
            .map_err(|e| Error::io("setting handshake timeout", e))?;
        let mut head = [0u8; 4];
        read_handshake(&mut conn, &mut head, hs, Endpoint::Unclassified)?;
        let magic = u32::from_be_bytes(head);
        if magic == QEVM_MAGIC {
            if main.is_some() {
                return Err(Error::Unsupported("a second main channel".into()));
            }
            conn.set_read_timeout(None)
                .map_err(|e| Error::io("clearing handshake timeout", e))?;
            main = Some((conn, head));
            continue;
        }
        if magic != MULTIFD_MAGIC {
            return Err(Error::wire(
                Endpoint::Unclassified,
                WireError::BadMagic {
                    what: "first bytes of a connection",
                    found: magic,
                    expected: MULTIFD_MAGIC,
                },
            ));
        }
        let mut init = [0u8; INIT_PACKET_SIZE];
        init[..4].copy_from_slice(&head);
        read_handshake(&mut conn, &mut init[4..], hs, Endpoint::Unclassified).map_err(
            |e| match e {
                // It did identify itself (multifd magic), then closed.
                Error::PeerClosed { endpoint, .. } => Error::PeerClosed {
                    endpoint,
                    when: "in the middle of its handshake",
                },
                e => e,
            },
        )?;
        let pkt = InitPacket::decode(&init).map_err(|e| Error::wire(Endpoint::Unclassified, e))?;
        if pkt.uuid != cfg.uuid {
            return Err(Error::UuidMismatch {
                id: pkt.id,
                received: format_uuid(&pkt.uuid),
                expected: format_uuid(&cfg.uuid),
            });
        }
        let id = usize::from(pkt.id);
        if id >= n {
            return Err(Error::BadChannelId {
                id: pkt.id,
                reason: "not below the configured channel count (different multifd-channels?)",
            });
        }
        if channels[id].is_some() {
            return Err(Error::BadChannelId {
                id: pkt.id,
                reason: "already connected",
            });
        }
        conn.set_read_timeout(None)
            .map_err(|e| Error::io("clearing handshake timeout", e))?;
        channels[id] = Some(conn);
        have += 1;
        tracing::debug!(channel = id, "multifd channel connected");
    }
    let (main, main_head) = main.expect("loop ends with main present");
    Ok(Accepted {
        main,
        main_head,
        channels: channels
            .into_iter()
            .map(|c| c.expect("all present"))
            .collect(),
    })
}
