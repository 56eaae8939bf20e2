//! Hostile-peer scenarios: a real receiver against a scripted peer, set up
//! in a few lines, run with the checks every such case needs (no hang, the
//! peer's connections closed by the receiver, no thread or fd left behind).
//!
//! ```ignore
//! let o = Scenario::new(t)          // 1 channel, no compression, anonymous RAM
//!     .channels(2)
//!     .file_ram()                   // RAM in files, read back after the run
//!     .main_setup()                 // a proper main stream setup, held open
//!     .channel(0, body, End::Hold)  // initial packet, then `body`
//!     .silent_channels()            // channel 1 identifies itself, then nothing
//!     .fails();                     // the receiver's error, after the common checks
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd::{Cancel, Compression, Error, Incoming, RamProvider, ReceiveOptions};

use super::{
    AnonRam, Baseline, Bound, Conn, End, FAST, FileRam, PeerReport, Receiving, Transport, bind,
    init_packet, main_end, main_part, main_setup, recv_opts, scripted_peer, start_receiver,
    tempdir,
};

/// Handshake timeout of a scenario's receiver unless told otherwise.
pub const HS: Duration = Duration::from_millis(300);
/// The one RAM block a scenario's main stream announces, its pages and
/// its length in bytes.
pub const BLOCK: &str = "pc.ram";
pub const PAGES: u64 = 64;
pub const LEN: u64 = PAGES * 4096;
/// The migration UUID of a scenario (the receiver's default).
pub const UUID: [u8; 16] = [0; 16];

/// A main stream that runs to its end: the setup announcing [`BLOCK`], one
/// PART round, the END section, EOF and the vmdesc trailer.
pub fn whole_main_stream() -> Vec<u8> {
    [main_setup(&[(BLOCK, LEN)]), main_part(), main_end()].concat()
}

/// A receiver and the connections a scripted peer makes to it, in order.
pub struct Scenario {
    t: Transport,
    label: String,
    opts: ReceiveOptions,
    /// File-backed RAM in this directory; anonymous RAM when `None`.
    ram: Option<tempfile::TempDir>,
    conns: Vec<Conn>,
    /// Channel ids the script already connects.
    ids: BTreeSet<u8>,
}

impl Scenario {
    /// A receiver on transport `t` expecting one channel, no compression,
    /// a [`HS`] handshake timeout and anonymous RAM; no connection yet.
    pub fn new(t: Transport) -> Self {
        Self {
            t,
            label: format!("{t:?}"),
            opts: recv_opts(1, HS),
            ram: None,
            conns: Vec::new(),
            ids: BTreeSet::new(),
        }
    }

    /// What failure messages start with (the transport by default).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// The number of multifd channels the receiver expects.
    pub fn channels(mut self, n: u8) -> Self {
        self.opts.config.channels = n;
        self
    }

    /// The compression method the receiver expects.
    pub fn method(mut self, compression: Compression) -> Self {
        self.opts.config.method.compression = compression;
        self
    }

    /// The receiver's handshake timeout.
    pub fn handshake(mut self, timeout: Duration) -> Self {
        self.opts.config.handshake_timeout = timeout;
        self
    }

    /// How long the receiver waits for connections (`None`: for ever).
    pub fn accept_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.opts.accept_timeout = timeout;
        self
    }

    /// The migration UUID the receiver expects.
    pub fn uuid(mut self, uuid: [u8; 16]) -> Self {
        self.opts.config.uuid = uuid;
        self
    }

    /// The receiver's idle timeout (zero: never).
    pub fn idle(mut self, timeout: Duration) -> Self {
        self.opts.config.idle_timeout = timeout;
        self
    }

    /// The most RAM the receiver accepts a source to announce.
    pub fn max_ram(mut self, bytes: u64) -> Self {
        self.opts.max_ram = bytes;
        self
    }

    /// Lets the receiver be cancelled through `cancel`.
    pub fn cancel(mut self, cancel: &Arc<Cancel>) -> Self {
        self.opts.cancel = Some(cancel.clone());
        self
    }

    /// Gives the receiver file-backed RAM, so the run reports what was
    /// written into guest RAM ([`Outcome::ram`], [`Ended::finish`]).
    pub fn file_ram(mut self) -> Self {
        self.ram = Some(tempdir());
        self
    }

    /// A connection that writes `head` as soon as it is up, then ends.
    pub fn connect(mut self, head: &[u8], end: End) -> Self {
        self.conns.push(Conn::new(head.to_vec(), Vec::new(), end));
        self
    }

    /// A main channel with a proper stream setup for [`BLOCK`], held open.
    pub fn main_setup(self) -> Self {
        self.connect(&main_setup(&[(BLOCK, LEN)]), End::Hold)
    }

    /// A main channel that sends [`whole_main_stream`] and closes.
    pub fn main_complete(self) -> Self {
        self.connect(&whole_main_stream(), End::Close)
    }

    /// Multifd channel `id`: its initial packet as soon as it is up,
    /// `body` once every connection is up, then it ends.
    pub fn channel(mut self, id: u8, body: &[u8], end: End) -> Self {
        self.ids.insert(id);
        self.conns
            .push(Conn::new(init_packet(UUID, id), body.to_vec(), end));
        self
    }

    /// Channel `id` identifies itself and stays silent.
    pub fn silent(self, id: u8) -> Self {
        self.channel(id, &[], End::Hold)
    }

    /// Every channel the receiver expects that the script does not connect
    /// yet identifies itself and stays silent.
    pub fn silent_channels(mut self) -> Self {
        for id in 0..self.opts.config.channels {
            if !self.ids.contains(&id) {
                self = self.silent(id);
            }
        }
        self
    }

    /// Takes the leak baseline, binds, starts the receiver and the peer.
    pub fn start(self) -> Running {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(self.t);
        let provider: Box<dyn RamProvider + Send> = match &self.ram {
            Some(d) => Box::new(FileRam {
                dir: d.path().to_owned(),
            }),
            None => Box::new(AnonRam),
        };
        let receiving = start_receiver(listener, self.opts, provider);
        let peer = scripted_peer(uri, self.conns);
        Running {
            label: self.label,
            base,
            receiving,
            peer,
            socket_dir: dir,
            ram: self.ram,
        }
    }

    /// Runs the scenario to a failure: see [`Running::fails`].
    pub fn fails(self) -> Outcome {
        self.start().fails()
    }

    /// Runs the scenario to its end, whatever it is: see [`Running::end`].
    pub fn ends_within(self, limit: Duration) -> Ended {
        self.start().end(limit)
    }
}

/// A started scenario.
pub struct Running {
    label: String,
    base: Baseline,
    receiving: Receiving,
    peer: JoinHandle<PeerReport>,
    socket_dir: Option<tempfile::TempDir>,
    ram: Option<tempfile::TempDir>,
}

impl Running {
    /// Whether the receiver is still at work after waiting `wait`. For
    /// asserting that it is: a result that came in is dropped.
    pub fn still_running_after(&self, wait: Duration) -> bool {
        self.receiving.wait(wait).is_none()
    }

    /// Waits for the receiver's result, at most `limit`, then joins the
    /// receiver and the peer. Panics on a hang, after the peer let go of
    /// its connections and the receiver had 30 s more to return, so the
    /// process stays usable for the next case.
    pub fn end(self, limit: Duration) -> Ended {
        let Some((result, took)) = self.receiving.wait(limit) else {
            // The peer gives up holding its connections after 10 s; then the
            // receiver sees EOF and ends.
            let _ = self.peer.join();
            let late = self.receiving.wait(Duration::from_secs(30));
            let _ = self.receiving.handle.join();
            panic!(
                "{}: receiver did not return within {limit:?} (hang); after the peer \
                 closed its sockets it returned {:?}",
                self.label,
                late.map(|(r, d)| (r.map(|_| ()), d))
            );
        };
        let returned_at = Instant::now();
        let peer = self.peer.join().expect("peer thread");
        self.receiving.handle.join().expect("receiver thread");
        drop(self.socket_dir);
        Ended {
            label: self.label,
            result,
            took,
            returned_at,
            peer,
            base: self.base,
            ram: self.ram,
        }
    }

    /// Runs to the receiver's error and asserts what every hostile case
    /// must: it fails (no success, no hang) within [`FAST`] with an error
    /// that says something, it closed every connection the peer held, and
    /// no thread or fd is left behind. With file-backed RAM, also returns
    /// the block's contents after the failure (asserted whole).
    pub fn fails(self) -> Outcome {
        let Ended {
            label,
            result,
            took,
            peer,
            base,
            ram,
            ..
        } = self.end(FAST);
        let err = match result {
            Ok(_) => panic!("{label}: migration from a hostile peer succeeded"),
            Err(e) => e,
        };
        assert!(took < FAST, "{label}: error after {took:?}: {err}");
        assert!(
            peer.all_closed_by_receiver,
            "{label}: the receiver failed ({err}) but left a peer connection open"
        );
        assert!(!err.to_string().is_empty());
        base.check(&format!("{label}: {err}"));
        let ram = ram.map(|d| {
            let ram = read_block(&d);
            assert_eq!(ram.len() as u64, LEN);
            ram
        });
        Outcome { err, took, ram }
    }
}

/// How a failing scenario ended.
#[derive(Debug)]
pub struct Outcome {
    pub err: Error,
    /// How long the receiver ran.
    pub took: Duration,
    /// The RAM block's contents after the failure (file-backed RAM only).
    pub ram: Option<Vec<u8>>,
}

impl Outcome {
    /// The RAM block's contents after the failure.
    pub fn ram(&self) -> &[u8] {
        self.ram
            .as_deref()
            .expect("the scenario has file-backed RAM (Scenario::file_ram)")
    }
}

/// How a scenario ended, success or not; the leak check is still to come
/// ([`Ended::finish`]).
pub struct Ended {
    pub label: String,
    pub result: multifd::Result<Incoming>,
    /// How long the receiver ran.
    pub took: Duration,
    /// When the test saw the result.
    pub returned_at: Instant,
    pub peer: PeerReport,
    base: Baseline,
    ram: Option<tempfile::TempDir>,
}

impl Ended {
    /// The migration, which must have succeeded.
    pub fn completed(&self) -> &Incoming {
        self.result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", self.label))
    }

    /// Drops the result (and the guest RAM it holds), asserts no thread or
    /// fd is left behind, and returns the RAM block's contents when the
    /// RAM was file-backed.
    pub fn finish(self, what: &str) -> Option<Vec<u8>> {
        drop(self.result);
        let ram = self.ram.as_ref().map(read_block);
        self.base.check(what);
        ram
    }
}

/// The contents of [`BLOCK`]'s file in a file-backed RAM directory.
fn read_block(dir: &tempfile::TempDir) -> Vec<u8> {
    std::fs::read(dir.path().join(format!("{BLOCK}.ram"))).expect("block file exists")
}
