//! Buffered writer of the main stream on the main connection.

use std::io::Write;

use crate::error::{Error, Result};
use crate::stats::Progress;
use crate::transport::Connection;

/// Bytes gathered before a write to the socket.
const FLUSH_AT: usize = 64 * 1024;

/// Appends main-stream items to a buffer and writes it out in large pieces.
pub(crate) struct MainWriter<'p> {
    conn: Connection,
    buf: Vec<u8>,
    progress: &'p Progress,
}

impl<'p> MainWriter<'p> {
    pub(crate) fn new(conn: Connection, progress: &'p Progress) -> Self {
        Self {
            conn,
            buf: Vec::with_capacity(2 * FLUSH_AT),
            progress,
        }
    }

    /// The buffer to encode into.
    pub(crate) fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes the buffer out once it is large.
    pub(crate) fn maybe_flush(&mut self) -> Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes everything buffered.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.conn
            .write_all(&self.buf)
            .map_err(|e| Error::io("main channel: writing the migration stream", e))?;
        self.progress
            .add(&self.progress.bytes, self.buf.len() as u64);
        self.buf.clear();
        Ok(())
    }

    /// Writes everything and ends the stream (the peer reads EOF).
    pub(crate) fn finish(mut self) -> Result<()> {
        self.flush()?;
        self.conn.shutdown_write();
        Ok(())
    }
}
