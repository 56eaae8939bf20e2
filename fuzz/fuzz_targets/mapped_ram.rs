//! The mapped-ram codecs over arbitrary bytes: the per-block header and the
//! block layout it gives, the bitmap view, and the decoder of a whole
//! mapped-ram file's main stream (whole and in chunks).
//!
//! Input: one mode byte, then the payload. The payload feeds the header and
//! bitmap checks as is. For the file decoder it is the whole file (mode bit
//! 0 clear) or what follows a fixed prefix (bit 0 set: QEVM header,
//! configuration announcing mapped-ram, START of "ram"), which lets the
//! fuzzer reach the block list without spelling the prefix out. The other
//! mode bits pick a chunk size for the split run.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use multifd_wire::WireError;
use multifd_wire::mapped_ram::{
    Bitmap, BlockLayout, HEADER_SIZE, HEADER_SIZE_U64, MappedRamHeader, PAGES_ALIGNMENT,
    check_file_layout,
};
use multifd_wire::stream::file::{FileDecoded, FileDecoder, FileEvent};
use multifd_wire::stream::{Configuration, Event, check_tail, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    header_and_layout(payload);
    bitmap(payload);
    let owned;
    let file = if mode & 1 == 1 {
        owned = [prefix(), payload].concat();
        &owned[..]
    } else {
        payload
    };
    let whole = walk(file, usize::MAX);
    let byte_by_byte = if file.len() <= 4096 { 1 } else { file.len() };
    for chunk in [byte_by_byte, 1 + usize::from(mode >> 1)] {
        assert_eq!(walk(file, chunk), whole, "chunk size {chunk}");
    }
});

/// QEVM header, configuration `none` with mapped-ram, START of "ram" 1.
fn prefix() -> &'static [u8] {
    static PREFIX: OnceLock<Vec<u8>> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let mut out = Vec::new();
        encode::header(&mut out);
        let cfg = Configuration {
            machine: "none".into(),
            capabilities: vec!["mapped-ram".into()],
            ..Configuration::default()
        };
        encode::configuration(&mut out, &cfg).unwrap();
        encode::section_start(&mut out, 1, "ram", 0, 4).unwrap();
        out
    })
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

/// The first 28 bytes as a header, the next 16 as header offset and
/// used_length.
fn header_and_layout(data: &[u8]) {
    let Some(raw) = data.get(..HEADER_SIZE) else {
        assert!(matches!(
            MappedRamHeader::decode(data),
            Err(WireError::Truncated { .. })
        ));
        return;
    };
    let decoded = MappedRamHeader::decode(raw);
    let fields = MappedRamHeader {
        version: u32::from_be_bytes(raw[..4].try_into().unwrap()),
        page_size: u64_at(raw, 4).unwrap(),
        bitmap_offset: u64_at(raw, 12).unwrap(),
        pages_offset: u64_at(raw, 20).unwrap(),
    };
    match &decoded {
        Ok(h) => {
            assert_eq!(*h, fields);
            assert_eq!(
                h.encode().unwrap()[..],
                raw[..],
                "a header re-encodes as read"
            );
        }
        Err(e) => {
            assert_eq!(fields.check().as_ref(), Err(e));
            assert_eq!(fields.encode().as_ref().map(|_| ()), Err(e));
        }
    }
    let (Some(at), Some(len)) = (u64_at(data, 28), u64_at(data, 36)) else {
        return;
    };
    let computed = BlockLayout::compute(at, len);
    if let Ok(c) = &computed {
        assert_eq!(c.bitmap_offset(), at + HEADER_SIZE_U64);
        assert_eq!(c.pages_offset() % PAGES_ALIGNMENT, 0);
        assert!(c.pages_offset() - c.bitmap_range().end < PAGES_ALIGNMENT);
        assert_eq!(
            BlockLayout::from_header(at, len, &c.header()).as_ref(),
            Ok(c)
        );
        assert!(c.is_canonical());
    }
    if let Ok(l) = BlockLayout::from_header(at, len, &fields) {
        assert!(decoded.is_ok());
        assert_eq!(l.header(), fields);
        assert!(l.header_range().end <= l.bitmap_range().start);
        assert!(l.bitmap_range().end <= l.pages_range().start);
        assert_eq!(l.pages_range().end - l.pages_range().start, len);
        assert_eq!(l.check_within(l.next_offset()), Ok(()));
        assert!(matches!(
            l.check_within(l.next_offset() - 1),
            Err(WireError::RegionPastEof { .. })
        ));
        assert_eq!(check_file_layout(&[l], l.next_offset()), Ok(()));
        assert_eq!(l.is_canonical(), computed.as_ref() == Ok(&l));
        let last = l.num_pages() - 1;
        assert_eq!(l.page_offset(last), Some(l.next_offset() - 4096));
        assert_eq!(l.page_offset(last + 1), None);
    }
}

/// The payload's whole 64-bit words as a bitmap, the mode of its first
/// byte deciding how many pages of the last word count.
fn bitmap(data: &[u8]) {
    let bytes = &data[..(data.len() / 8 * 8).min(4096)];
    let cut = u64::from(data.first().copied().unwrap_or(0) % 64);
    let num_pages = if bytes.is_empty() {
        0
    } else {
        bytes.len() as u64 * 8 - cut
    };
    let b = Bitmap::new(bytes, num_pages).expect("whole words for these pages");
    let bit = |k: u64| bytes[(k / 8) as usize] >> (k % 8) & 1 == 1;
    let mut next = 0;
    let mut count = 0;
    for run in b.runs() {
        assert!(run.start < run.end && run.end <= num_pages);
        assert!(run.start >= next, "runs are sorted and disjoint");
        assert!(run.start == 0 || !bit(run.start - 1), "runs are maximal");
        assert!(run.end == num_pages || !bit(run.end), "runs are maximal");
        assert!((next..run.start).all(|k| !bit(k)));
        assert!(run.clone().all(bit));
        count += run.end - run.start;
        next = run.end;
    }
    assert!((next..num_pages).all(|k| !bit(k)));
    assert_eq!(b.count_present(), count);
    assert_eq!(b.get(num_pages), None);
    assert_eq!(
        b.has_stray_bits(),
        (num_pages..bytes.len() as u64 * 8).any(bit)
    );
}

/// How a walk over a file ended.
#[derive(Debug, PartialEq)]
enum End {
    /// The file ended mid-item (or the decoder jumped past its end).
    NeedMore,
    /// The device tail starts at this offset.
    DeviceTail(u64),
    /// The decoder refused the file.
    Error(WireError),
}

/// Reads `file` as a restoring reader would, buffers growing by `chunk`
/// bytes, checking every block it reports against the file.
fn walk(file: &[u8], chunk: usize) -> (Vec<FileEvent<'_>>, End) {
    let len = file.len() as u64;
    let mut dec = FileDecoder::new(0).with_file_len(len);
    let mut events = Vec::new();
    let mut layouts = Vec::new();
    let end = loop {
        let pos = dec.position();
        let Some(rest) = usize::try_from(pos).ok().and_then(|p| file.get(p..)) else {
            break End::NeedMore;
        };
        let mut avail = chunk.min(rest.len());
        let (event, consumed) = loop {
            match dec.decode(&rest[..avail]) {
                Ok(FileDecoded::NeedMore { at_least }) => {
                    assert!(at_least > avail);
                    assert_eq!(dec.position(), pos);
                    if avail == rest.len() {
                        break (None, 0);
                    }
                    avail = avail.saturating_add(chunk).min(rest.len());
                }
                Ok(FileDecoded::Item { event, consumed }) => break (Some(event), consumed),
                Err(e) => {
                    assert_eq!(dec.position(), pos);
                    return (events, End::Error(e));
                }
            }
        };
        let Some(event) = event else {
            break End::NeedMore;
        };
        assert!(consumed <= avail);
        match &event {
            FileEvent::Block { layout, .. } => {
                assert_eq!(
                    layout.header_offset() + HEADER_SIZE_U64,
                    pos + consumed as u64
                );
                assert_eq!(dec.position(), layout.next_offset());
                assert_eq!(layout.check_within(len), Ok(()));
                let r = layout.bitmap_range();
                let bytes = &file[r.start as usize..r.end as usize];
                let bitmap = Bitmap::for_layout(bytes, layout).expect("bitmap of the block");
                for run in bitmap.runs().take(64) {
                    let fr = layout.pages_file_range(run).expect("run inside the block");
                    assert!(fr.end <= layout.next_offset() && fr.end <= len);
                }
                layouts.push(*layout);
            }
            FileEvent::Stream(Event::DeviceTail) => {
                assert_eq!(consumed, 0);
                let _ = check_tail(rest);
                events.push(event);
                break End::DeviceTail(pos);
            }
            _ => {
                assert!(consumed > 0);
                assert_eq!(dec.position(), pos + consumed as u64);
            }
        }
        events.push(event);
    };
    // Blocks read one after the other never overlap.
    assert_eq!(check_file_layout(&layouts, len), Ok(()));
    (events, end)
}
