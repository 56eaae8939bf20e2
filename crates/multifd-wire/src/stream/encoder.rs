//! The sans-IO encoder of a precopy main stream: the mirror of
//! [`Decoder`](super::Decoder).
//!
//! [`Encoder`] appends elements to an internal buffer and keeps the stream's
//! grammar: records only inside an open `ram` section chunk, every chunk
//! closed by EOS and its footer, a ZERO or PAGE record naming its block only
//! when it differs from the block of the previous record (otherwise
//! CONTINUE), nothing after EOF but the vmdesc. The caller decides when to
//! move the bytes to a connection ([`Encoder::take`] / [`Encoder::consume`]);
//! the encoder never does I/O. A call that the grammar does not allow fails
//! with [`WireError::OutOfOrder`] and leaves the buffer unchanged.
//!
//! ```
//! use multifd_wire::stream::{Configuration, Decoded, Decoder, Encoder, Event, RamBlockInfo};
//!
//! let mut enc = Encoder::new(2);
//! enc.header();
//! enc.configuration(&Configuration { machine: "none".into(), ..Default::default() })?;
//! let blocks = [RamBlockInfo { idstr: "m0".into(), used_length: 1 << 20 }];
//! enc.ram_start(&blocks)?;
//! enc.flush()?;
//! enc.close_chunk()?;
//! enc.ram_end()?;
//! enc.zero_page("m0", 0x1000)?;
//! enc.zero_page("m0", 0x2000)?; // CONTINUE: same block
//! enc.flush()?;
//! enc.close_chunk()?;
//! enc.eof(Some(b"{}"))?;
//!
//! // The decoder reads it back.
//! let bytes = enc.take();
//! let (mut dec, mut pos, mut zeros) = (Decoder::new(), 0, 0);
//! while pos < bytes.len() {
//!     let Decoded::Item { event, consumed } = dec.decode(&bytes[pos..])? else {
//!         unreachable!("the stream is complete")
//!     };
//!     zeros += usize::from(matches!(event, Event::Zero { .. }));
//!     pos += consumed;
//! }
//! assert_eq!(zeros, 2);
//! # Ok::<(), multifd_wire::WireError>(())
//! ```

use super::{Command, Configuration, RAM_SECTION_IDSTR, RAM_SECTION_VERSION, RamBlockInfo, encode};
use crate::WireError;

/// Where the stream being encoded is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Nothing written yet.
    Start,
    /// Between elements, before the `ram` START.
    BeforeRam,
    /// Inside a chunk of the `ram` section; `end`: the END chunk.
    InChunk { end: bool },
    /// Between chunks of the `ram` section.
    BetweenChunks,
    /// After the footer of the `ram` END chunk: device state, then EOF.
    AfterRam,
    /// After EOF (and the vmdesc, if any): the stream is complete.
    Done,
}

impl At {
    fn describe(self) -> &'static str {
        match self {
            At::Start => "before the file header",
            At::BeforeRam => "before the ram section",
            At::InChunk { .. } => "inside a ram section chunk",
            At::BetweenChunks => "between ram section chunks",
            At::AfterRam => "after the ram section",
            At::Done => "after EOF",
        }
    }
}

/// Incremental encoder of a precopy main stream with one `ram` section.
#[derive(Debug, Clone)]
pub struct Encoder {
    out: Vec<u8>,
    at: At,
    ram_section_id: u32,
    /// Block of the last ZERO/PAGE record, for CONTINUE.
    last_block: Option<String>,
}

impl Encoder {
    /// An encoder whose `ram` section has id `ram_section_id`.
    pub fn new(ram_section_id: u32) -> Self {
        Self {
            out: Vec::new(),
            at: At::Start,
            ram_section_id,
            last_block: None,
        }
    }

    fn expect(&self, item: &'static str, ok: bool) -> Result<(), WireError> {
        if ok {
            Ok(())
        } else {
            Err(WireError::OutOfOrder {
                item,
                state: self.at.describe(),
            })
        }
    }

    /// The file header (`QEVM`, version 3).
    pub fn header(&mut self) {
        if self.at == At::Start {
            encode::header(&mut self.out);
            self.at = At::BeforeRam;
        }
    }

    /// Bytes recorded from another stream up to its `ram` START (header,
    /// configuration, commands), copied verbatim instead of
    /// [`Encoder::header`] and [`Encoder::configuration`].
    pub fn verbatim_prefix(&mut self, prefix: &[u8]) -> Result<(), WireError> {
        self.expect("a recorded prefix", self.at == At::Start)?;
        self.out.extend_from_slice(prefix);
        self.at = At::BeforeRam;
        Ok(())
    }

    /// The configuration section.
    pub fn configuration(&mut self, cfg: &Configuration) -> Result<(), WireError> {
        self.expect("the configuration", self.at == At::BeforeRam)?;
        encode::configuration(&mut self.out, cfg)
    }

    /// A command between sections (SWITCHOVER_START goes right before the
    /// `ram` END chunk).
    pub fn command(&mut self, cmd: Command) -> Result<(), WireError> {
        self.expect(
            "a command",
            matches!(self.at, At::BeforeRam | At::BetweenChunks),
        )?;
        encode::command(&mut self.out, cmd);
        Ok(())
    }

    /// Opens the `ram` START chunk with its block list (`MEM_SIZE`).
    pub fn ram_start(&mut self, blocks: &[RamBlockInfo]) -> Result<(), WireError> {
        self.expect("the ram START", self.at == At::BeforeRam)?;
        let mark = self.out.len();
        let written = encode::section_start(
            &mut self.out,
            self.ram_section_id,
            RAM_SECTION_IDSTR,
            0,
            RAM_SECTION_VERSION,
        )
        .and_then(|()| encode::mem_size(&mut self.out, blocks));
        if let Err(e) = written {
            self.out.truncate(mark);
            return Err(e);
        }
        self.at = At::InChunk { end: false };
        Ok(())
    }

    /// Opens a `ram` PART chunk.
    pub fn ram_part(&mut self) -> Result<(), WireError> {
        self.expect("a ram PART", self.at == At::BetweenChunks)?;
        encode::section_part(&mut self.out, self.ram_section_id);
        self.at = At::InChunk { end: false };
        Ok(())
    }

    /// Opens the `ram` END chunk (the last one).
    pub fn ram_end(&mut self) -> Result<(), WireError> {
        self.expect("the ram END", self.at == At::BetweenChunks)?;
        encode::section_end(&mut self.out, self.ram_section_id);
        self.at = At::InChunk { end: true };
        Ok(())
    }

    /// A `MULTIFD_FLUSH` record: a sync point of the multifd channels.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.expect("MULTIFD_FLUSH", matches!(self.at, At::InChunk { .. }))?;
        encode::flush(&mut self.out);
        Ok(())
    }

    /// The block name for a ZERO/PAGE record: `None` (CONTINUE) when it is
    /// the block of the previous record.
    fn record_block<'b>(&self, block: &'b str) -> Option<&'b str> {
        match &self.last_block {
            Some(last) if last == block => None,
            _ => Some(block),
        }
    }

    fn remember_block(&mut self, block: &str) {
        if self.last_block.as_deref() != Some(block) {
            self.last_block = Some(block.to_owned());
        }
    }

    /// A legacy ZERO record for the page at `offset` of `block`.
    pub fn zero_page(&mut self, block: &str, offset: u64) -> Result<(), WireError> {
        self.expect("a ZERO record", matches!(self.at, At::InChunk { .. }))?;
        let name = self.record_block(block);
        encode::zero_page(&mut self.out, name, offset)?;
        self.remember_block(block);
        Ok(())
    }

    /// A PAGE record carrying the page at `offset` of `block`.
    pub fn page(&mut self, block: &str, offset: u64, data: &[u8]) -> Result<(), WireError> {
        self.expect("a PAGE record", matches!(self.at, At::InChunk { .. }))?;
        let name = self.record_block(block);
        encode::page(&mut self.out, name, offset, data)?;
        self.remember_block(block);
        Ok(())
    }

    /// Closes the open chunk: EOS and the section footer.
    pub fn close_chunk(&mut self) -> Result<(), WireError> {
        let At::InChunk { end } = self.at else {
            return self.expect("EOS", false);
        };
        encode::eos(&mut self.out);
        encode::section_footer(&mut self.out, self.ram_section_id);
        self.at = if end { At::AfterRam } else { At::BetweenChunks };
        Ok(())
    }

    /// Device state after the `ram` section: complete FULL sections in
    /// QEMU's encoding, copied verbatim.
    pub fn device_state(&mut self, sections: &[u8]) -> Result<(), WireError> {
        self.expect("device state", self.at == At::AfterRam)?;
        self.out.extend_from_slice(sections);
        Ok(())
    }

    /// EOF, and the vmdesc trailer when given (QEMU reads one after EOF and
    /// warns when it is missing).
    pub fn eof(&mut self, vmdesc: Option<&[u8]>) -> Result<(), WireError> {
        self.expect("EOF", self.at == At::AfterRam)?;
        let mark = self.out.len();
        encode::eof(&mut self.out);
        if let Some(json) = vmdesc
            && let Err(e) = encode::vmdesc(&mut self.out, json)
        {
            self.out.truncate(mark);
            return Err(e);
        }
        self.at = At::Done;
        Ok(())
    }

    /// Bytes recorded from another stream after its `ram` END chunk
    /// (device state, EOF, vmdesc), copied verbatim instead of
    /// [`Encoder::device_state`] and [`Encoder::eof`].
    pub fn verbatim_tail(&mut self, tail: &[u8]) -> Result<(), WireError> {
        self.expect("a recorded tail", self.at == At::AfterRam)?;
        self.out.extend_from_slice(tail);
        self.at = At::Done;
        Ok(())
    }

    /// Whether the stream is complete (EOF written).
    pub fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// The bytes encoded and not yet taken.
    pub fn pending(&self) -> &[u8] {
        &self.out
    }

    /// Drops the first `n` pending bytes (after they were written out).
    ///
    /// # Panics
    /// If `n` is more than [`Encoder::pending`] holds.
    pub fn consume(&mut self, n: usize) {
        self.out.drain(..n);
    }

    /// Takes every pending byte.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Decoded, Decoder, Event};

    fn blocks() -> Vec<RamBlockInfo> {
        vec![
            RamBlockInfo {
                idstr: "m0".into(),
                used_length: 0x10000,
            },
            RamBlockInfo {
                idstr: "m1".into(),
                used_length: 0x2000,
            },
        ]
    }

    fn decode_all(bytes: &[u8]) -> Vec<Event<'static>> {
        let (mut dec, mut pos, mut out) = (Decoder::new(), 0, Vec::new());
        while pos < bytes.len() {
            match dec.decode(&bytes[pos..]).unwrap() {
                Decoded::Item { event, consumed } => {
                    out.push(event.into_owned());
                    pos += consumed;
                }
                Decoded::NeedMore { .. } => panic!("incomplete stream"),
            }
        }
        out
    }

    #[test]
    fn a_whole_stream_decodes_and_continue_follows_the_last_block() {
        let mut e = Encoder::new(7);
        e.header();
        e.configuration(&Configuration {
            machine: "none".into(),
            ..Default::default()
        })
        .unwrap();
        e.ram_start(&blocks()).unwrap();
        e.flush().unwrap();
        e.close_chunk().unwrap();
        e.ram_part().unwrap();
        e.zero_page("m0", 0x1000).unwrap();
        e.zero_page("m0", 0x3000).unwrap();
        e.zero_page("m1", 0x1000).unwrap();
        e.page("m1", 0, &[5; 4096]).unwrap();
        e.flush().unwrap();
        e.close_chunk().unwrap();
        e.command(Command::SwitchoverStart).unwrap();
        e.ram_end().unwrap();
        e.zero_page("m1", 0x0).unwrap();
        e.close_chunk().unwrap();
        e.eof(Some(b"{}")).unwrap();
        assert!(e.is_done());
        let bytes = e.take();
        // MEM_SIZE names both blocks; of the five records only the first
        // of m0 and the first of m1 name theirs, the rest are CONTINUE.
        let named = bytes
            .windows(3)
            .filter(|w| w == b"\x02m0" || w == b"\x02m1");
        assert_eq!(named.count(), 2 + 2);
        let events = decode_all(&bytes);
        let zeros: Vec<_> = events
            .iter()
            .filter_map(|ev| match ev {
                Event::Zero { block, offset } => Some((block.to_string(), *offset)),
                _ => None,
            })
            .collect();
        assert_eq!(
            zeros,
            [
                ("m0".into(), 0x1000),
                ("m0".into(), 0x3000),
                ("m1".into(), 0x1000),
                ("m1".into(), 0)
            ]
        );
        assert!(events.contains(&Event::Command(Command::SwitchoverStart)));
        assert_eq!(events.iter().filter(|e| **e == Event::Flush).count(), 2);
        assert!(matches!(events.last(), Some(Event::VmDesc { .. })));
    }

    #[test]
    fn records_outside_a_chunk_and_items_after_eof_are_refused() {
        let mut e = Encoder::new(1);
        assert!(matches!(
            e.zero_page("m0", 0),
            Err(WireError::OutOfOrder { .. })
        ));
        e.header();
        assert!(e.ram_part().is_err(), "PART before START");
        assert!(e.close_chunk().is_err(), "EOS outside a chunk");
        e.ram_start(&blocks()).unwrap();
        assert!(e.ram_start(&blocks()).is_err(), "a second START");
        assert!(
            e.command(Command::SwitchoverStart).is_err(),
            "inside a chunk"
        );
        e.close_chunk().unwrap();
        assert!(e.eof(None).is_err(), "EOF before the ram END");
        e.ram_end().unwrap();
        e.close_chunk().unwrap();
        assert!(e.flush().is_err(), "FLUSH after the ram section");
        let before = e.pending().len();
        e.eof(None).unwrap();
        assert_eq!(e.pending().len(), before + 1);
        assert!(e.eof(None).is_err(), "a second EOF");
        assert!(e.device_state(b"x").is_err(), "device state after EOF");
    }

    #[test]
    fn a_failed_call_leaves_the_buffer_unchanged() {
        let mut e = Encoder::new(1);
        e.header();
        let before = e.pending().to_vec();
        let bad = [RamBlockInfo {
            idstr: "m0".into(),
            used_length: 100,
        }];
        assert!(e.ram_start(&bad).is_err());
        assert_eq!(e.pending(), &before[..]);
        e.ram_start(&blocks()).unwrap();
        let before = e.pending().to_vec();
        assert!(e.zero_page("m0", 0x1001).is_err(), "unaligned");
        assert_eq!(e.pending(), &before[..]);
        // The failed record did not become the CONTINUE block.
        e.zero_page("m1", 0).unwrap();
        assert!(e.pending().ends_with(b"\x02m1\x00"));
    }

    #[test]
    fn consume_drops_written_bytes() {
        let mut e = Encoder::new(1);
        e.header();
        assert_eq!(e.pending().len(), 8);
        e.consume(3);
        assert_eq!(e.pending().len(), 5);
        assert_eq!(e.take().len(), 5);
        assert!(e.pending().is_empty());
    }
}
