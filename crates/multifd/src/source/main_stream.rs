//! The main stream on the main connection: the wire crate's sans-IO
//! [`Encoder`] keeps the grammar, this writes its bytes out in large pieces.

use std::io::Write;

use multifd_wire::WireError;
use multifd_wire::stream::Encoder;

use crate::error::{Endpoint, Error, Result};
use crate::stats::Progress;
use crate::transport::Connection;

/// Bytes gathered before a write to the socket.
const FLUSH_AT: usize = 64 * 1024;

/// The main stream of a migration source.
pub(super) struct MainStream<'p> {
    conn: Connection,
    enc: Encoder,
    progress: &'p Progress,
}

impl<'p> MainStream<'p> {
    pub(super) fn new(conn: Connection, ram_section_id: u32, progress: &'p Progress) -> Self {
        Self {
            conn,
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
        self.conn
            .write_all(pending)
            .map_err(|e| Error::io("main channel: writing the migration stream", e))?;
        let n = pending.len();
        self.progress.add(&self.progress.bytes, n as u64);
        self.enc.consume(n);
        Ok(())
    }

    /// Writes everything and ends the stream (the peer reads EOF).
    pub(super) fn finish(mut self) -> Result<()> {
        if !self.enc.is_done() {
            return Err(Error::Internal("main stream finished before its EOF"));
        }
        self.flush()?;
        self.conn.shutdown_write();
        Ok(())
    }
}
