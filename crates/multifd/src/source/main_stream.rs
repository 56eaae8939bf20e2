//! The main stream on the main connection: the wire crate's sans-IO
//! [`Encoder`] keeps the grammar, this writes its bytes out in large pieces
//! to a [`StreamOut`]: the main connection, or another target's writer (a
//! mapped-ram file's, which lays the stream out in its file).

use std::io::Write;

use multifd_wire::WireError;
use multifd_wire::stream::Encoder;

use crate::error::{Endpoint, Error, Result};
use crate::stats::Progress;
use crate::transport::Connection;

/// Bytes gathered before a write to the socket.
const FLUSH_AT: usize = 64 * 1024;

/// Where the bytes of a source's main stream go.
pub(crate) trait StreamOut: Send {
    /// Writes `bytes`, the next part of the stream.
    fn write_stream(&mut self, bytes: &[u8]) -> Result<()>;
    /// The stream is complete: end it (the peer reads EOF).
    fn finish_stream(&mut self) -> Result<()>;
}

impl StreamOut for Connection {
    fn write_stream(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_all(bytes)
            .map_err(|e| Error::io("main channel: writing the migration stream", e))
    }

    fn finish_stream(&mut self) -> Result<()> {
        self.shutdown_write();
        Ok(())
    }
}

/// The main stream of a migration source.
pub(crate) struct MainStream<'p> {
    out: Box<dyn StreamOut + 'p>,
    enc: Encoder,
    progress: &'p Progress,
}

impl<'p> MainStream<'p> {
    pub(super) fn new(conn: Connection, ram_section_id: u32, progress: &'p Progress) -> Self {
        Self::to(Box::new(conn), ram_section_id, progress)
    }

    /// A main stream written to `out`.
    pub(crate) fn to(
        out: Box<dyn StreamOut + 'p>,
        ram_section_id: u32,
        progress: &'p Progress,
    ) -> Self {
        Self {
            out,
            enc: Encoder::new(ram_section_id),
            progress,
        }
    }

    /// Encodes with `f`; a grammar or encoding error is ours (a bad plan,
    /// a name too long for the wire, or a bug).
    pub(super) fn encode(
        &mut self,
        f: impl FnOnce(&mut Encoder) -> std::result::Result<(), WireError>,
    ) -> Result<()> {
        f(&mut self.enc).map_err(|source| Error::Encode {
            endpoint: Endpoint::Main,
            source,
        })
    }

    /// Writes the pending bytes out once there are many.
    pub(super) fn flush_if_large(&mut self) -> Result<()> {
        if self.enc.pending().len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes everything pending.
    pub(super) fn flush(&mut self) -> Result<()> {
        let pending = self.enc.pending();
        if pending.is_empty() {
            return Ok(());
        }
        self.out.write_stream(pending)?;
        let n = pending.len();
        self.progress.add(&self.progress.bytes, n as u64);
        self.enc.consume(n);
        Ok(())
    }

    /// Writes everything and ends the stream (the peer reads EOF).
    pub(crate) fn finish(mut self) -> Result<()> {
        if !self.enc.is_done() {
            return Err(Error::Internal("main stream finished before its EOF"));
        }
        self.flush()?;
        self.out.finish_stream()
    }
}
