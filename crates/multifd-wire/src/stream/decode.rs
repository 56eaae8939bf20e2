//! The incremental decoder of the main stream: a state machine over the
//! element sequence, delegating element bodies to the sibling modules.

use std::borrow::Cow;
use std::sync::Arc;

use super::config::{self, layout_capability};
use super::cursor::{Cursor, Halt, Step};
use super::ram::{self, Record, RecordContext};
use super::{
    Command, Configuration, MAX_VMDESC_LEN, QEVM_MAGIC, RAM_SECTION_IDSTR, RAM_SECTION_VERSION,
    RamBlockInfo, STREAM_VERSION, command, element, misplaced,
};
use crate::WireError;

/// Outcome of [`Decoder::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The next item is incomplete. Call again with the same bytes plus more;
    /// the buffer must hold at least `at_least` bytes for progress.
    NeedMore {
        /// Total buffer length needed (always more than what was given).
        at_least: usize,
    },
    /// One item was decoded from the front of the buffer.
    Item {
        /// What it was.
        event: Event<'a>,
        /// Bytes it took; drop them before the next call.
        consumed: usize,
    },
}

/// One item of the main stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// `"QEVM"` and version 3.
    Header,
    /// The configuration section.
    Configuration(Configuration),
    /// START of the `"ram"` section (instance 0, version 4).
    RamStart {
        /// Section id the source chose for it.
        section_id: u32,
    },
    /// PART of the ram section.
    RamPart {
        /// The ram section id.
        section_id: u32,
    },
    /// END of the ram section.
    RamEnd {
        /// The ram section id.
        section_id: u32,
    },
    /// The RAM block list (first record of the ram START).
    MemSize {
        /// Blocks in stream order; their lengths add up to the total.
        blocks: Vec<RamBlockInfo>,
    },
    /// A legacy zero-page record.
    Zero {
        /// Block id (CONTINUE already resolved).
        block: Arc<str>,
        /// Page-aligned offset inside the block (not checked against its length).
        offset: u64,
    },
    /// A raw page record.
    Page {
        /// Block id (CONTINUE already resolved).
        block: Arc<str>,
        /// Page-aligned offset inside the block (not checked against its length).
        offset: u64,
        /// The 4096 bytes of the page.
        data: Cow<'a, [u8]>,
    },
    /// `MULTIFD_FLUSH`: a sync point.
    Flush,
    /// End of the section's RAM records; the footer comes next.
    Eos,
    /// The footer of the ram section just read.
    Footer {
        /// Its section id.
        section_id: u32,
    },
    /// A command at top level.
    Command(Command),
    /// The next byte (not consumed: `consumed` is 0) starts the first FULL
    /// device section. Everything from there to the end of the connection
    /// is opaque device state; check it with [`check_tail`](super::check_tail).
    /// The decoder accepts no further input.
    DeviceTail,
    /// EOF (`0x00`) at top level.
    Eof,
    /// The vmdesc trailer right after EOF.
    VmDesc {
        /// The JSON bytes.
        json: Cow<'a, [u8]>,
    },
}

impl Event<'_> {
    /// The same event owning its bytes (a PAGE record's data, the vmdesc),
    /// so it can outlive the buffer it was decoded from.
    pub fn into_owned(self) -> Event<'static> {
        match self {
            Event::Page {
                block,
                offset,
                data,
            } => Event::Page {
                block,
                offset,
                data: Cow::Owned(data.into_owned()),
            },
            Event::VmDesc { json } => Event::VmDesc {
                json: Cow::Owned(json.into_owned()),
            },
            Event::Header => Event::Header,
            Event::Configuration(c) => Event::Configuration(c),
            Event::RamStart { section_id } => Event::RamStart { section_id },
            Event::RamPart { section_id } => Event::RamPart { section_id },
            Event::RamEnd { section_id } => Event::RamEnd { section_id },
            Event::MemSize { blocks } => Event::MemSize { blocks },
            Event::Zero { block, offset } => Event::Zero { block, offset },
            Event::Flush => Event::Flush,
            Event::Eos => Event::Eos,
            Event::Footer { section_id } => Event::Footer { section_id },
            Event::Command(c) => Event::Command(c),
            Event::DeviceTail => Event::DeviceTail,
            Event::Eof => Event::Eof,
        }
    }
}

/// Which chunk of the ram section is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Part,
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Header,
    Configuration,
    TopLevel,
    /// Reading the records of a ram section chunk.
    Records {
        section_id: u32,
        chunk: Chunk,
        first: bool,
    },
    /// EOS was read; the footer must follow.
    Footer {
        section_id: u32,
        chunk: Chunk,
    },
    AfterEof,
    AfterVmDesc,
    /// [`Event::DeviceTail`] was returned.
    Opaque,
}

/// Incremental, restartable decoder of the main stream.
///
/// Feed it the unconsumed bytes of the stream. It never panics; on
/// [`Decoded::NeedMore`] and on error its state is unchanged.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    ram_section_id: Option<u32>,
    ram_ended: bool,
    last_block: Option<Arc<str>>,
    layout_capability: Option<&'static str>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder expecting the file header.
    pub fn new() -> Self {
        Self {
            state: State::Header,
            ram_section_id: None,
            ram_ended: false,
            last_block: None,
            layout_capability: None,
        }
    }

    /// Section id of the `"ram"` section once its START was seen.
    pub fn ram_section_id(&self) -> Option<u32> {
        self.ram_section_id
    }

    /// Whether the next record is the `MEM_SIZE` list of the ram START (for
    /// the mapped-ram file decoder, which reads that list itself).
    pub(super) fn at_mem_size(&self) -> bool {
        matches!(
            self.state,
            State::Records {
                chunk: Chunk::Start,
                first: true,
                ..
            }
        )
    }

    /// The caller has read the `MEM_SIZE` list itself (mapped-ram files):
    /// continue with the next record of the ram START. Does nothing unless
    /// [`at_mem_size`](Self::at_mem_size).
    pub(super) fn skip_mem_size(&mut self) {
        if let State::Records {
            section_id,
            chunk: Chunk::Start,
            first: true,
        } = self.state
        {
            self.state = State::Records {
                section_id,
                chunk: Chunk::Start,
                first: false,
            };
        }
    }

    /// Decodes the next item from the front of `buf`.
    ///
    /// On [`Decoded::NeedMore`] nothing changed: call again with the same
    /// front and at least `at_least` bytes in total.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Decoded<'a>, WireError> {
        let mut next = self.clone();
        let mut c = Cursor::new(buf);
        match next.step(&mut c) {
            Ok(event) => {
                *self = next;
                Ok(Decoded::Item {
                    event,
                    consumed: c.pos(),
                })
            }
            Err(Halt::NeedMore(at_least)) => Ok(Decoded::NeedMore { at_least }),
            Err(Halt::Invalid(e)) => Err(e),
        }
    }

    /// Decodes one item, updating `self` as it goes (the caller discards
    /// the updated copy unless an item results).
    fn step<'a>(&mut self, c: &mut Cursor<'a>) -> Step<Event<'a>> {
        match self.state.clone() {
            State::Header => self.header(c),
            State::Configuration => {
                let cfg = config::decode(c)?;
                self.layout_capability = layout_capability(&cfg);
                self.state = State::TopLevel;
                Ok(Event::Configuration(cfg))
            }
            State::TopLevel => self.top_level(c),
            State::Records {
                section_id,
                chunk,
                first,
            } => self.record(c, section_id, chunk, first),
            State::Footer { section_id, chunk } => {
                let ty = c.u8()?;
                if ty != element::FOOTER {
                    return Err(WireError::MissingFooter {
                        section_id,
                        found: ty,
                    }
                    .into());
                }
                let found = c.u32()?;
                if found != section_id {
                    return Err(WireError::FooterMismatch {
                        expected: section_id,
                        found,
                    }
                    .into());
                }
                if chunk == Chunk::End {
                    self.ram_ended = true;
                }
                self.state = State::TopLevel;
                Ok(Event::Footer { section_id })
            }
            State::AfterEof => {
                let ty = c.u8()?;
                if ty != element::VMDESCRIPTION {
                    return Err(misplaced(ty, "after EOF (only a vmdesc may follow)").into());
                }
                let len = c.u32()?;
                if len > MAX_VMDESC_LEN {
                    return Err(WireError::InvalidField {
                        field: "vmdesc length",
                        value: len.into(),
                        reason: "more than 16 MiB",
                    }
                    .into());
                }
                let json = c.take(len as usize)?;
                self.state = State::AfterVmDesc;
                Ok(Event::VmDesc {
                    json: Cow::Borrowed(json),
                })
            }
            State::AfterVmDesc => {
                let ty = c.u8()?;
                Err(misplaced(ty, "after the vmdesc (the stream is over)").into())
            }
            State::Opaque => Err(WireError::DecoderFinished.into()),
        }
    }

    fn header<'a>(&mut self, c: &mut Cursor<'a>) -> Step<Event<'a>> {
        let magic = c.u32()?;
        if magic != QEVM_MAGIC {
            return Err(WireError::BadMagic {
                what: "migration stream",
                found: magic,
                expected: QEVM_MAGIC,
            }
            .into());
        }
        let version = c.u32()?;
        match version {
            STREAM_VERSION => {}
            2 => {
                return Err(WireError::ObsoleteVersion {
                    what: "migration stream",
                    found: version,
                }
                .into());
            }
            _ => {
                return Err(WireError::BadVersion {
                    what: "migration stream",
                    found: version,
                    expected: STREAM_VERSION,
                }
                .into());
            }
        }
        self.state = State::Configuration;
        Ok(Event::Header)
    }

    fn top_level<'a>(&mut self, c: &mut Cursor<'a>) -> Step<Event<'a>> {
        let ty = c.peek_u8()?;
        match ty {
            element::START => {
                c.u8()?;
                let section_id = c.u32()?;
                let idstr = c.counted()?;
                let instance_id = c.u32()?;
                let version = c.u32()?;
                if idstr != RAM_SECTION_IDSTR.as_bytes() || instance_id != 0 {
                    return Err(WireError::UnsupportedSection {
                        idstr: String::from_utf8_lossy(idstr).into_owned(),
                        instance_id,
                    }
                    .into());
                }
                if version != RAM_SECTION_VERSION {
                    return Err(WireError::BadVersion {
                        what: "ram section",
                        found: version,
                        expected: RAM_SECTION_VERSION,
                    }
                    .into());
                }
                if self.ram_section_id.is_some() {
                    return Err(misplaced(ty, "(a second START of the ram section)").into());
                }
                self.ram_section_id = Some(section_id);
                self.state = State::Records {
                    section_id,
                    chunk: Chunk::Start,
                    first: true,
                };
                Ok(Event::RamStart { section_id })
            }
            element::PART | element::END => {
                c.u8()?;
                let section_id = c.u32()?;
                if self.ram_section_id != Some(section_id) {
                    return Err(WireError::UnknownSection { section_id }.into());
                }
                if self.ram_ended {
                    return Err(misplaced(ty, "after the END of the ram section").into());
                }
                let chunk = if ty == element::PART {
                    Chunk::Part
                } else {
                    Chunk::End
                };
                self.state = State::Records {
                    section_id,
                    chunk,
                    first: false,
                };
                Ok(if chunk == Chunk::Part {
                    Event::RamPart { section_id }
                } else {
                    Event::RamEnd { section_id }
                })
            }
            element::COMMAND => {
                c.u8()?;
                Ok(Event::Command(command::decode(c)?))
            }
            element::FULL | element::EOF if !self.ram_ended => {
                Err(misplaced(ty, "before the END of the ram section").into())
            }
            element::FULL => {
                self.state = State::Opaque;
                Ok(Event::DeviceTail)
            }
            element::EOF => {
                c.u8()?;
                self.state = State::AfterEof;
                Ok(Event::Eof)
            }
            _ => Err(misplaced(ty, "at top level").into()),
        }
    }

    fn record<'a>(
        &mut self,
        c: &mut Cursor<'a>,
        section_id: u32,
        chunk: Chunk,
        first: bool,
    ) -> Step<Event<'a>> {
        let ctx = RecordContext {
            first_of_start: first && chunk == Chunk::Start,
            layout_capability: self.layout_capability,
        };
        let record = ram::decode(c, ctx)?;
        self.state = State::Records {
            section_id,
            chunk,
            first: false,
        };
        Ok(match record {
            Record::MemSize(blocks) => Event::MemSize { blocks },
            Record::Flush => Event::Flush,
            Record::Eos => {
                self.state = State::Footer { section_id, chunk };
                Event::Eos
            }
            Record::Zero { block, offset } => Event::Zero {
                block: self.resolve(block, offset)?,
                offset,
            },
            Record::Page {
                block,
                offset,
                data,
            } => Event::Page {
                block: self.resolve(block, offset)?,
                offset,
                data: Cow::Borrowed(data),
            },
        })
    }

    /// The block a ZERO/PAGE record refers to; remembers a named one.
    fn resolve(&mut self, named: Option<&str>, offset: u64) -> Result<Arc<str>, WireError> {
        match (named, &self.last_block) {
            (None, Some(last)) => Ok(last.clone()),
            (None, None) => Err(WireError::ContinueWithoutBlock { offset }),
            (Some(name), Some(last)) if **last == *name => Ok(last.clone()),
            (Some(name), _) => {
                let block: Arc<str> = Arc::from(name);
                self.last_block = Some(block.clone());
                Ok(block)
            }
        }
    }
}
