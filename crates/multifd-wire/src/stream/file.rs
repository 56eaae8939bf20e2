//! The main stream of a mapped-ram migration file (`migrate file:` with the
//! `mapped-ram` capability; layout in [`crate::mapped_ram`]).
//!
//! In such a file the main stream is not contiguous: inside the `MEM_SIZE`
//! list of the ram START section, each block's entry (name, used_length,
//! 28-byte mapped-ram header) is followed by the block's bitmap and pages
//! regions, and the stream resumes after the pages region. Everything else
//! is an ordinary main stream, minus the records a mapped-ram stream cannot
//! hold (`MULTIFD_FLUSH`, `ZERO`, `PAGE`; QEMU rejects them too).
//!
//! [`FileDecoder`] wraps the ordinary [`Decoder`]; it reads the `MEM_SIZE`
//! list itself and tracks the absolute file position, so the caller knows
//! where to read next. [`mem_size_header`] and [`block_entry`] encode the
//! list for a writer; the rest of the stream uses [`super::encode`].

use std::collections::HashSet;

use super::cursor::{Cursor, Halt, Step};
use super::{Decoded, Decoder, Event, MAX_RAM_BLOCKS, RamBlockInfo, ram_flags as f};
use crate::mapped_ram::{self, BlockLayout, HEADER_SIZE, MappedRamHeader};
use crate::{PAGE_SIZE_U64, WireError};

/// The validated capability that adds fields to the block list before the
/// mapped-ram header; not supported.
const IGNORE_SHARED: &str = "x-ignore-shared";

/// Outcome of [`FileDecoder::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDecoded<'a> {
    /// The next item is incomplete. Call again with the same bytes plus more;
    /// the buffer must hold at least `at_least` bytes for progress.
    NeedMore {
        /// Total buffer length needed (always more than what was given).
        at_least: usize,
    },
    /// One item was decoded from the front of the buffer.
    Item {
        /// What it was.
        event: FileEvent<'a>,
        /// Bytes it took from the front of the buffer. After a
        /// [`FileEvent::Block`] the stream does not continue right after
        /// them: see [`FileDecoder::position`].
        consumed: usize,
    },
}

/// One item of the main stream of a mapped-ram file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent<'a> {
    /// An ordinary main-stream item. Never [`Event::MemSize`] (the list
    /// comes as [`MemSize`](Self::MemSize) and [`Block`](Self::Block)),
    /// [`Event::Flush`], [`Event::Zero`] or [`Event::Page`].
    Stream(Event<'a>),
    /// The `MEM_SIZE` record of the ram START: the blocks' lengths add up to
    /// `total`. One [`Block`](Self::Block) per block follows (none if
    /// `total` is 0).
    MemSize {
        /// Total bytes of all listed blocks.
        total: u64,
    },
    /// One entry of the block list with its checked layout. The stream
    /// continues at `layout.next_offset()`, after the block's pages region.
    Block {
        /// Block id and used_length.
        block: RamBlockInfo,
        /// Where the block's header, bitmap and pages are in the file.
        layout: BlockLayout,
    },
}

/// Where the decoder is with respect to the block list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum List {
    /// The list has not started.
    Before,
    /// Inside the list: blocks are expected until `listed == total`.
    Blocks {
        total: u64,
        listed: u64,
        names: HashSet<String>,
    },
    /// The list is complete.
    Done,
}

/// Incremental, restartable decoder of the main stream of a mapped-ram file.
///
/// It knows the absolute file offset of the next byte it expects,
/// [`position`](Self::position): hand it the bytes of the file starting
/// there. The position moves forward by the bytes consumed, except after a
/// [`FileEvent::Block`], where it jumps to the end of the block's pages
/// region (drop any buffered bytes and read from there).
///
/// It never panics; on [`FileDecoded::NeedMore`] and on error its state is
/// unchanged.
#[derive(Debug, Clone)]
pub struct FileDecoder {
    inner: Decoder,
    position: u64,
    file_len: Option<u64>,
    list: List,
}

impl FileDecoder {
    /// A decoder for a file whose main stream starts at `start` (the
    /// `offset=` of the file URI, 0 by default).
    pub fn new(start: u64) -> Self {
        Self {
            inner: Decoder::new(),
            position: start,
            file_len: None,
            list: List::Before,
        }
    }

    /// Also checks that every block's header, bitmap and pages region end
    /// within a file of `file_len` bytes.
    pub fn with_file_len(mut self, file_len: u64) -> Self {
        self.file_len = Some(file_len);
        self
    }

    /// The file offset where the next buffer must start.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Decodes the next item from the front of `buf`, which holds the file's
    /// bytes from [`position`](Self::position) on.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<FileDecoded<'a>, WireError> {
        let mut next = self.clone();
        match next.step(buf) {
            Ok((event, consumed)) => {
                *self = next;
                Ok(FileDecoded::Item { event, consumed })
            }
            Err(Halt::NeedMore(at_least)) => Ok(FileDecoded::NeedMore { at_least }),
            Err(Halt::Invalid(e)) => Err(e),
        }
    }

    /// Decodes one item, updating `self` (discarded by the caller on error).
    fn step<'a>(&mut self, buf: &'a [u8]) -> Step<(FileEvent<'a>, usize)> {
        if matches!(self.list, List::Blocks { .. }) {
            return self.block(buf);
        }
        if self.list == List::Before && self.inner.at_mem_size() {
            let mut c = Cursor::new(buf);
            let header = c.u64()?;
            // Anything else than a plain MEM_SIZE: the ordinary decoder
            // reports what is wrong with it.
            if header & f::MASK == f::MEM_SIZE {
                let total = header & !f::MASK;
                self.list = List::Blocks {
                    total,
                    listed: 0,
                    names: HashSet::new(),
                };
                self.end_list_if_complete();
                self.advance(c.pos())?;
                return Ok((FileEvent::MemSize { total }, c.pos()));
            }
        }
        let (event, consumed) = match self.inner.decode(buf)? {
            Decoded::NeedMore { at_least } => return Err(Halt::NeedMore(at_least)),
            Decoded::Item { event, consumed } => (event, consumed),
        };
        let unsupported = |name, flags| Err(WireError::UnsupportedRecord { name, flags }.into());
        match &event {
            Event::Configuration(cfg) => {
                if cfg.capabilities.iter().any(|c| c == IGNORE_SHARED) {
                    return Err(WireError::UnsupportedCapability {
                        name: IGNORE_SHARED.to_owned(),
                    }
                    .into());
                }
                if !cfg.capabilities.iter().any(|c| c == mapped_ram::CAPABILITY) {
                    return Err(WireError::CapabilityMismatch {
                        name: mapped_ram::CAPABILITY,
                        expected: true,
                    }
                    .into());
                }
            }
            Event::Flush => {
                return unsupported("MULTIFD_FLUSH in a mapped-ram stream", f::MULTIFD_FLUSH);
            }
            Event::Zero { .. } => return unsupported("ZERO in a mapped-ram stream", f::ZERO),
            Event::Page { .. } => return unsupported("PAGE in a mapped-ram stream", f::PAGE),
            // Not reachable: the configuration announced mapped-ram, so the
            // ordinary decoder refuses to read a MEM_SIZE list.
            Event::MemSize { .. } => {
                return unsupported("MEM_SIZE list without mapped-ram headers", f::MEM_SIZE);
            }
            _ => {}
        }
        self.advance(consumed)?;
        Ok((FileEvent::Stream(event), consumed))
    }

    /// One entry of the block list.
    fn block<'a>(&mut self, buf: &'a [u8]) -> Step<(FileEvent<'a>, usize)> {
        let List::Blocks {
            total,
            listed,
            names,
        } = &mut self.list
        else {
            unreachable!("called inside the list only")
        };
        if names.len() == MAX_RAM_BLOCKS {
            return Err(WireError::InvalidField {
                field: "RAM block count",
                value: names.len() as u64 + 1,
                reason: "more than 1024 RAM blocks",
            }
            .into());
        }
        let mut c = Cursor::new(buf);
        let idstr = c.counted_name("MEM_SIZE block")?;
        let used_length = c.u64()?;
        if used_length == 0 || used_length & f::MASK != 0 {
            return Err(WireError::InvalidField {
                field: "RAM block used_length",
                value: used_length,
                reason: "zero or not page-aligned",
            }
            .into());
        }
        let sum = match listed.checked_add(used_length) {
            Some(sum) if sum <= *total => sum,
            sum => {
                return Err(WireError::MemSizeMismatch {
                    total: *total,
                    listed: sum.unwrap_or(u64::MAX),
                }
                .into());
            }
        };
        if names.contains(idstr) {
            return Err(WireError::DuplicateRamBlock {
                name: idstr.to_owned(),
            }
            .into());
        }
        let header_at = c.pos();
        let header = MappedRamHeader::decode(c.take(HEADER_SIZE)?)?;
        let header_offset = offset_after(self.position, header_at)?;
        let layout = BlockLayout::from_header(header_offset, used_length, &header)?;
        if let Some(file_len) = self.file_len {
            layout.check_within(file_len)?;
        }
        *listed = sum;
        names.insert(idstr.to_owned());
        self.end_list_if_complete();
        self.position = layout.next_offset();
        let block = RamBlockInfo {
            idstr: idstr.to_owned(),
            used_length,
        };
        Ok((FileEvent::Block { block, layout }, c.pos()))
    }

    /// Leaves the list once the lengths add up to the total.
    fn end_list_if_complete(&mut self) {
        if let List::Blocks { total, listed, .. } = &self.list
            && listed == total
        {
            self.list = List::Done;
            self.inner.skip_mem_size();
        }
    }

    /// Moves the position forward by `consumed` bytes.
    fn advance(&mut self, consumed: usize) -> Result<(), WireError> {
        self.position = offset_after(self.position, consumed)?;
        Ok(())
    }
}

/// `position + consumed`, checked.
fn offset_after(position: u64, consumed: usize) -> Result<u64, WireError> {
    position
        .checked_add(consumed as u64)
        .ok_or(WireError::RegionOverflow {
            region: "main stream",
            start: position,
            len: consumed as u64,
        })
}

// ---------------------------------------------------------------------------
// Encoding

/// Appends the `MEM_SIZE` record header of a mapped-ram file for `blocks`:
/// the total of their lengths with the `MEM_SIZE` flag. Each block then
/// follows with [`block_entry`].
///
/// Lengths must be non-zero and page-aligned, names 1 to 255 bytes and
/// distinct, at most [`MAX_RAM_BLOCKS`] blocks. On error `out` is unchanged.
pub fn mem_size_header(out: &mut Vec<u8>, blocks: &[RamBlockInfo]) -> Result<(), WireError> {
    if blocks.len() > MAX_RAM_BLOCKS {
        return Err(WireError::InvalidField {
            field: "RAM block count",
            value: blocks.len() as u64,
            reason: "more than 1024 RAM blocks",
        });
    }
    let mut total = 0u64;
    let mut names = HashSet::new();
    for b in blocks {
        check_entry(b)?;
        total = total
            .checked_add(b.used_length)
            .ok_or(WireError::MemSizeMismatch {
                total: u64::MAX,
                listed: u64::MAX,
            })?;
        if !names.insert(b.idstr.as_str()) {
            return Err(WireError::DuplicateRamBlock {
                name: b.idstr.clone(),
            });
        }
    }
    if total & f::MASK != 0 {
        return Err(WireError::InvalidField {
            field: "MEM_SIZE total",
            value: total,
            reason: "not page-aligned",
        });
    }
    out.extend_from_slice(&(total | f::MEM_SIZE).to_be_bytes());
    Ok(())
}

/// Appends one block-list entry (counted name, BE used_length, mapped-ram
/// header) whose first byte lands at file offset `at`, with the layout a
/// QEMU source would choose ([`BlockLayout::compute`]), and returns that
/// layout. The writer then puts the bitmap and the pages at the layout's
/// offsets and continues the main stream at `layout.next_offset()`.
///
/// On error `out` is unchanged.
pub fn block_entry(
    out: &mut Vec<u8>,
    at: u64,
    block: &RamBlockInfo,
) -> Result<BlockLayout, WireError> {
    check_entry(block)?;
    let header_offset = offset_after(at, 1 + block.idstr.len() + 8)?;
    let layout = BlockLayout::compute(header_offset, block.used_length)?;
    let header = layout.header().encode()?;
    out.push(block.idstr.len() as u8);
    out.extend_from_slice(block.idstr.as_bytes());
    out.extend_from_slice(&block.used_length.to_be_bytes());
    out.extend_from_slice(&header);
    Ok(layout)
}

/// Checks a block-list entry for writing.
fn check_entry(b: &RamBlockInfo) -> Result<(), WireError> {
    let reason = match b.idstr.len() {
        0 => Some("empty"),
        1..=255 => None,
        _ => Some("longer than 255 bytes"),
    };
    if let Some(reason) = reason {
        return Err(WireError::BadName {
            what: "MEM_SIZE block",
            reason,
        });
    }
    if b.used_length == 0 || !b.used_length.is_multiple_of(PAGE_SIZE_U64) {
        return Err(WireError::InvalidField {
            field: "RAM block used_length",
            value: b.used_length,
            reason: "zero or not page-aligned",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
