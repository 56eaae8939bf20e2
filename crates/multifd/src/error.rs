//! The engine's error type.

use std::io;

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
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent bytes that do not decode.
    #[error("{endpoint}: {source}")]
    Wire {
        /// Where the bytes came from.
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
    /// A connection did not complete its handshake in time.
    #[error("{endpoint}: no handshake within {timeout_ms} ms")]
    HandshakeTimeout {
        /// Which connection.
        endpoint: Endpoint,
        /// The configured timeout.
        timeout_ms: u64,
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
    /// A packet or record names a RAM block we do not have.
    #[error("{endpoint}: unknown RAM block {name:?}")]
    UnknownBlock {
        /// Where it came from.
        endpoint: Endpoint,
        /// The name.
        name: String,
    },
    /// A page offset lies outside its block.
    #[error("page offset {offset:#x} outside RAM block {block:?} of {len:#x} bytes")]
    OffsetOutOfRange {
        /// Block name.
        block: String,
        /// Offending offset.
        offset: u64,
        /// Block length.
        len: u64,
    },
    /// The two sides are configured differently.
    #[error("configuration mismatch: {0}")]
    Mismatch(String),
    /// A compressed payload did not decompress to the announced pages.
    #[error("{endpoint}: corrupt {method} payload: {reason}")]
    Corrupt {
        /// Which channel.
        endpoint: Endpoint,
        /// Payload method.
        method: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The main stream is valid but asks for something we do not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Invalid local configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    /// This thread stopped because another part of the migration failed first.
    #[error("stopped after an error elsewhere")]
    Aborted,
    /// A worker thread panicked (a bug).
    #[error("thread {0} panicked")]
    Panicked(String),
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
}
