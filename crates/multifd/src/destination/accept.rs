//! Accepting and classifying the N+1 connections of a migration
//! (QEMU's `migration_ioc_process_incoming()`).
//!
//! Connections may arrive in any order. Each must identify itself within
//! the handshake timeout by its first 4 bytes: `QEVM` opens the main
//! stream, the multifd magic opens a 64-byte initial packet whose UUID and
//! channel id are checked. Reading the bytes (instead of peeking) works the
//! same on every transport, TLS included; the main channel's 4 bytes are
//! handed on.
//!
//! Each connection is identified on a thread of its own (its TLS handshake
//! included), so one that is slow to speak does not hold up the others: a
//! source writes nothing on its main channel until every channel is up,
//! and over TLS a channel cannot even connect until its handshake is
//! served. At most N+1 connections are accepted before all are known
//! (over TLS twice that: a source with more channels than ours waits for
//! the handshake of its extra ones before it writes its main stream, so
//! they must be served to be found out); whatever queues up behind them
//! is the stray guard's.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use multifd_wire::WireError;
use multifd_wire::packet::{INIT_PACKET_SIZE, InitPacket, MULTIFD_MAGIC};
use multifd_wire::stream::QEVM_MAGIC;

use crate::config::{MigrationConfig, format_uuid};
use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::{self, Abort};
use crate::transport::{Connection, Listener, TlsServer, sys};

/// The classified connections of one migration.
pub(super) struct Accepted {
    pub(super) main: Connection,
    /// The 4 bytes already read from the main channel.
    pub(super) main_head: [u8; 4],
    /// Multifd channels indexed by id.
    pub(super) channels: Vec<Connection>,
}

/// What a connection said it is.
enum Identified {
    Main(Connection, [u8; 4]),
    Channel(u8, Connection),
}

/// What identifying a connection needs.
struct Rules<'a> {
    cfg: &'a MigrationConfig,
    tls: Option<&'a TlsServer>,
    clean_tls_termination: bool,
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

/// Runs a new connection's TLS handshake (if any) and reads what it is,
/// within the handshake timeout.
fn identify(mut conn: Connection, rules: &Rules<'_>) -> Result<Identified> {
    let hs = rules.cfg.handshake_timeout;
    if let Some(tls) = rules.tls {
        conn = conn.start_tls_server(tls, Endpoint::Unclassified, hs)?;
    }
    conn.set_read_timeout(Some(hs))
        .map_err(|e| Error::io("setting handshake timeout", e))?;
    let mut head = [0u8; 4];
    read_handshake(&mut conn, &mut head, hs, Endpoint::Unclassified).map_err(|e| match e {
        // Over TLS, a close before the first byte is how a QEMU source
        // refuses our certificate.
        Error::PeerClosed { .. } => conn
            .closed_after_handshake(Endpoint::Unclassified)
            .unwrap_or(e),
        e => e,
    })?;
    let magic = u32::from_be_bytes(head);
    if magic == QEVM_MAGIC {
        conn.set_read_timeout(None)
            .map_err(|e| Error::io("clearing handshake timeout", e))?;
        // QEMU ends its main channel without TLS close_notify.
        conn.allow_eof_without_close_notify();
        return Ok(Identified::Main(conn, head));
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
    read_handshake(&mut conn, &mut init[4..], hs, Endpoint::Unclassified).map_err(|e| match e {
        // It did identify itself (multifd magic), then closed.
        Error::PeerClosed { endpoint, .. } => Error::PeerClosed {
            endpoint,
            when: "in the middle of its handshake",
        },
        e => e,
    })?;
    let pkt = InitPacket::decode(&init).map_err(|e| Error::wire(Endpoint::Unclassified, e))?;
    if pkt.uuid != rules.cfg.uuid {
        return Err(Error::UuidMismatch {
            id: pkt.id,
            received: format_uuid(&pkt.uuid),
            expected: format_uuid(&rules.cfg.uuid),
        });
    }
    if pkt.id >= rules.cfg.channels {
        return Err(Error::BadChannelId {
            id: pkt.id,
            reason: "not below the configured channel count (different multifd-channels?)",
        });
    }
    conn.set_read_timeout(None)
        .map_err(|e| Error::io("clearing handshake timeout", e))?;
    if !rules.clean_tls_termination {
        conn.allow_eof_without_close_notify();
    }
    Ok(Identified::Channel(pkt.id, conn))
}

/// Accepts until the main channel and all N multifd channels are there.
/// The first connection may take `first_timeout` (forever when `None`);
/// the rest must follow within the handshake timeout.
pub(super) fn accept_all(
    listener: &Listener,
    cfg: &MigrationConfig,
    first_timeout: Option<Duration>,
    tls: Option<&TlsServer>,
    clean_tls_termination: bool,
    abort: &Abort<'_>,
) -> Result<Accepted> {
    let rules = Rules {
        cfg,
        tls,
        clean_tls_termination,
    };
    let (notify_r, notify_w) =
        std::io::pipe().map_err(|e| Error::io("creating the accept pipe", e))?;
    std::thread::scope(|s| {
        let mut door = Door {
            listener,
            cfg,
            first_timeout,
            abort,
            notify_r,
            main: None,
            channels: (0..cfg.channels).map(|_| None).collect(),
            have: 0,
            in_flight: Vec::new(),
            deadline: None,
            extra: if tls.is_some() {
                usize::from(cfg.channels) + 1
            } else {
                0
            },
        };
        let (tx, rx) = mpsc::channel::<(usize, Result<Identified>)>();
        let mut next = 0usize;
        let mut threads = Vec::new();
        let outcome = loop {
            match door.step(&rx) {
                Ok(Step::Done) => break Ok(()),
                Ok(Step::Accepted(conn)) => {
                    let slot = next;
                    next += 1;
                    let (tx, rules) = (tx.clone(), &rules);
                    let notify = match notify_w.try_clone() {
                        Ok(w) => w,
                        Err(e) => break Err(Error::io("duplicating the accept pipe", e)),
                    };
                    let handle = match conn.try_clone() {
                        Ok(h) => h,
                        Err(e) => break Err(Error::io("duplicating a socket handle", e)),
                    };
                    door.in_flight.push((slot, handle));
                    let spawned = lifecycle::spawn(s, "multifd-accept".into(), abort, move || {
                        let r = identify(conn, rules);
                        let _ = tx.send((slot, r));
                        let _ = (&notify).write_all(&[1]);
                        Ok(())
                    });
                    match spawned {
                        Ok(h) => threads.push(h),
                        Err(e) => break Err(e),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        // Connections still being identified are not ours (we have all
        // of ours, or failed): end them so their threads return now.
        for (_, handle) in &door.in_flight {
            handle.shutdown();
        }
        for t in threads {
            let _ = t.join();
        }
        outcome.map(|()| door.finish())
    })
}

/// What the accept loop did.
enum Step {
    /// A new connection to identify.
    Accepted(Connection),
    /// Every connection is known.
    Done,
}

/// The state of the accept loop.
struct Door<'a, 'w> {
    listener: &'a Listener,
    cfg: &'a MigrationConfig,
    first_timeout: Option<Duration>,
    abort: &'a Abort<'w>,
    notify_r: std::io::PipeReader,
    main: Option<(Connection, [u8; 4])>,
    channels: Vec<Option<Connection>>,
    have: usize,
    /// Connections being identified: their slot and a handle to end them.
    in_flight: Vec<(usize, Connection)>,
    /// When all channels must be there (set by the first connection).
    deadline: Option<Instant>,
    /// Connections accepted beyond N+1 before all are known (TLS).
    extra: usize,
}

impl Door<'_, '_> {
    fn complete(&self) -> bool {
        self.main.is_some() && self.have == self.channels.len()
    }

    /// Takes the results that came in; fails on the first bad one.
    fn collect(&mut self, rx: &mpsc::Receiver<(usize, Result<Identified>)>) -> Result<()> {
        while let Ok((slot, r)) = rx.try_recv() {
            self.in_flight.retain(|(s, _)| *s != slot);
            match r? {
                Identified::Main(conn, head) => {
                    if self.main.is_some() {
                        return Err(Error::Unsupported("a second main channel".into()));
                    }
                    self.main = Some((conn, head));
                }
                Identified::Channel(id, conn) => {
                    let entry = &mut self.channels[usize::from(id)];
                    if entry.is_some() {
                        return Err(Error::BadChannelId {
                            id,
                            reason: "already connected",
                        });
                    }
                    *entry = Some(conn);
                    self.have += 1;
                    tracing::debug!(channel = id, "multifd channel connected");
                }
            }
        }
        Ok(())
    }

    /// The error when the time is up.
    fn timed_out(&self, wait: Option<Duration>) -> Error {
        let n = self.channels.len();
        if self.deadline.is_some() && self.main.is_some() && self.have < n {
            let missing: Vec<String> = self
                .channels
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_none())
                .map(|(id, _)| id.to_string())
                .collect();
            return Error::Mismatch(format!(
                "only {} of {n} multifd channels connected within {} ms \
                 (missing ids {}): is multifd-channels the same on both sides?",
                self.have,
                self.cfg.handshake_timeout.as_millis(),
                missing.join(",")
            ));
        }
        Error::HandshakeTimeout {
            endpoint: if self.main.is_none() {
                Endpoint::Main
            } else {
                Endpoint::Unclassified
            },
            timeout_ms: wait.unwrap_or_default().as_millis() as u64,
        }
    }

    /// Waits for a connection to accept or a result to come in.
    fn step(&mut self, rx: &mpsc::Receiver<(usize, Result<Identified>)>) -> Result<Step> {
        loop {
            self.collect(rx)?;
            if self.complete() {
                return Ok(Step::Done);
            }
            let known = usize::from(self.main.is_some()) + self.have;
            let may_accept = known + self.in_flight.len() < self.channels.len() + 1 + self.extra;
            let wait = match self.deadline {
                None => self.first_timeout,
                // Past the deadline, the connections being identified still
                // report (each within its own handshake timeout): their
                // error says more than "time is up".
                Some(d) if Instant::now() >= d && !self.in_flight.is_empty() => None,
                Some(d) => Some(d.saturating_duration_since(Instant::now())),
            };
            // [notify, abort wake (if any), listener (while there is room)]
            let mut fds = vec![self.notify_r.as_raw_fd()];
            fds.extend(self.abort.wake_fd().map(|w| w.as_raw_fd()));
            let listener_at = may_accept.then(|| {
                fds.push(self.listener.as_raw_fd());
                fds.len() - 1
            });
            let ready = sys::poll_readable_set(&fds, wait)
                .map_err(|e| Error::io("waiting for connections", e))?;
            if self.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            if ready[0] {
                let mut sink = [0u8; 64];
                let _ = std::io::Read::read(&mut self.notify_r, &mut sink);
                continue;
            }
            if let Some(i) = listener_at
                && ready[i]
            {
                if let Some(conn) = self.listener.accept(Some(Duration::ZERO))? {
                    self.abort.register_socket(&conn)?;
                    let hs = self.cfg.handshake_timeout;
                    self.deadline.get_or_insert_with(|| Instant::now() + hs);
                    return Ok(Step::Accepted(conn));
                }
                continue;
            }
            if !ready.iter().any(|&r| r) {
                if !self.in_flight.is_empty() {
                    // Past the deadline: wait for their reports instead.
                    continue;
                }
                // Nothing in time: a late result may still be waiting.
                self.collect(rx)?;
                if self.complete() {
                    return Ok(Step::Done);
                }
                return Err(self.timed_out(wait));
            }
        }
    }

    fn finish(self) -> Accepted {
        let (main, main_head) = self.main.expect("complete: main present");
        Accepted {
            main,
            main_head,
            channels: self
                .channels
                .into_iter()
                .map(|c| c.expect("complete: all present"))
                .collect(),
        }
    }
}
