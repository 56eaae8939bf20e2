//! Reading the main stream from the main connection through the pure
//! [`Decoder`]: each event is decoded once and handed on owned
//! ([`Event<'static>`]); the bytes before the `ram` section and after it
//! are kept verbatim.

use std::io::Read;
use std::time::{Duration, Instant};

use multifd_wire::stream::{
    Command, Configuration, Decoded, Decoder, Event, RamBlockInfo, check_tail,
};

use crate::error::{Endpoint, Error, Result};
use crate::transport::Connection;

/// Bytes asked from the socket per read.
const READ_CHUNK: usize = 256 * 1024;
/// Longest prefix (header, configuration, commands) accepted before `ram`.
const MAX_PREFIX: usize = 1 << 20;

/// What the setup part of the stream announced.
pub(super) struct Setup {
    /// The configuration section.
    pub(super) configuration: Configuration,
    /// Section id of `ram`.
    pub(super) ram_section_id: u32,
    /// The RAM blocks, in the source's order.
    pub(super) blocks: Vec<RamBlockInfo>,
}

pub(super) struct StreamReader {
    conn: Connection,
    buf: Vec<u8>,
    start: usize,
    decoder: Decoder,
    /// Bytes consumed before the ram START, verbatim, while they are
    /// being collected (`None` once the START was seen).
    prefix: Option<Vec<u8>>,
    /// The complete prefix, once the START was seen.
    final_prefix: Vec<u8>,
    eof: bool,
    /// Until the block list is read: when the setup must be complete, and
    /// the configured timeout (for the error). A source that connects and
    /// then stalls must not keep the receiver waiting forever.
    setup_deadline: Option<(Instant, Duration)>,
}

impl StreamReader {
    /// A reader of the main stream whose first 4 bytes were `head`. The
    /// setup (header, configuration, `ram` START up to the block list) must
    /// arrive within `setup_timeout`.
    pub(super) fn new(conn: Connection, head: [u8; 4], setup_timeout: Duration) -> Self {
        Self {
            conn,
            buf: head.to_vec(),
            start: 0,
            decoder: Decoder::new(),
            prefix: Some(Vec::new()),
            final_prefix: Vec::new(),
            eof: false,
            setup_deadline: Some((Instant::now() + setup_timeout, setup_timeout)),
        }
    }

    fn setup_timed_out(timeout: Duration) -> Error {
        Error::HandshakeTimeout {
            endpoint: Endpoint::Main,
            timeout_ms: timeout.as_millis() as u64,
        }
    }

    /// Reads until the unconsumed bytes are at least `at_least` long.
    fn fill(&mut self, at_least: usize) -> Result<()> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        while self.buf.len() < at_least {
            if self.eof {
                return Err(Error::PeerClosed {
                    endpoint: Endpoint::Main,
                    when: "in the middle of the migration stream",
                });
            }
            if let Some((deadline, timeout)) = self.setup_deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Self::setup_timed_out(timeout));
                }
                self.conn
                    .set_read_timeout(Some(left))
                    .map_err(|e| Error::io("main channel: setting the setup timeout", e))?;
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK.max(at_least - old), 0);
            let got = self.conn.read(&mut self.buf[old..]);
            self.buf.truncate(old + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let setup = self.setup_deadline;
                    return Err(Error::from_read(
                        e,
                        Endpoint::Main,
                        "in the migration stream",
                        |e| match setup {
                            Some((_, timeout)) => Self::setup_timed_out(timeout),
                            None => Error::io("main channel: reading the migration stream", e),
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    /// Decodes the next event (once), reading more bytes as needed, and
    /// consumes its bytes.
    fn next_event(&mut self) -> Result<Event<'static>> {
        loop {
            let decoded = self
                .decoder
                .decode(&self.buf[self.start..])
                .map_err(|e| Error::wire(Endpoint::Main, e))?;
            let at_least = match decoded {
                Decoded::Item { event, consumed } => {
                    let event = event.into_owned();
                    self.consume(consumed, matches!(event, Event::RamStart { .. }))?;
                    return Ok(event);
                }
                Decoded::NeedMore { at_least } => at_least,
            };
            self.fill(at_least)?;
        }
    }

    /// Consumes `n` bytes; `ram_start`: they are the `ram` START, which
    /// ends the verbatim prefix.
    fn consume(&mut self, n: usize, ram_start: bool) -> Result<()> {
        if ram_start {
            self.final_prefix = self.prefix.take().unwrap_or_default();
        }
        if let Some(prefix) = &mut self.prefix {
            prefix.extend_from_slice(&self.buf[self.start..self.start + n]);
            if prefix.len() > MAX_PREFIX {
                return Err(Error::Unsupported(
                    "more than 1 MiB of main stream before the ram section".into(),
                ));
            }
        }
        self.start += n;
        Ok(())
    }

    /// Reads header, configuration and the `ram` START up to its block
    /// list, all within the setup timeout.
    pub(super) fn read_setup(&mut self) -> Result<Setup> {
        let setup = self.read_setup_items();
        // From here on the stream follows the migration's pace.
        self.setup_deadline = None;
        self.conn
            .set_read_timeout(None)
            .map_err(|e| Error::io("main channel: clearing the setup timeout", e))?;
        setup
    }

    fn read_setup_items(&mut self) -> Result<Setup> {
        let mut configuration = None;
        let mut section = None;
        loop {
            match self.next_event()? {
                Event::Header => {}
                Event::Configuration(c) => {
                    if !c.capabilities.is_empty() {
                        return Err(Error::Unsupported(format!(
                            "source capabilities {:?} (mapped-ram / x-ignore-shared)",
                            c.capabilities
                        )));
                    }
                    configuration = Some(c);
                }
                Event::RamStart { section_id } => section = Some(section_id),
                Event::MemSize { blocks } => {
                    let configuration = configuration.ok_or_else(|| {
                        Error::Unsupported("no configuration section before ram".into())
                    })?;
                    let ram_section_id = section.ok_or(Error::Internal(
                        "the decoder gave MEM_SIZE outside the ram START",
                    ))?;
                    return Ok(Setup {
                        configuration,
                        ram_section_id,
                        blocks,
                    });
                }
                Event::Command(Command::OpenReturnPath | Command::Ping(_)) => {
                    return Err(Error::Unsupported(
                        "the source opened a return path (return-path capability), which is not supported".into(),
                    ));
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "{other:?} before the ram section's block list"
                    )));
                }
            }
        }
    }

    /// The next event after the setup.
    pub(super) fn next(&mut self) -> Result<Event<'static>> {
        self.next_event()
    }

    /// Everything after the ram END footer, to the end of the connection.
    pub(super) fn read_tail(&mut self, max: usize, require_vmdesc: bool) -> Result<Vec<u8>> {
        let mut tail = self.buf[self.start..].to_vec();
        self.start = self.buf.len();
        if !self.eof {
            let mut chunk = vec![0u8; READ_CHUNK];
            loop {
                match self.conn.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        tail.extend_from_slice(&chunk[..n]);
                        if tail.len() > max {
                            return Err(Error::Unsupported(format!(
                                "more than {max} bytes of device state"
                            )));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let context = "main channel: reading device state";
                        return Err(Error::from_read(
                            e,
                            Endpoint::Main,
                            "in the device state",
                            |e| Error::io(context, e),
                        ));
                    }
                }
            }
        }
        if tail.is_empty() {
            // A source that stopped after its last RAM section (cancelled
            // during the switchover): nothing of a tail came.
            return Err(Error::PeerClosed {
                endpoint: Endpoint::Main,
                when: "after the RAM sections, before EOF",
            });
        }
        let vmdesc = check_tail(&tail).map_err(|e| Error::wire(Endpoint::Main, e))?;
        if require_vmdesc && vmdesc.is_none() {
            return Err(Error::PeerClosed {
                endpoint: Endpoint::Main,
                when: "before the vmdesc trailer that ends a complete stream",
            });
        }
        Ok(tail)
    }

    /// The verbatim bytes before the `ram` section.
    pub(super) fn take_prefix(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.final_prefix)
    }
}
