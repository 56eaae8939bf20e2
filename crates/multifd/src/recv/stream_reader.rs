//! Reading the main stream from the main connection through the pure
//! [`Decoder`], with the bytes before the `ram` section and after it kept
//! verbatim.

use std::io::Read;
use std::sync::Arc;
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

/// A main-stream event with its data owned (the main loop outlives the
/// reader's buffer). PAGE records are rare with multifd, so the copy is too.
#[derive(Debug)]
pub(crate) enum OwnedEvent {
    RamPart,
    RamEnd,
    Zero {
        block: Arc<str>,
        offset: u64,
    },
    Page {
        block: Arc<str>,
        offset: u64,
        data: Vec<u8>,
    },
    Flush,
    Eos,
    Footer,
    Command(Command),
    DeviceTail,
    Eof,
    Other(&'static str),
}

pub(crate) struct StreamReader {
    conn: Connection,
    buf: Vec<u8>,
    start: usize,
    decoder: Decoder,
    /// Bytes consumed before the ram START, verbatim (`None` once done).
    prefix: Option<Vec<u8>>,
    final_prefix: Vec<u8>,
    eof: bool,
    /// Read timeout while the setup is read (none afterwards).
    setup_timeout: Option<std::time::Duration>,
    /// Until the block list is read: when the setup must be complete, and
    /// the configured timeout (for the error). A source that connects and
    /// then stalls must not keep the receiver waiting forever.
    setup_deadline: Option<(Instant, Duration)>,
}

impl StreamReader {
    /// A reader of the main stream whose first 4 bytes were `head`. The
    /// setup (header, configuration, `ram` START up to the block list) must
    /// arrive within `setup_timeout`.
    pub(crate) fn new(conn: Connection, head: [u8; 4], setup_timeout: Duration) -> Self {
        Self {
            conn,
            buf: head.to_vec(),
            start: 0,
            decoder: Decoder::new(),
            prefix: Some(Vec::new()),
            final_prefix: Vec::new(),
            setup_timeout: None,
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
            match self.conn.read(&mut self.buf[old..]) {
                Ok(0) => {
                    self.buf.truncate(old);
                    self.eof = true;
                }
                Ok(n) => self.buf.truncate(old + n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => self.buf.truncate(old),
                Err(e)
                    if self.setup_deadline.is_some()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    self.buf.truncate(old);
                    let (_, timeout) = self.setup_deadline.expect("checked");
                    return Err(Self::setup_timed_out(timeout));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.buf.truncate(old);
                    return Err(Error::HandshakeTimeout {
                        endpoint: Endpoint::Main,
                        timeout_ms: self.setup_timeout.unwrap_or_default().as_millis() as u64,
                    });
                }
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(Error::io("main channel: reading the migration stream", e));
                }
            }
        }
        Ok(())
    }

    /// Decodes the next event, reading more bytes as needed. Returns the
    /// event and how many bytes it took (not yet consumed).
    fn decode_next(&mut self) -> Result<(OwnedOrSetup, usize)> {
        loop {
            let decoded = self
                .decoder
                .clone()
                .decode(&self.buf[self.start..])
                .map_err(|e| Error::wire(Endpoint::Main, e))?;
            match decoded {
                Decoded::NeedMore { at_least } => {
                    let need = at_least;
                    self.fill(need)?;
                }
                Decoded::Item { .. } => break,
            }
        }
        let decoded = self
            .decoder
            .decode(&self.buf[self.start..])
            .map_err(|e| Error::wire(Endpoint::Main, e))?;
        let Decoded::Item { event, consumed } = decoded else {
            unreachable!("same input decoded twice");
        };
        let ev = match event {
            Event::Header => OwnedOrSetup::Header,
            Event::Configuration(c) => OwnedOrSetup::Configuration(c),
            Event::RamStart { section_id } => OwnedOrSetup::RamStart(section_id),
            Event::MemSize { blocks } => OwnedOrSetup::MemSize(blocks),
            Event::RamPart { .. } => OwnedOrSetup::Main(OwnedEvent::RamPart),
            Event::RamEnd { .. } => OwnedOrSetup::Main(OwnedEvent::RamEnd),
            Event::Zero { block, offset } => OwnedOrSetup::Main(OwnedEvent::Zero { block, offset }),
            Event::Page {
                block,
                offset,
                data,
            } => OwnedOrSetup::Main(OwnedEvent::Page {
                block,
                offset,
                data: data.to_vec(),
            }),
            Event::Flush => OwnedOrSetup::Main(OwnedEvent::Flush),
            Event::Eos => OwnedOrSetup::Main(OwnedEvent::Eos),
            Event::Footer { .. } => OwnedOrSetup::Main(OwnedEvent::Footer),
            Event::Command(c) => OwnedOrSetup::Main(OwnedEvent::Command(c)),
            Event::DeviceTail => OwnedOrSetup::Main(OwnedEvent::DeviceTail),
            Event::Eof => OwnedOrSetup::Main(OwnedEvent::Eof),
            Event::VmDesc { .. } => OwnedOrSetup::Main(OwnedEvent::Other("vmdesc")),
        };
        Ok((ev, consumed))
    }

    fn consume(&mut self, n: usize) -> Result<()> {
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
    /// list, each read waiting at most `timeout`.
    pub(crate) fn read_setup(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<(Configuration, u32, Vec<RamBlockInfo>)> {
        self.setup_timeout = Some(timeout);
        self.conn
            .set_read_timeout(Some(timeout))
            .map_err(|e| Error::io("main channel: setting the setup timeout", e))?;
        let setup = self.read_setup_items();
        self.setup_timeout = None;
        self.conn
            .set_read_timeout(None)
            .map_err(|e| Error::io("main channel: clearing the setup timeout", e))?;
        setup
    }

    fn read_setup_items(&mut self) -> Result<(Configuration, u32, Vec<RamBlockInfo>)> {
        let mut configuration = None;
        let mut section = None;
        loop {
            let (ev, n) = self.decode_next()?;
            match ev {
                OwnedOrSetup::RamStart(id) => {
                    // The prefix ends where the ram section begins.
                    self.final_prefix = self.prefix.take().unwrap_or_default();
                    self.consume(n)?;
                    section = Some(id);
                }
                OwnedOrSetup::MemSize(blocks) => {
                    self.consume(n)?;
                    let configuration = configuration.ok_or_else(|| {
                        Error::Unsupported("no configuration section before ram".into())
                    })?;
                    let id = section
                        .ok_or_else(|| Error::Unsupported("MEM_SIZE outside ram START".into()))?;
                    // From here on the stream follows the migration's pace.
                    self.setup_deadline = None;
                    self.conn
                        .set_read_timeout(None)
                        .map_err(|e| Error::io("main channel: clearing the setup timeout", e))?;
                    return Ok((configuration, id, blocks));
                }
                OwnedOrSetup::Configuration(c) => {
                    self.consume(n)?;
                    if !c.capabilities.is_empty() {
                        return Err(Error::Unsupported(format!(
                            "source capabilities {:?} (mapped-ram / x-ignore-shared)",
                            c.capabilities
                        )));
                    }
                    configuration = Some(c);
                }
                OwnedOrSetup::Header => self.consume(n)?,
                OwnedOrSetup::Main(OwnedEvent::Command(
                    Command::OpenReturnPath | Command::Ping(_),
                )) => {
                    return Err(Error::Unsupported(
                        "the source opened a return path (return-path capability), which is not supported".into(),
                    ));
                }
                OwnedOrSetup::Main(other) => {
                    return Err(Error::Unsupported(format!(
                        "{other:?} before the ram section's block list"
                    )));
                }
            }
        }
    }

    /// The next event after the setup.
    pub(crate) fn next(&mut self) -> Result<OwnedEvent> {
        let (ev, n) = self.decode_next()?;
        self.consume(n)?;
        match ev {
            OwnedOrSetup::Main(e) => Ok(e),
            OwnedOrSetup::Header => Ok(OwnedEvent::Other("a second header")),
            OwnedOrSetup::Configuration(_) => Ok(OwnedEvent::Other("a second configuration")),
            OwnedOrSetup::RamStart(_) => Ok(OwnedEvent::Other("a second ram START")),
            OwnedOrSetup::MemSize(_) => Ok(OwnedEvent::Other("a second MEM_SIZE")),
        }
    }

    /// Everything after the ram END footer, to the end of the connection.
    pub(crate) fn read_tail(&mut self, max: usize, require_vmdesc: bool) -> Result<Vec<u8>> {
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
                    Err(e) => return Err(Error::io("main channel: reading device state", e)),
                }
            }
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
    pub(crate) fn take_prefix(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.final_prefix)
    }
}

enum OwnedOrSetup {
    Header,
    Configuration(Configuration),
    RamStart(u32),
    MemSize(Vec<RamBlockInfo>),
    Main(OwnedEvent),
}
