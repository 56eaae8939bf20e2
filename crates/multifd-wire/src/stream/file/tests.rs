//! Tests of the mapped-ram file decoder and encoders: whole files built in
//! memory, then read back as a reader of the file would.

use super::*;
use crate::mapped_ram::{Bitmap, BitmapBuf, check_file_layout};
use crate::stream::{Command, Configuration, check_tail, encode};

/// The first 0x80 bytes of a file QEMU 10.0.2 wrote for a `-M none` guest
/// with a 64 MiB backend `m0` (`migrate file:…` with mapped-ram and
/// multifd): header, configuration, START of "ram" (section 1), MEM_SIZE,
/// block `m0` and its mapped-ram header. The bitmap follows at 0x80.
const CAPTURED_NONE_HEAD: &str = "
    5145564d00000003 07000000046e6f6e65 051a636f6e66696775726174696f6e2f
    6361706162696c6974696573 00000001 00000001 0a6d61707065642d72616d
    01 00000001 0372616d 00000000 00000004 0000000004000004
    026d30 0000000004000000
    00000001 0000000000001000 0000000000000080 0000000000100000";

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A RAM block to put in a test file: `Some(fill)` is a page of that byte,
/// `None` a zero page (absent from the bitmap, a hole in the file).
struct TestBlock {
    name: &'static str,
    pages: Vec<Option<u8>>,
}

impl TestBlock {
    fn info(&self) -> RamBlockInfo {
        RamBlockInfo {
            idstr: self.name.into(),
            used_length: self.pages.len() as u64 * PAGE_SIZE_U64,
        }
    }
}

fn mapped_ram_config(machine: &str) -> Configuration {
    Configuration {
        machine: machine.into(),
        capabilities: vec!["mapped-ram".into()],
        ..Configuration::default()
    }
}

/// The ram section id used by the test files.
const RAM: u32 = 1;

/// A whole mapped-ram file laid out as QEMU 10.0 does, the main stream
/// starting at `start` (bytes before it are 0xEE): header, configuration,
/// START with the block list (bitmaps and pages in place), EOS, one PART,
/// SWITCHOVER_START, END, one FULL section, EOF, vmdesc `{}`.
fn build_file(
    start: u64,
    cfg: &Configuration,
    blocks: &[TestBlock],
) -> (Vec<u8>, Vec<BlockLayout>) {
    let mut out = vec![0xee; start as usize];
    encode::header(&mut out);
    encode::configuration(&mut out, cfg).unwrap();
    encode::section_start(&mut out, RAM, "ram", 0, 4).unwrap();
    let infos: Vec<RamBlockInfo> = blocks.iter().map(TestBlock::info).collect();
    mem_size_header(&mut out, &infos).unwrap();
    let mut layouts = Vec::new();
    for (block, info) in blocks.iter().zip(&infos) {
        let at = out.len() as u64;
        let layout = block_entry(&mut out, at, info).unwrap();
        assert_eq!(out.len() as u64, layout.bitmap_offset());
        out.resize(layout.next_offset() as usize, 0);
        let mut bitmap = BitmapBuf::for_length(info.used_length).unwrap();
        for (k, page) in block.pages.iter().enumerate() {
            if let Some(fill) = page {
                bitmap.set(k as u64, true).unwrap();
                let at = layout.page_offset(k as u64).unwrap() as usize;
                out[at..at + 4096].fill(*fill);
            }
        }
        let r = layout.bitmap_range();
        out[r.start as usize..r.end as usize].copy_from_slice(bitmap.as_bytes());
        layouts.push(layout);
    }
    encode::eos(&mut out);
    encode::section_footer(&mut out, RAM);
    encode::section_part(&mut out, RAM);
    encode::eos(&mut out);
    encode::section_footer(&mut out, RAM);
    encode::command(&mut out, Command::SwitchoverStart);
    encode::section_end(&mut out, RAM);
    encode::eos(&mut out);
    encode::section_footer(&mut out, RAM);
    encode::section_full(&mut out, 0, "timer", 0, 2).unwrap();
    out.extend_from_slice(&[0; 24]);
    encode::section_footer(&mut out, 0);
    encode::eof(&mut out);
    encode::vmdesc(&mut out, b"{}").unwrap();
    (out, layouts)
}

/// Three blocks: one with runs across a bitmap word boundary and zero
/// pages, one fully present, one all zero.
fn test_blocks() -> Vec<TestBlock> {
    let m0 = (0..100u8)
        .map(|k| (k % 5 != 1 && !(10..20).contains(&k)).then_some(k + 1))
        .collect();
    vec![
        TestBlock {
            name: "m0",
            pages: m0,
        },
        TestBlock {
            name: "pc.bios",
            pages: vec![Some(0xb1), Some(0xb2), Some(0xb3)],
        },
        TestBlock {
            name: "/rom@etc/acpi/rsdp",
            pages: vec![None],
        },
    ]
}

/// How [`walk`] ended.
#[derive(Debug, PartialEq)]
enum End {
    /// The file ended (or the decoder jumped past its end) mid-item.
    NeedMore,
    /// The device-state tail starts at this file offset.
    DeviceTail(u64),
    /// The decoder refused the bytes.
    Error(WireError),
}

/// Reads `file` with `dec` as a reader of the file would: the buffer
/// always starts at the decoder's position and grows by `chunk` bytes
/// whenever the decoder asks for more.
fn walk<'a>(file: &'a [u8], mut dec: FileDecoder, chunk: usize) -> (Vec<FileEvent<'a>>, End) {
    let mut events = Vec::new();
    loop {
        let pos = dec.position();
        let Some(rest) = usize::try_from(pos).ok().and_then(|p| file.get(p..)) else {
            return (events, End::NeedMore);
        };
        let mut avail = chunk.min(rest.len());
        let (event, consumed) = loop {
            match dec.decode(&rest[..avail]) {
                Ok(FileDecoded::NeedMore { at_least }) => {
                    assert!(at_least > avail);
                    assert_eq!(dec.position(), pos, "NeedMore moved the position");
                    if avail == rest.len() {
                        return (events, End::NeedMore);
                    }
                    avail = avail.saturating_add(chunk).min(rest.len());
                }
                Ok(FileDecoded::Item { event, consumed }) => break (event, consumed),
                Err(e) => {
                    assert_eq!(dec.position(), pos, "an error moved the position");
                    return (events, End::Error(e));
                }
            }
        };
        assert!(consumed <= avail);
        match &event {
            FileEvent::Block { layout, .. } => assert_eq!(dec.position(), layout.next_offset()),
            FileEvent::Stream(Event::DeviceTail) => {
                assert_eq!(consumed, 0);
                events.push(event);
                return (events, End::DeviceTail(pos));
            }
            _ => {
                assert!(consumed > 0);
                assert_eq!(dec.position(), pos + consumed as u64);
            }
        }
        events.push(event);
    }
}

fn expected_events<'a>(
    cfg: &Configuration,
    blocks: &[TestBlock],
    layouts: &[BlockLayout],
) -> Vec<FileEvent<'a>> {
    let s = FileEvent::Stream;
    let mut ev = vec![
        s(Event::Header),
        s(Event::Configuration(cfg.clone())),
        s(Event::RamStart { section_id: RAM }),
        FileEvent::MemSize {
            total: blocks.iter().map(|b| b.info().used_length).sum(),
        },
    ];
    for (b, l) in blocks.iter().zip(layouts) {
        ev.push(FileEvent::Block {
            block: b.info(),
            layout: *l,
        });
    }
    ev.extend([
        s(Event::Eos),
        s(Event::Footer { section_id: RAM }),
        s(Event::RamPart { section_id: RAM }),
        s(Event::Eos),
        s(Event::Footer { section_id: RAM }),
        s(Event::Command(Command::SwitchoverStart)),
        s(Event::RamEnd { section_id: RAM }),
        s(Event::Eos),
        s(Event::Footer { section_id: RAM }),
        s(Event::DeviceTail),
    ]);
    ev
}

#[test]
fn builder_matches_the_captured_head() {
    let blocks = [TestBlock {
        name: "m0",
        pages: vec![None; 0x4000],
    }];
    let (file, layouts) = build_file(0, &mapped_ram_config("none"), &blocks);
    assert_eq!(file[..0x80], unhex(CAPTURED_NONE_HEAD));
    assert_eq!(layouts[0].pages_offset(), 0x10_0000);
}

#[test]
fn whole_files_round_trip_at_any_start_offset() {
    let cfg = mapped_ram_config("pc-q35-10.0");
    let blocks = test_blocks();
    for start in [0, 4096, (1 << 20) + 3] {
        let (file, layouts) = build_file(start, &cfg, &blocks);
        assert!(layouts.iter().all(BlockLayout::is_canonical));
        assert!(layouts.iter().all(|l| l.pages_offset() % (1 << 20) == 0));
        assert_eq!(check_file_layout(&layouts, file.len() as u64), Ok(()));
        let want = expected_events(&cfg, &blocks, &layouts);
        let dec = FileDecoder::new(start).with_file_len(file.len() as u64);
        let (events, end) = walk(&file, dec.clone(), usize::MAX);
        assert_eq!(events, want, "start {start}");
        let End::DeviceTail(tail) = end else {
            panic!("{end:?}")
        };
        assert_eq!(check_tail(&file[tail as usize..]), Ok(Some(&b"{}"[..])));
        for chunk in [1, 7, 100] {
            assert_eq!(
                walk(&file, dec.clone(), chunk),
                (want.clone(), End::DeviceTail(tail)),
                "chunk {chunk}"
            );
        }
        // The pages are where the bitmap says, the rest of each region is zero.
        for (block, layout) in blocks.iter().zip(&layouts) {
            let r = layout.bitmap_range();
            let bitmap =
                Bitmap::for_layout(&file[r.start as usize..r.end as usize], layout).unwrap();
            let mut present = vec![None; block.pages.len()];
            for run in bitmap.runs() {
                let fr = layout.pages_file_range(run.clone()).unwrap();
                for (k, page) in run.zip(file[fr.start as usize..fr.end as usize].chunks(4096)) {
                    assert!(page.iter().all(|&b| b == page[0]));
                    present[k as usize] = Some(page[0]);
                }
            }
            assert_eq!(present, block.pages, "{}", block.name);
            let pages = layout.pages_range();
            let zeros = file[pages.start as usize..pages.end as usize]
                .chunks(4096)
                .zip(&block.pages)
                .filter(|(_, p)| p.is_none());
            assert!(zeros.flat_map(|(page, _)| page).all(|&b| b == 0));
        }
    }
}

#[test]
fn block_events_say_where_the_header_was() {
    let (file, layouts) = build_file(4096, &mapped_ram_config("none"), &test_blocks());
    let mut dec = FileDecoder::new(4096);
    let mut positions = Vec::new();
    loop {
        let pos = dec.position();
        let FileDecoded::Item { event, consumed } = dec.decode(&file[pos as usize..]).unwrap()
        else {
            panic!("whole file given")
        };
        if let FileEvent::Block { block, layout } = &event {
            assert_eq!(consumed, 1 + block.idstr.len() + 8 + 28);
            assert_eq!(layout.header_offset(), pos + consumed as u64 - 28);
            positions.push((pos, dec.position()));
        }
        if matches!(event, FileEvent::Stream(Event::DeviceTail)) {
            break;
        }
    }
    assert_eq!(positions[0].1, layouts[0].next_offset());
    assert_eq!(positions[1].0, layouts[0].next_offset());
    assert_eq!(positions[2].0, layouts[1].next_offset());
}

/// The error reading `file` (main stream at 0) with the file length known.
fn error_of(file: &[u8]) -> WireError {
    match walk(
        file,
        FileDecoder::new(0).with_file_len(file.len() as u64),
        usize::MAX,
    )
    .1
    {
        End::Error(e) => e,
        end => panic!("no error: {end:?}"),
    }
}

/// A file of the test blocks, main stream at offset 0, and their layouts.
fn good_file() -> (Vec<u8>, Vec<BlockLayout>) {
    build_file(0, &mapped_ram_config("none"), &test_blocks())
}

fn patch(file: &[u8], at: u64, bytes: &[u8]) -> Vec<u8> {
    let mut f = file.to_vec();
    f[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    f
}

#[test]
fn hostile_headers() {
    let (file, layouts) = good_file();
    let h = layouts[0].header_offset();
    let e = error_of(&patch(&file, h, &2u32.to_be_bytes()));
    assert_eq!(
        e,
        WireError::BadVersion {
            what: "mapped-ram header",
            found: 2,
            expected: 1
        }
    );
    let e = error_of(&patch(&file, h + 4, &8192u64.to_be_bytes()));
    assert!(matches!(
        e,
        WireError::InvalidField {
            field: "mapped-ram page_size",
            value: 8192,
            ..
        }
    ));
    let e = error_of(&patch(&file, h + 20, &0x10_0800u64.to_be_bytes()));
    assert!(matches!(
        e,
        WireError::InvalidField {
            field: "mapped-ram pages_offset",
            ..
        }
    ));
    // Bitmap pointing back into the header.
    let e = error_of(&patch(&file, h + 12, &h.to_be_bytes()));
    assert!(matches!(
        e,
        WireError::RegionOverlap {
            region: "bitmap",
            previous: "header",
            ..
        }
    ));
    // Pages region over the bitmap.
    let e = error_of(&patch(&file, h + 20, &0u64.to_be_bytes()));
    assert!(matches!(
        e,
        WireError::RegionOverlap {
            region: "pages",
            previous: "bitmap",
            ..
        }
    ));
    // Offsets that overflow.
    let e = error_of(&patch(&file, h + 20, &(!0xfffu64).to_be_bytes()));
    assert!(matches!(
        e,
        WireError::RegionOverflow {
            region: "pages",
            ..
        }
    ));
    let e = error_of(&patch(&file, h + 12, &(u64::MAX - 2).to_be_bytes()));
    assert!(matches!(
        e,
        WireError::RegionOverflow {
            region: "bitmap",
            ..
        }
    ));
    // Regions past the end of the file.
    let len = file.len() as u64;
    let moved = patch(&file, h + 12, &(len - 8).to_be_bytes());
    let moved = patch(
        &moved,
        h + 20,
        &(len + 8).next_multiple_of(4096).to_be_bytes(),
    );
    assert_eq!(
        error_of(&moved),
        WireError::RegionPastEof {
            region: "bitmap",
            end: len + 8,
            file_len: len
        }
    );
    let far = (file.len() as u64).next_multiple_of(4096);
    let e = error_of(&patch(&file, h + 20, &far.to_be_bytes()));
    assert!(matches!(
        e,
        WireError::RegionPastEof {
            region: "pages",
            ..
        }
    ));
}

#[test]
fn truncated_files() {
    let (file, layouts) = good_file();
    let l = layouts[0];
    // Cut inside the pages region, inside the bitmap, inside the header.
    for (cut, region) in [
        (l.pages_offset() + 0x1000, "pages"),
        (l.bitmap_offset() + 4, "bitmap"),
    ] {
        let short = &file[..cut as usize];
        assert!(
            matches!(error_of(short), WireError::RegionPastEof { region: r, file_len, .. } if r == region && file_len == cut),
            "cut at {cut:#x}"
        );
        // Without the file length the decoder only finds out at the jump.
        let (events, end) = walk(short, FileDecoder::new(0), usize::MAX);
        assert_eq!(end, End::NeedMore);
        assert!(matches!(events.last(), Some(FileEvent::Block { .. })));
    }
    let short = &file[..l.header_offset() as usize + 27];
    let (events, end) = walk(
        short,
        FileDecoder::new(0).with_file_len(short.len() as u64),
        1,
    );
    assert_eq!(end, End::NeedMore);
    assert!(matches!(events.last(), Some(FileEvent::MemSize { .. })));
    // Every cut of the main stream before the first block ends in NeedMore.
    for cut in 0..l.header_offset() as usize + 28 {
        let (_, end) = walk(&file[..cut], FileDecoder::new(0), usize::MAX);
        assert_eq!(end, End::NeedMore, "cut at {cut}");
    }
    // The tail cut short: the decoder still reaches the device tail, and
    // the tail check finds it incomplete.
    let end_of_list = layouts.last().unwrap().next_offset() as usize;
    let (_, end) = walk(&file[..end_of_list + 3], FileDecoder::new(0), usize::MAX);
    assert_eq!(end, End::NeedMore);
    let cut = &file[..file.len() - 1];
    let (_, End::DeviceTail(tail)) = walk(cut, FileDecoder::new(0), usize::MAX) else {
        panic!("no tail")
    };
    assert!(check_tail(&cut[tail as usize..]).is_err());
}

#[test]
fn hostile_block_lists() {
    let (file, layouts) = good_file();
    let list = layouts[0].header_offset() - 8 - 3 - 8; // the MEM_SIZE record
    let total = (100 + 3 + 1) * 4096u64;
    assert_eq!(
        file[list as usize..list as usize + 8],
        (total | 4).to_be_bytes()
    );
    // The total is smaller than the lengths listed.
    let e = error_of(&patch(&file, list, &((total - 2 * 4096) | 4).to_be_bytes()));
    assert!(matches!(e, WireError::MemSizeMismatch { .. }), "{e:?}");
    // The total is reached early: the next entry is read as a record.
    let e = error_of(&patch(&file, list, &((total - 4096) | 4).to_be_bytes()));
    assert!(matches!(e, WireError::BadFlags { .. }), "{e:?}");
    // The total is larger: the EOS after the last block is read as a name.
    let e = error_of(&patch(&file, list, &((total + 4096) | 4).to_be_bytes()));
    assert!(matches!(e, WireError::BadName { .. }));
    // A MEM_SIZE record with another flag: the ordinary decoder's error.
    let e = error_of(&patch(&file, list, &(total | 4 | 0x20).to_be_bytes()));
    assert!(matches!(e, WireError::BadFlags { .. }));
    // Block lengths: zero, not page-aligned.
    for len in [0u64, 0x1000 * 100 + 1] {
        let e = error_of(&patch(&file, list + 8 + 3, &len.to_be_bytes()));
        assert!(
            matches!(e, WireError::InvalidField { field: "RAM block used_length", value, .. } if value == len)
        );
    }
    // The same block twice.
    let mut dup_blocks = test_blocks();
    dup_blocks[1].name = "m1";
    let (dup, dup_layouts) = build_file(0, &mapped_ram_config("none"), &dup_blocks);
    let f = patch(&dup, dup_layouts[0].next_offset() + 1, b"m0");
    assert_eq!(
        error_of(&f),
        WireError::DuplicateRamBlock { name: "m0".into() }
    );
    // An empty list is fine (QEMU reads it the same way).
    let (empty, _) = build_file(0, &mapped_ram_config("none"), &[]);
    let (events, end) = walk(&empty, FileDecoder::new(0), usize::MAX);
    assert!(matches!(end, End::DeviceTail(_)));
    assert_eq!(events[3], FileEvent::MemSize { total: 0 });
    assert_eq!(events[4], FileEvent::Stream(Event::Eos));
}

#[test]
fn more_than_1024_blocks() {
    // Compact (not QEMU's) layouts keep the file small: pages right after
    // the bitmap, at the next page boundary.
    let mut out = Vec::new();
    encode::header(&mut out);
    encode::configuration(&mut out, &mapped_ram_config("none")).unwrap();
    encode::section_start(&mut out, RAM, "ram", 0, 4).unwrap();
    let n = MAX_RAM_BLOCKS as u64 + 1;
    out.extend_from_slice(&((n * 4096) | 4).to_be_bytes());
    for i in 0..n {
        let name = format!("b{i}");
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&4096u64.to_be_bytes());
        let bitmap = out.len() as u64 + 28;
        let pages = (bitmap + 8).next_multiple_of(4096);
        let h = MappedRamHeader {
            version: 1,
            page_size: 4096,
            bitmap_offset: bitmap,
            pages_offset: pages,
        };
        out.extend_from_slice(&h.encode().unwrap());
        out.resize(pages as usize + 4096, 0);
    }
    encode::eos(&mut out);
    let (events, end) = walk(
        &out,
        FileDecoder::new(0).with_file_len(out.len() as u64),
        usize::MAX,
    );
    assert_eq!(
        end,
        End::Error(WireError::InvalidField {
            field: "RAM block count",
            value: 1025,
            reason: "more than 1024 RAM blocks"
        })
    );
    let blocks = events
        .iter()
        .filter(|e| matches!(e, FileEvent::Block { .. }))
        .count();
    assert_eq!(blocks, MAX_RAM_BLOCKS);
}

#[test]
fn configuration_must_announce_mapped_ram_only() {
    let plain = Configuration {
        machine: "none".into(),
        ..Configuration::default()
    };
    let (file, _) = build_file(0, &plain, &[]);
    assert_eq!(
        error_of(&file),
        WireError::CapabilityMismatch {
            name: "mapped-ram",
            expected: true
        }
    );
    assert_eq!(
        error_of(&file).to_string(),
        "capability \"mapped-ram\" is on here but off in the stream"
    );
    let mut both = mapped_ram_config("none");
    both.capabilities.push("x-ignore-shared".into());
    let (file, _) = build_file(0, &both, &[]);
    assert_eq!(
        error_of(&file),
        WireError::UnsupportedCapability {
            name: "x-ignore-shared".into()
        }
    );
}

#[test]
fn records_a_mapped_ram_stream_cannot_hold() {
    let (file, layouts) = good_file();
    let after = layouts.last().unwrap().next_offset() as usize;
    // FLUSH, ZERO and PAGE records in the START after the list.
    let mut zero = 0x2000u64.to_be_bytes().to_vec();
    zero[7] |= 0x02;
    zero.extend_from_slice(b"\x02m0\x00");
    let mut page = 0x2000u64.to_be_bytes().to_vec();
    page[7] |= 0x08;
    page.extend_from_slice(b"\x02m0");
    page.extend_from_slice(&[1; 4096]);
    for (record, flags) in [
        (0x200u64.to_be_bytes().to_vec(), 0x200),
        (zero, 0x2),
        (page, 0x8),
    ] {
        let mut f = file[..after].to_vec();
        f.extend_from_slice(&record);
        f.extend_from_slice(&file[after..]);
        let e = error_of(&f);
        assert!(
            matches!(e, WireError::UnsupportedRecord { flags: fl, .. } if fl == flags),
            "{e:?}"
        );
    }
    // The START must begin with MEM_SIZE, as in any stream.
    let list = layouts[0].header_offset() - 8 - 3 - 8;
    let e = error_of(&patch(&file, list, &0x10u64.to_be_bytes()));
    assert!(matches!(e, WireError::BadFlags { .. }));
}

#[test]
fn errors_and_need_more_leave_the_decoder_unchanged() {
    let (file, layouts) = good_file();
    let h = layouts[1].header_offset();
    let bad = patch(&file, h, &7u32.to_be_bytes());
    let mut dec = FileDecoder::new(0).with_file_len(file.len() as u64);
    // Decode up to the second block.
    while dec.position() != layouts[0].next_offset() {
        let pos = dec.position() as usize;
        assert!(matches!(
            dec.decode(&file[pos..]),
            Ok(FileDecoded::Item { .. })
        ));
    }
    let pos = dec.position() as usize;
    let before = format!("{dec:?}");
    assert!(dec.decode(&bad[pos..]).is_err());
    assert!(matches!(
        dec.decode(&file[pos..pos + 5]),
        Ok(FileDecoded::NeedMore { .. })
    ));
    assert_eq!(format!("{dec:?}"), before);
    let (events, end) = walk(&file, dec, 3);
    assert!(matches!(end, End::DeviceTail(_)));
    assert!(matches!(&events[0], FileEvent::Block { block, .. } if block.idstr == "pc.bios"));
}

#[test]
fn encoders() {
    // The q35 block `m0` entry at file offset 0x60, as QEMU 10.0.2 wrote it.
    let m0 = RamBlockInfo {
        idstr: "m0".into(),
        used_length: 0x800_0000,
    };
    let mut out = Vec::new();
    let layout = block_entry(&mut out, 0x60, &m0).unwrap();
    assert_eq!(
        out,
        unhex(
            "026d30 0000000008000000 00000001 0000000000001000 0000000000000087 0000000000100000"
        )
    );
    assert_eq!(layout.header_offset(), 0x6b);
    assert_eq!(layout.next_offset(), 0x810_0000);
    // The q35 MEM_SIZE record: total 0x8082000.
    let q35: Vec<RamBlockInfo> = [
        ("m0", 0x800_0000),
        ("/rom@etc/acpi/tables", 0x2_0000),
        ("pc.bios", 0x4_0000),
        ("pc.rom", 0x2_0000),
        ("/rom@etc/table-loader", 0x1000),
        ("/rom@etc/acpi/rsdp", 0x1000),
    ]
    .into_iter()
    .map(|(n, l)| RamBlockInfo {
        idstr: n.into(),
        used_length: l,
    })
    .collect();
    let mut out = Vec::new();
    mem_size_header(&mut out, &q35).unwrap();
    assert_eq!(out, unhex("0000000008082004"));

    // Failures leave the output unchanged.
    let mut out = vec![9];
    let long = "x".repeat(256);
    for bad in [
        RamBlockInfo {
            idstr: String::new(),
            used_length: 0x1000,
        },
        RamBlockInfo {
            idstr: long,
            used_length: 0x1000,
        },
        RamBlockInfo {
            idstr: "m0".into(),
            used_length: 0,
        },
        RamBlockInfo {
            idstr: "m0".into(),
            used_length: 0x1800,
        },
    ] {
        assert!(block_entry(&mut out, 0, &bad).is_err());
        assert!(mem_size_header(&mut out, std::slice::from_ref(&bad)).is_err());
    }
    assert!(matches!(
        block_entry(&mut out, u64::MAX - 5, &m0),
        Err(WireError::RegionOverflow { .. })
    ));
    assert!(matches!(
        block_entry(&mut out, u64::MAX - 0x10_0000, &m0),
        Err(WireError::RegionOverflow { .. })
    ));
    assert!(matches!(
        mem_size_header(&mut out, &[m0.clone(), m0.clone()]),
        Err(WireError::DuplicateRamBlock { .. })
    ));
    let huge = |i: u64| RamBlockInfo {
        idstr: format!("h{i}"),
        used_length: 1 << 63,
    };
    assert!(matches!(
        mem_size_header(&mut out, &[huge(0), huge(1)]),
        Err(WireError::MemSizeMismatch { .. })
    ));
    let many: Vec<RamBlockInfo> = (0..=MAX_RAM_BLOCKS as u64)
        .map(|i| RamBlockInfo {
            idstr: format!("b{i}"),
            used_length: 0x1000,
        })
        .collect();
    assert!(mem_size_header(&mut out, &many).is_err());
    assert!(mem_size_header(&mut out, &many[..MAX_RAM_BLOCKS]).is_ok());
    assert_eq!(out.len(), 1 + 8);
}
