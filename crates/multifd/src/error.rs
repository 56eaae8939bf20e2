//! The engine's error type.
//!
//! An error's message never repeats its cause: where a variant carries a
//! `source` (an OS error, a wire error), the message says what was being
//! done and [`std::error::Error::source`] gives the cause, so a chain
//! printer (`anyhow`'s `{:#}`) shows each once.

use std::io;
use std::path::PathBuf;

use multifd_wire::WireError;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an error happened: the main channel or a multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The main migration stream.
    Main,
    /// Multifd channel with this id.
    Channel(u8),
    /// A connection not yet classified.
    Unclassified,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Main => f.write_str("main channel"),
            Self::Channel(id) => write!(f, "multifd channel {id}"),
            Self::Unclassified => f.write_str("new connection"),
        }
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent bytes that do not decode.
    #[error("{endpoint}: invalid data from the peer")]
    Wire {
        /// Where the bytes came from.
        endpoint: Endpoint,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// What we were about to send does not encode (a name too long for
    /// the wire, an item out of the stream's order).
    #[error("{endpoint}: cannot encode the migration stream")]
    Encode {
        /// Where it was to be sent.
        endpoint: Endpoint,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// The peer closed a connection where more data was due.
    #[error("{endpoint}: peer closed the connection {when}")]
    PeerClosed {
        /// Which connection.
        endpoint: Endpoint,
        /// In what state.
        when: &'static str,
    },
    /// A connection attempt got no answer in time (a host that drops SYNs,
    /// or none at that address).
    #[error("connecting to {address}: no answer within {timeout_ms} ms")]
    ConnectTimeout {
        /// The address tried.
        address: String,
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// A TLS handshake or session failed (a certificate not trusted or not
    /// for that host, a client not authorized, the peer refused ours).
    #[error("{endpoint}: TLS: {reason}")]
    Tls {
        /// Which connection.
        endpoint: Endpoint,
        /// What failed.
        reason: String,
    },
    /// TLS credentials (certificates, keys, `keys.psk`) do not load.
    #[error("TLS credentials {}: {reason}", path.display())]
    TlsCredentials {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A connection did not complete its handshake in time.
    #[error("{endpoint}: no handshake within {timeout_ms} ms")]
    HandshakeTimeout {
        /// Which connection.
        endpoint: Endpoint,
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// A connection stayed open but nothing moved within a deadline.
    #[error("{endpoint}: stalled, nothing moved for {after_ms} ms {when}")]
    Stalled {
        /// Which connection.
        endpoint: Endpoint,
        /// In what state.
        when: &'static str,
        /// How long it was silent.
        after_ms: u64,
    },
    /// A channel id in an initial packet is not acceptable.
    #[error("multifd channel id {id}: {reason}")]
    BadChannelId {
        /// The id the peer sent.
        id: u8,
        /// Out of range or duplicate.
        reason: &'static str,
    },
    /// The UUID of an initial packet is not ours.
    #[error("multifd channel {id}: received uuid {received} but expected {expected}")]
    UuidMismatch {
        /// Channel id.
        id: u8,
        /// UUID on the wire.
        received: String,
        /// Our UUID.
        expected: String,
    },
    /// The source's configuration section names another VM UUID than ours.
    #[error("the source's VM uuid is {received} but ours is {expected}")]
    SourceUuidMismatch {
        /// UUID on the wire.
        received: String,
        /// Our UUID.
        expected: String,
    },
    /// The source announces more guest RAM than this receiver accepts.
    #[error("the source announces {announced} bytes of RAM, more than the limit of {limit}")]
    RamLimit {
        /// Sum of the announced block lengths.
        announced: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A packet or record names a RAM block we do not have.
    #[error("{endpoint}: unknown RAM block {name:?}")]
    UnknownBlock {
        /// Where it came from.
        endpoint: Endpoint,
        /// The name.
        name: String,
    },
    /// A page offset lies outside its block or is not page-aligned.
    #[error("page offset {offset:#x} outside RAM block {block:?} of {len:#x} bytes")]
    OffsetOutOfRange {
        /// Block name.
        block: String,
        /// Offending offset.
        offset: u64,
        /// Block length.
        len: u64,
    },
    /// A write was asked of a block mapped read-only.
    #[error("RAM block {block:?} is mapped read-only")]
    ReadOnlyBlock {
        /// Block name.
        block: String,
    },
    /// The two sides are configured differently.
    #[error("configuration mismatch: {0}")]
    Mismatch(String),
    /// A compressed payload from the peer did not decompress to its pages.
    #[error("{endpoint}: corrupt {method} payload: {reason}")]
    Corrupt {
        /// Which channel.
        endpoint: Endpoint,
        /// Payload method.
        method: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Our own compressor failed, or produced more than a packet may carry.
    #[error("{method} compression failed: {reason}")]
    Compression {
        /// Payload method.
        method: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The peer asks for something valid that we do not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Invalid local configuration (options, RAM blocks, URIs).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A snapshot directory's manifest is unreadable or inconsistent.
    #[error("snapshot {}: {reason}", path.display())]
    BadSnapshot {
        /// The manifest or file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A snapshot's block was received into a file outside the snapshot
    /// directory, and replay was not told which file holds it.
    #[error(
        "snapshot block {block:?} was received into {}, outside the snapshot directory: name its file explicitly",
        recorded.display()
    )]
    ExternalBlock {
        /// Block name.
        block: String,
        /// Where the receiver wrote it (informative: never opened unasked).
        recorded: PathBuf,
    },
    /// A file (or a symbolic link) is already where a new file was to be
    /// created: RAM files and snapshot files are never written over.
    #[error("{} already exists; refusing to write over it", path.display())]
    FileExists {
        /// The path.
        path: PathBuf,
    },
    /// The file system has no room for a RAM file: its space is reserved
    /// up front (or, for a file on tmpfs whose pages are only written
    /// through its descriptor, a write finds it full), so a full file
    /// system is this error and never a SIGBUS while guest pages are
    /// written.
    #[error("no space to reserve {needed} bytes for RAM file {}", path.display())]
    NoSpace {
        /// The RAM file.
        path: PathBuf,
        /// Bytes that were to be reserved (the file's length).
        needed: u64,
        /// The OS error (`ENOSPC`, `EDQUOT`).
        #[source]
        source: io::Error,
    },
    /// A mapped-ram migration file breaks the format: a header, region,
    /// bitmap or main-stream item of the file is invalid (the wire error
    /// says which and where).
    #[error("{}: invalid mapped-ram file", path.display())]
    BadMappedRamFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: WireError,
    },
    /// A mapped-ram migration file is not complete or not what this
    /// command can use (it ends inside its main stream: an interrupted
    /// save; its offset is past its end; ...).
    #[error("{}: {reason}", path.display())]
    IncompleteFile {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A mapped-ram file's path led to another file when it was opened
    /// again for a channel (renamed over or replaced since it was checked
    /// or created): its pages would not match what was checked.
    #[error("{}: the file was replaced while in use", path.display())]
    FileReplaced {
        /// The path.
        path: PathBuf,
    },
    /// Direct I/O (`O_DIRECT`) was asked for on a file system that refuses
    /// it (tmpfs, /dev/shm).
    #[error("{}: the file system refuses direct I/O (O_DIRECT)", path.display())]
    DirectIoUnsupported {
        /// The file.
        path: PathBuf,
        /// The OS error (`EINVAL`).
        #[source]
        source: io::Error,
    },
    /// Mapping a RAM block failed.
    #[error("mapping RAM block {name:?}: {reason}")]
    Map {
        /// Block name.
        name: String,
        /// mmap's complaint.
        reason: String,
    },
    /// The migration was cancelled from outside.
    #[error("migration cancelled")]
    Cancelled,
    /// A live migration hit its limit on rounds or time while the dirty
    /// pages still did not fit in the downtime limit. Nothing was paused:
    /// the source VM keeps running.
    #[error(
        "not converging: after {rounds} rounds and {elapsed_ms} ms, {remaining_pages} dirty pages \
         would take an expected {expected_downtime_ms} ms, above the downtime limit of {limit_ms} ms"
    )]
    NotConverging {
        /// Rounds sent (round 1 included).
        rounds: u32,
        /// Time since the migration started.
        elapsed_ms: u64,
        /// Pages dirty at the last sync.
        remaining_pages: u64,
        /// Downtime the switchover would have taken, as estimated.
        expected_downtime_ms: u64,
        /// The downtime limit in force (after any ramp).
        limit_ms: u64,
    },
    /// This thread stopped because another part of the migration failed first.
    #[error("stopped after an error elsewhere")]
    Aborted,
    /// A worker thread panicked (a bug).
    #[error("thread {0} panicked")]
    Panicked(String),
    /// One of the engine's own invariants did not hold (a bug).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// A wire error seen on `endpoint`.
    pub fn wire(endpoint: Endpoint, source: WireError) -> Self {
        Self::Wire { endpoint, source }
    }

    /// The error for a read from a peer on `endpoint` that failed `when`
    /// (while doing what): the peer closed in the middle, a read timeout
    /// ran out (`on_timeout` makes that error), or the OS reported
    /// something else. [`ReadFailure`] decides which.
    pub(crate) fn from_read(
        e: io::Error,
        endpoint: Endpoint,
        when: &'static str,
        on_timeout: impl FnOnce(io::Error) -> Error,
    ) -> Self {
        match ReadFailure::of(e) {
            ReadFailure::PeerClosed => Self::PeerClosed { endpoint, when },
            ReadFailure::TimedOut(e) => on_timeout(e),
            ReadFailure::Other(e) => Self::io(format!("{endpoint}: read failed {when}"), e),
        }
    }
}

/// How a read from a peer failed: the one place that knows which
/// `io::ErrorKind`s mean what.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The peer closed the connection before the bytes asked for.
    PeerClosed,
    /// A receive timeout ran out (Linux reports `EAGAIN`).
    TimedOut(io::Error),
    /// Anything else (reset, shut down by our abort path, ...).
    Other(io::Error),
}

impl ReadFailure {
    /// Classifies `e`, an error from a read.
    pub(crate) fn of(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Self::PeerClosed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::TimedOut(e),
            _ => Self::Other(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_does_not_repeat_its_cause() {
        let e = Error::io("main channel: writing", io::Error::from_raw_os_error(14));
        assert_eq!(e.to_string(), "main channel: writing");
        let cause = std::error::Error::source(&e).expect("a source").to_string();
        assert!(cause.contains("os error 14"), "{cause}");
    }

    #[test]
    fn reads_are_classified_once() {
        let closed = io::Error::from(io::ErrorKind::UnexpectedEof);
        let timed = io::Error::from(io::ErrorKind::WouldBlock);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let ep = Endpoint::Channel(3);
        assert!(matches!(
            Error::from_read(closed, ep, "inside a packet", |_| Error::Aborted),
            Error::PeerClosed {
                when: "inside a packet",
                ..
            }
        ));
        assert!(matches!(
            Error::from_read(timed, ep, "x", |_| Error::Cancelled),
            Error::Cancelled
        ));
        let other = Error::from_read(reset, ep, "inside a header", |_| Error::Aborted);
        assert_eq!(
            other.to_string(),
            "multifd channel 3: read failed inside a header"
        );
    }
}
