//! Reads the structure of two mapped-ram files written by QEMU 10.0.2
//! (`tests/data/README.md` says how they were made and what the guest RAM
//! held): main stream, block layouts, bitmaps, and a few pages.

use multifd_wire::mapped_ram::{self, Bitmap, BlockLayout, check_file_layout, match_blocks};
use multifd_wire::stream::file::{FileDecoded, FileDecoder, FileEvent};
use multifd_wire::stream::{Command, Event, RamBlockInfo, check_tail};

/// The non-hole parts of a file.
struct Extents {
    file_len: u64,
    extents: Vec<(u64, Vec<u8>)>,
}

impl Extents {
    fn load(name: &str) -> Self {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let u64_at = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
        assert_eq!(&raw[..8], b"MREXTENT");
        let file_len = u64_at(8);
        let mut extents = Vec::new();
        let mut at = 16;
        while at < raw.len() {
            let (offset, len) = (u64_at(at), u64_at(at + 8) as usize);
            extents.push((offset, raw[at + 16..at + 16 + len].to_vec()));
            at += 16 + len;
        }
        Self { file_len, extents }
    }

    /// The file's bytes from `pos` to the end of the extent holding `pos`
    /// (nothing if `pos` is in a hole).
    fn at(&self, pos: u64) -> &[u8] {
        self.extents
            .iter()
            .find(|(o, b)| (*o..*o + b.len() as u64).contains(&pos))
            .map_or(&[], |(o, b)| &b[(pos - o) as usize..])
    }

    /// Exactly `range` of the file; it must lie in one extent.
    fn range(&self, range: std::ops::Range<u64>) -> &[u8] {
        &self.at(range.start)[..(range.end - range.start) as usize]
    }
}

/// What reading a whole file gave.
struct Walked<'a> {
    events: Vec<FileEvent<'a>>,
    blocks: Vec<(RamBlockInfo, BlockLayout)>,
    tail_json: &'a [u8],
}

/// Reads the file as a restoring reader would: from the start offset,
/// jumping over every pages region, up to the device tail, which must end
/// the file with a vmdesc.
fn walk(file: &Extents, start: u64) -> Walked<'_> {
    let mut dec = FileDecoder::new(start).with_file_len(file.file_len);
    let mut events = Vec::new();
    let mut blocks = Vec::new();
    loop {
        let pos = dec.position();
        let buf = file.at(pos);
        match dec.decode(buf).unwrap() {
            FileDecoded::NeedMore { at_least } => {
                panic!(
                    "need {at_least} bytes at {pos:#x}, the extent has {}",
                    buf.len()
                )
            }
            FileDecoded::Item {
                event: FileEvent::Stream(Event::DeviceTail),
                ..
            } => {
                assert_eq!(pos + buf.len() as u64, file.file_len, "tail is the end");
                let json = check_tail(buf).unwrap().expect("a vmdesc");
                return Walked {
                    events,
                    blocks,
                    tail_json: json,
                };
            }
            FileDecoded::Item { event, .. } => {
                if let FileEvent::Block { block, layout } = &event {
                    blocks.push((block.clone(), *layout));
                }
                events.push(event);
            }
        }
    }
}

/// Whether page `k` of the test pattern held data.
fn pattern_present(k: u64) -> bool {
    if k < 128 {
        [0, 9, 63, 64, 100, 127].contains(&k)
    } else {
        !(4096..8192).contains(&k) && k % 4 != 1
    }
}

/// The events after the block list of a run with `parts` PART sections
/// (how many depends on timing: one per iteration of the source).
fn tail_events<'a>(parts: usize) -> Vec<FileEvent<'a>> {
    let eos = [Event::Eos, Event::Footer { section_id: 1 }];
    let mut ev = eos.to_vec();
    for _ in 0..parts {
        ev.push(Event::RamPart { section_id: 1 });
        ev.extend(eos.clone());
    }
    ev.push(Event::Command(Command::SwitchoverStart));
    ev.push(Event::RamEnd { section_id: 1 });
    ev.extend(eos);
    ev.into_iter().map(FileEvent::Stream).collect()
}

#[test]
fn none_machine_with_offset_4096() {
    let file = Extents::load("mapped-ram-none-offset4096.extents");
    let w = walk(&file, 4096);
    let FileEvent::Stream(Event::Configuration(cfg)) = &w.events[1] else {
        panic!("{:?}", w.events[1])
    };
    assert_eq!(cfg.machine, "none");
    assert_eq!(cfg.capabilities, [mapped_ram::CAPABILITY]);
    assert_eq!(
        w.events[2],
        FileEvent::Stream(Event::RamStart { section_id: 1 })
    );
    assert_eq!(w.events[3], FileEvent::MemSize { total: 0x400_0000 });
    assert_eq!(w.events[5..], tail_events(1));

    let [(m0, layout)] = &w.blocks[..] else {
        panic!("{:?}", w.blocks)
    };
    assert_eq!((m0.idstr.as_str(), m0.used_length), ("m0", 0x400_0000));
    // Absolute offsets: the 1 MiB alignment ignores `offset=`.
    assert_eq!(layout.header_offset(), 0x1064);
    assert_eq!(layout.bitmap_offset(), 0x1080);
    assert_eq!(layout.pages_offset(), 0x10_0000);
    assert_eq!(layout.next_offset(), 0x410_0000);
    assert!(layout.is_canonical());
    check_file_layout(&[*layout], file.file_len).unwrap();

    let bitmap = Bitmap::for_layout(file.range(layout.bitmap_range()), layout).unwrap();
    assert!(!bitmap.has_stray_bits());
    assert_eq!(bitmap.count_present(), 9126);
    for k in 0..bitmap.num_pages() {
        assert_eq!(bitmap.get(k), Some(pattern_present(k)), "page {k}");
    }
    // The six pages kept hold the pattern, at pages_offset + k * 4096.
    let head: Vec<_> = bitmap.runs().take_while(|r| r.start < 128).collect();
    assert_eq!(head, [0..1, 9..10, 63..65, 100..101, 127..129]);
    for k in [0u64, 9, 63, 64, 100, 127] {
        let at = layout.page_offset(k).unwrap();
        let page = file.range(at..at + 4096);
        for word in page.chunks(8) {
            assert_eq!(
                u64::from_le_bytes(word.try_into().unwrap()),
                (k << 16) | 0xA5A5
            );
        }
    }
    // Zero pages are holes that the extents do not hold.
    assert!(file.at(layout.page_offset(1).unwrap()).is_empty());

    let json = std::str::from_utf8(w.tail_json).unwrap();
    assert!(json.starts_with("{\"configuration\"") && json.ends_with('}'));
    assert!(json.contains("\"page_size\": 4096"));
}

#[test]
fn q35_six_blocks() {
    let file = Extents::load("mapped-ram-q35.extents");
    let w = walk(&file, 0);
    let FileEvent::Stream(Event::Configuration(cfg)) = &w.events[1] else {
        panic!("{:?}", w.events[1])
    };
    assert_eq!(cfg.machine, "pc-q35-10.0");
    assert_eq!(w.events[3], FileEvent::MemSize { total: 0x808_2000 });
    assert_eq!(w.events[4 + 6..], tail_events(2));

    // (name, used_length, header offset, pages offset, present pages)
    let want = [
        ("m0", 0x800_0000, 0x6b, 0x10_0000, 21414),
        ("/rom@etc/acpi/tables", 0x2_0000, 0x810_001d, 0x820_0000, 3),
        ("pc.bios", 0x4_0000, 0x822_0010, 0x830_0000, 47),
        ("pc.rom", 0x2_0000, 0x834_000f, 0x840_0000, 0),
        ("/rom@etc/table-loader", 0x1000, 0x842_001e, 0x850_0000, 1),
        ("/rom@etc/acpi/rsdp", 0x1000, 0x850_101b, 0x860_0000, 1),
    ];
    assert_eq!(w.blocks.len(), want.len());
    let mut entry_start = 0x60;
    for ((block, layout), (name, len, header, pages, present)) in w.blocks.iter().zip(want) {
        assert_eq!((block.idstr.as_str(), block.used_length), (name, len));
        assert_eq!(
            (layout.header_offset(), layout.pages_offset()),
            (header, pages),
            "{name}"
        );
        assert!(layout.is_canonical(), "{name}");
        // The next entry starts where the previous pages region ended.
        assert_eq!(
            layout.header_offset() - 1 - name.len() as u64 - 8,
            entry_start
        );
        entry_start = layout.next_offset();
        let bitmap = Bitmap::for_layout(file.range(layout.bitmap_range()), layout).unwrap();
        assert_eq!(bitmap.count_present(), present, "{name}");
        assert!(!bitmap.has_stray_bits(), "{name}");
    }
    let layouts: Vec<BlockLayout> = w.blocks.iter().map(|(_, l)| *l).collect();
    check_file_layout(&layouts, file.file_len).unwrap();
    let m0_bitmap = Bitmap::for_layout(file.range(layouts[0].bitmap_range()), &layouts[0]).unwrap();
    assert!((0..m0_bitmap.num_pages()).all(|k| m0_bitmap.get(k) == Some(pattern_present(k))));

    // The same blocks, in another order, as a destination would have them.
    let mut local: Vec<RamBlockInfo> = w.blocks.iter().map(|(b, _)| b.clone()).collect();
    local.reverse();
    assert_eq!(
        match_blocks(&local, &local.iter().rev().cloned().collect::<Vec<_>>()).unwrap(),
        [5, 4, 3, 2, 1, 0]
    );

    // The vmdesc names the q35 devices, the last one being globalstate.
    let json = std::str::from_utf8(w.tail_json).unwrap();
    assert!(json.starts_with("{\"configuration\"") && json.ends_with('}'));
    assert!(json.contains("\"name\": \"0000:00:1f.0/ICH9LPC\""));
    assert!(json.rfind("\"name\": \"globalstate\"") > json.rfind("\"name\": \"timer\""));
}
