//! The mapped-ram file format: what QEMU 10.0 writes for
//! `migrate file:PATH[,offset=N]` with the `mapped-ram` capability (with or
//! without multifd).
//!
//! # Layout
//!
//! All offsets below are **absolute file offsets**, `offset=N` included.
//!
//! ```text
//! 0                 bytes before N are left as they were (the file is truncated to N)
//! N                 main stream: "QEVM" v3, configuration (capabilities ["mapped-ram"]),
//!                   START "ram", MEM_SIZE total, then for each RAM block:
//!   h                 counted name, BE u64 used_length, 28-byte MappedRamHeader   (main stream)
//!   h + 28            bitmap region: one bit per page, 64-bit little-endian words
//!                     (zeros up to the next 1 MiB boundary)
//!   pages_offset      pages region: used_length bytes, page k at pages_offset + k * 4096;
//!                     pages whose bit is clear are holes and are never read
//!   pages_offset + used_length
//!                     the main stream continues here: the next block's name, ...
//! after the list    EOS, footer, PART/END sections holding only EOS, SWITCHOVER_START,
//!                   FULL device sections, EOF, vmdesc; the file ends with the vmdesc
//! ```
//!
//! A QEMU source places the bitmap right after the header and rounds the
//! end of the bitmap up to a multiple of [`PAGES_ALIGNMENT`] (1 MiB, counted
//! from the start of the file, not from `N`) for the pages region, so that
//! the multifd channels can write pages with `O_DIRECT` (`direct-io`). A
//! QEMU destination only requires `pages_offset` to be page-aligned.
//! [`BlockLayout::compute`] gives the source's layout;
//! [`BlockLayout::from_header`] checks a layout read from a file.
//!
//! Pages are written in place by positioned writes (each multifd channel
//! on its own descriptor); the bitmap is written once, at the end of the
//! migration, by the main channel. There are no multifd packets in the file.
//!
//! # Checks stricter than QEMU's loader
//!
//! QEMU 10.0's loader accepts header version 0 and any page size (a page size
//! of 0 kills it with a division by zero), reads the bitmap from wherever
//! `bitmap_offset` points (even into the main stream) and checks nothing but
//! the page alignment of `pages_offset`. This module requires version 1, page
//! size 4096, and the order header < bitmap < pages without overlap or
//! overflow. Every file written by QEMU 10.0 passes these checks.
//!
//! The bitmap is QEMU's in-memory array of `unsigned long` written as is,
//! so its byte order is the source host's. This module reads it as 64-bit
//! little-endian words (x86-64 and little-endian arm64 hosts): page `k` is
//! bit `k % 8` of byte `k / 8`.

use std::collections::HashMap;
use std::ops::Range;

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::stream::RamBlockInfo;
use crate::{PAGE_SIZE_U64, WireError};

/// Name of the migration capability, as announced in the configuration
/// section of the stream.
pub const CAPABILITY: &str = "mapped-ram";
/// Size of the header that follows each block's used_length in the stream.
pub const HEADER_SIZE: usize = 28;
/// [`HEADER_SIZE`] as a `u64`, for offset arithmetic.
pub const HEADER_SIZE_U64: u64 = HEADER_SIZE as u64;
/// The only header version there is (QEMU 9.0 to 10.0).
pub const HEADER_VERSION: u32 = 1;
/// A QEMU source starts every pages region at a multiple of this (1 MiB),
/// counted from the start of the file.
pub const PAGES_ALIGNMENT: u64 = 0x10_0000;
/// A QEMU destination reads each run of present pages in pieces of at most
/// this many bytes (1 MiB), one positioned read per piece.
pub const LOAD_CHUNK: u64 = 0x10_0000;
/// Size of one bitmap word (a 64-bit host's `unsigned long`).
pub const BITMAP_WORD_SIZE: u64 = 8;
/// Pages per bitmap word.
const PAGES_PER_WORD: u64 = BITMAP_WORD_SIZE * 8;

/// The 28 bytes of a header as they are in the file (packed, big-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    version: U32,
    page_size: U64,
    bitmap_offset: U64,
    pages_offset: U64,
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);

// ---------------------------------------------------------------------------
// Header

/// The per-block mapped-ram header (`MappedRamHeader`): where the block's
/// bitmap and pages are in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRamHeader {
    /// Header version, 1.
    pub version: u32,
    /// Target page size, 4096.
    pub page_size: u64,
    /// Absolute file offset of the block's bitmap.
    pub bitmap_offset: u64,
    /// Absolute file offset of the block's page 0.
    pub pages_offset: u64,
}

impl MappedRamHeader {
    /// Decodes a header from the first [`HEADER_SIZE`] bytes of `buf` and
    /// checks it ([`check`](Self::check)).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let bytes = buf.get(..HEADER_SIZE).ok_or(WireError::Truncated {
            what: "mapped-ram header",
            needed: HEADER_SIZE,
            available: buf.len(),
        })?;
        let raw = RawHeader::ref_from_bytes(bytes).expect("size checked");
        let header = Self {
            version: raw.version.get(),
            page_size: raw.page_size.get(),
            bitmap_offset: raw.bitmap_offset.get(),
            pages_offset: raw.pages_offset.get(),
        };
        header.check()?;
        Ok(header)
    }

    /// Encodes the header after the same checks as [`decode`](Self::decode).
    pub fn encode(&self) -> Result<[u8; HEADER_SIZE], WireError> {
        self.check()?;
        let raw = RawHeader {
            version: self.version.into(),
            page_size: self.page_size.into(),
            bitmap_offset: self.bitmap_offset.into(),
            pages_offset: self.pages_offset.into(),
        };
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        Ok(out)
    }

    /// Checks what the header says on its own: version 1, page size 4096,
    /// a page-aligned `pages_offset`. Where the regions are relative to the
    /// header and to each other is checked by [`BlockLayout::from_header`].
    pub fn check(&self) -> Result<(), WireError> {
        if self.version != HEADER_VERSION {
            return Err(WireError::BadVersion {
                what: "mapped-ram header",
                found: self.version,
                expected: HEADER_VERSION,
            });
        }
        if self.page_size != PAGE_SIZE_U64 {
            return Err(WireError::InvalidField {
                field: "mapped-ram page_size",
                value: self.page_size,
                reason: "only 4 KiB target pages are supported",
            });
        }
        if !self.pages_offset.is_multiple_of(PAGE_SIZE_U64) {
            return Err(WireError::InvalidField {
                field: "mapped-ram pages_offset",
                value: self.pages_offset,
                reason: "not page-aligned",
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Layout of one block

/// Bytes of the bitmap of a block of `used_length` bytes: one bit per page,
/// rounded up to whole 64-bit words. `used_length` must be a non-zero
/// multiple of the page size.
pub fn bitmap_len(used_length: u64) -> Result<u64, WireError> {
    check_used_length(used_length)?;
    Ok(words(used_length / PAGE_SIZE_U64) * BITMAP_WORD_SIZE)
}

/// Bitmap words for `num_pages` pages.
fn words(num_pages: u64) -> u64 {
    num_pages.div_ceil(PAGES_PER_WORD)
}

fn check_used_length(used_length: u64) -> Result<(), WireError> {
    if used_length == 0 || !used_length.is_multiple_of(PAGE_SIZE_U64) {
        return Err(WireError::InvalidField {
            field: "RAM block used_length",
            value: used_length,
            reason: "zero or not page-aligned",
        });
    }
    Ok(())
}

/// `start + len`, or the overflow error for `region`.
fn region_end(region: &'static str, start: u64, len: u64) -> Result<u64, WireError> {
    start
        .checked_add(len)
        .ok_or(WireError::RegionOverflow { region, start, len })
}

/// Where one RAM block's mapped-ram parts are in the file.
///
/// A value always describes a consistent layout: header, bitmap and pages
/// in this order, not overlapping, every end representable as a `u64`.
/// It does not know the file's length; see [`check_within`](Self::check_within).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    header_offset: u64,
    bitmap_offset: u64,
    pages_offset: u64,
    used_length: u64,
}

impl BlockLayout {
    /// The layout a QEMU source gives a block of `used_length` bytes whose
    /// header it writes at file offset `header_offset`: the bitmap right
    /// after the header, the pages region at the end of the bitmap rounded
    /// up to a multiple of [`PAGES_ALIGNMENT`].
    pub fn compute(header_offset: u64, used_length: u64) -> Result<Self, WireError> {
        let bitmap_offset = region_end("header", header_offset, HEADER_SIZE_U64)?;
        let bitmap_end = region_end("bitmap", bitmap_offset, bitmap_len(used_length)?)?;
        let pages_offset = bitmap_end.checked_next_multiple_of(PAGES_ALIGNMENT).ok_or(
            WireError::RegionOverflow {
                region: "pages",
                start: bitmap_end,
                len: used_length,
            },
        )?;
        region_end("pages", pages_offset, used_length)?;
        Ok(Self {
            header_offset,
            bitmap_offset,
            pages_offset,
            used_length,
        })
    }

    /// The layout of a block of `used_length` bytes (from the `MEM_SIZE`
    /// list) whose `header` was read at file offset `header_offset`.
    ///
    /// Checks the header itself ([`MappedRamHeader::check`]), that the
    /// bitmap starts at or after the end of the header, that the pages
    /// region starts at or after the end of the bitmap, and that no end
    /// overflows.
    pub fn from_header(
        header_offset: u64,
        used_length: u64,
        header: &MappedRamHeader,
    ) -> Result<Self, WireError> {
        header.check()?;
        let header_end = region_end("header", header_offset, HEADER_SIZE_U64)?;
        if header.bitmap_offset < header_end {
            return Err(WireError::RegionOverlap {
                region: "bitmap",
                start: header.bitmap_offset,
                previous: "header",
                previous_end: header_end,
            });
        }
        let bitmap_end = region_end("bitmap", header.bitmap_offset, bitmap_len(used_length)?)?;
        if header.pages_offset < bitmap_end {
            return Err(WireError::RegionOverlap {
                region: "pages",
                start: header.pages_offset,
                previous: "bitmap",
                previous_end: bitmap_end,
            });
        }
        region_end("pages", header.pages_offset, used_length)?;
        Ok(Self {
            header_offset,
            bitmap_offset: header.bitmap_offset,
            pages_offset: header.pages_offset,
            used_length,
        })
    }

    /// The header describing this layout.
    pub fn header(&self) -> MappedRamHeader {
        MappedRamHeader {
            version: HEADER_VERSION,
            page_size: PAGE_SIZE_U64,
            bitmap_offset: self.bitmap_offset,
            pages_offset: self.pages_offset,
        }
    }

    /// Whether this is the layout a QEMU source would have written
    /// ([`compute`](Self::compute) for the same header offset and length).
    pub fn is_canonical(&self) -> bool {
        Self::compute(self.header_offset, self.used_length).as_ref() == Ok(self)
    }

    /// File offset of the header.
    pub fn header_offset(&self) -> u64 {
        self.header_offset
    }

    /// File offset of the bitmap.
    pub fn bitmap_offset(&self) -> u64 {
        self.bitmap_offset
    }

    /// Length of the bitmap in bytes.
    pub fn bitmap_len(&self) -> u64 {
        words(self.num_pages()) * BITMAP_WORD_SIZE
    }

    /// File offset of page 0 of the block.
    pub fn pages_offset(&self) -> u64 {
        self.pages_offset
    }

    /// The block's used_length in bytes (the length of the pages region).
    pub fn used_length(&self) -> u64 {
        self.used_length
    }

    /// Pages in the block.
    pub fn num_pages(&self) -> u64 {
        self.used_length / PAGE_SIZE_U64
    }

    /// File range of the header.
    pub fn header_range(&self) -> Range<u64> {
        self.header_offset..self.header_offset + HEADER_SIZE_U64
    }

    /// File range of the bitmap.
    pub fn bitmap_range(&self) -> Range<u64> {
        self.bitmap_offset..self.bitmap_offset + self.bitmap_len()
    }

    /// File range of the pages region.
    pub fn pages_range(&self) -> Range<u64> {
        self.pages_offset..self.next_offset()
    }

    /// Where the main stream continues after this block: the end of its
    /// pages region.
    pub fn next_offset(&self) -> u64 {
        self.pages_offset + self.used_length
    }

    /// File offset of page `page` of the block, or `None` past its end.
    pub fn page_offset(&self, page: u64) -> Option<u64> {
        (page < self.num_pages()).then(|| self.pages_offset + page * PAGE_SIZE_U64)
    }

    /// File range holding pages `pages` (e.g. one run of a [`Bitmap`]), or
    /// `None` if the range is empty, reversed or reaches past the block.
    pub fn pages_file_range(&self, pages: Range<u64>) -> Option<Range<u64>> {
        (pages.start < pages.end && pages.end <= self.num_pages()).then(|| {
            self.pages_offset + pages.start * PAGE_SIZE_U64
                ..self.pages_offset + pages.end * PAGE_SIZE_U64
        })
    }

    /// Checks that header, bitmap and pages region all end within a file of
    /// `file_len` bytes.
    pub fn check_within(&self, file_len: u64) -> Result<(), WireError> {
        for (region, range) in self.regions() {
            if range.end > file_len {
                return Err(WireError::RegionPastEof {
                    region,
                    end: range.end,
                    file_len,
                });
            }
        }
        Ok(())
    }

    /// The three regions, in file order.
    fn regions(&self) -> [(&'static str, Range<u64>); 3] {
        [
            ("header", self.header_range()),
            ("bitmap", self.bitmap_range()),
            ("pages", self.pages_range()),
        ]
    }
}

/// Checks the layouts of all blocks of a file of `file_len` bytes: every
/// region ends within the file and no two regions (headers, bitmaps, pages
/// regions of any blocks) overlap.
pub fn check_file_layout(blocks: &[BlockLayout], file_len: u64) -> Result<(), WireError> {
    let mut regions = Vec::with_capacity(blocks.len() * 3);
    for block in blocks {
        block.check_within(file_len)?;
        regions.extend(block.regions());
    }
    regions.sort_by_key(|(_, r)| (r.start, r.end));
    for pair in regions.windows(2) {
        let [(previous, a), (region, b)] = pair else {
            unreachable!("windows of two")
        };
        if b.start < a.end {
            return Err(WireError::RegionOverlap {
                region,
                start: b.start,
                previous,
                previous_end: a.end,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Bitmap

/// A read-only view of a block's bitmap: which pages have data in the pages
/// region. Bit `k` set: page `k` is at [`BlockLayout::page_offset`]`(k)`;
/// clear: the page is all zero (QEMU skips zero pages and never reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitmap<'a> {
    bytes: &'a [u8],
    num_pages: u64,
}

impl<'a> Bitmap<'a> {
    /// A view of `bytes`, which must be exactly the bitmap of `num_pages`
    /// pages (whole 64-bit words).
    pub fn new(bytes: &'a [u8], num_pages: u64) -> Result<Self, WireError> {
        let expected = words(num_pages) * BITMAP_WORD_SIZE;
        if bytes.len() as u64 != expected {
            return Err(WireError::InvalidField {
                field: "mapped-ram bitmap length",
                value: bytes.len() as u64,
                reason: "not the bitmap size of the block",
            });
        }
        Ok(Self { bytes, num_pages })
    }

    /// A view of `bytes` as the bitmap of the block laid out as `layout`.
    pub fn for_layout(bytes: &'a [u8], layout: &BlockLayout) -> Result<Self, WireError> {
        Self::new(bytes, layout.num_pages())
    }

    /// Pages the bitmap covers.
    pub fn num_pages(&self) -> u64 {
        self.num_pages
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Whether page `page` has data in the file; `None` past the last page.
    pub fn get(&self, page: u64) -> Option<bool> {
        (page < self.num_pages).then(|| self.bytes[(page / 8) as usize] & (1 << (page % 8)) != 0)
    }

    /// Number of pages with data.
    pub fn count_present(&self) -> u64 {
        self.runs().map(|r| r.end - r.start).sum()
    }

    /// Whether bits past the last page are set. QEMU never sets them and
    /// ignores them when loading; so does [`runs`](Self::runs).
    pub fn has_stray_bits(&self) -> bool {
        let n = words(self.num_pages);
        n > 0 && self.word(n - 1) & !valid_mask(self.num_pages - (n - 1) * PAGES_PER_WORD) != 0
    }

    /// The maximal runs of consecutive present pages, in increasing order,
    /// as page index ranges.
    pub fn runs(&self) -> Runs<'a> {
        Runs {
            bitmap: *self,
            next: 0,
        }
    }

    /// Word `i` (little-endian).
    fn word(&self, i: u64) -> u64 {
        let at = (i * BITMAP_WORD_SIZE) as usize;
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(w)
    }

    /// The first page at or after `from` whose bit equals `set`, or
    /// `num_pages` if there is none.
    fn find(&self, from: u64, set: bool) -> u64 {
        let n = self.num_pages;
        if from >= n {
            return n;
        }
        let flip = if set { 0 } else { u64::MAX };
        let mut i = from / PAGES_PER_WORD;
        let mut w = (self.word(i) ^ flip) & (u64::MAX << (from % PAGES_PER_WORD));
        loop {
            if w != 0 {
                return (i * PAGES_PER_WORD + u64::from(w.trailing_zeros())).min(n);
            }
            i += 1;
            if i * PAGES_PER_WORD >= n {
                return n;
            }
            w = self.word(i) ^ flip;
        }
    }
}

/// Mask of the low `bits` bits (1..=64) of a word.
fn valid_mask(bits: u64) -> u64 {
    if bits >= PAGES_PER_WORD {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Iterator over the runs of present pages of a [`Bitmap`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    bitmap: Bitmap<'a>,
    next: u64,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bitmap.find(self.next, true);
        if start >= self.bitmap.num_pages {
            self.next = start;
            return None;
        }
        let end = self.bitmap.find(start + 1, false);
        self.next = end;
        Some(start..end)
    }
}

/// An owned bitmap to fill while saving: all pages absent at first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapBuf {
    bytes: Vec<u8>,
    num_pages: u64,
}

impl BitmapBuf {
    /// An empty bitmap for a block of `used_length` bytes (a non-zero
    /// multiple of the page size). Allocates [`bitmap_len`] bytes at once:
    /// meant for a writer's own blocks. A reader gets the bitmap's bytes
    /// from the file (bounded by the file's length) and views them with
    /// [`Bitmap`].
    pub fn for_length(used_length: u64) -> Result<Self, WireError> {
        let len =
            usize::try_from(bitmap_len(used_length)?).map_err(|_| WireError::InvalidField {
                field: "RAM block used_length",
                value: used_length,
                reason: "bitmap does not fit in memory",
            })?;
        Ok(Self {
            bytes: vec![0; len],
            num_pages: used_length / PAGE_SIZE_U64,
        })
    }

    /// Marks page `page` present or absent. Fails past the last page.
    pub fn set(&mut self, page: u64, present: bool) -> Result<(), WireError> {
        if page >= self.num_pages {
            return Err(WireError::InvalidField {
                field: "page index",
                value: page,
                reason: "past the end of the block",
            });
        }
        let bit = 1u8 << (page % 8);
        let byte = &mut self.bytes[(page / 8) as usize];
        if present {
            *byte |= bit;
        } else {
            *byte &= !bit;
        }
        Ok(())
    }

    /// A read-only view.
    pub fn view(&self) -> Bitmap<'_> {
        Bitmap {
            bytes: &self.bytes,
            num_pages: self.num_pages,
        }
    }

    /// The bytes to write at the block's bitmap offset.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

// ---------------------------------------------------------------------------
// Block list

/// Matches the RAM blocks listed in a stream against the local ones: every
/// listed block must exist here with the same length. Returns, for each
/// listed block in order, the index of the local block it names. Local
/// blocks the stream does not list are allowed (QEMU allows them too; they
/// keep their contents).
///
/// Stricter than a QEMU 10.0 destination with mapped-ram, which does not
/// compare lengths at all: a shorter listed block loads partly, a longer
/// one fails only if a page past the local end is present.
pub fn match_blocks(
    listed: &[RamBlockInfo],
    local: &[RamBlockInfo],
) -> Result<Vec<usize>, WireError> {
    let by_name: HashMap<&str, usize> = local
        .iter()
        .enumerate()
        .map(|(i, b)| (b.idstr.as_str(), i))
        .collect();
    listed
        .iter()
        .map(|b| {
            let &i = by_name
                .get(b.idstr.as_str())
                .ok_or_else(|| WireError::UnknownRamBlock {
                    name: b.idstr.clone(),
                })?;
            if local[i].used_length != b.used_length {
                return Err(WireError::RamBlockLengthMismatch {
                    name: b.idstr.clone(),
                    listed: b.used_length,
                    local: local[i].used_length,
                });
            }
            Ok(i)
        })
        .collect()
}

#[cfg(test)]
mod tests;
