//! Tests of the mapped-ram header, layout and bitmap codecs.

use proptest::prelude::*;

use super::*;

/// Header of block `m0` (128 MiB) of a QEMU 10.0.2 q35 file, at file
/// offset 0x6b.
const Q35_M0_HEADER: [u8; HEADER_SIZE] = [
    0x00, 0x00, 0x00, 0x01, // version 1
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // page size 4096
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x87, // bitmap at 0x87
    0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // pages at 0x100000
];

fn header(bitmap_offset: u64, pages_offset: u64) -> MappedRamHeader {
    MappedRamHeader {
        version: 1,
        page_size: 4096,
        bitmap_offset,
        pages_offset,
    }
}

#[test]
fn captured_header_decodes_and_re_encodes() {
    let h = MappedRamHeader::decode(&Q35_M0_HEADER).unwrap();
    assert_eq!(h, header(0x87, 0x10_0000));
    assert_eq!(h.encode().unwrap(), Q35_M0_HEADER);
    // Trailing bytes (the bitmap) are not part of the header.
    let mut longer = Q35_M0_HEADER.to_vec();
    longer.extend_from_slice(&[0xdd; 8]);
    assert_eq!(MappedRamHeader::decode(&longer).unwrap(), h);

    let layout = BlockLayout::from_header(0x6b, 0x800_0000, &h).unwrap();
    assert_eq!(layout, BlockLayout::compute(0x6b, 0x800_0000).unwrap());
    assert!(layout.is_canonical());
    assert_eq!(layout.header(), h);
    assert_eq!(layout.bitmap_len(), 0x1000);
    assert_eq!(layout.num_pages(), 0x8000);
    assert_eq!(layout.header_range(), 0x6b..0x87);
    assert_eq!(layout.bitmap_range(), 0x87..0x1087);
    assert_eq!(layout.pages_range(), 0x10_0000..0x810_0000);
    assert_eq!(layout.next_offset(), 0x810_0000);
}

/// Layouts QEMU 10.0.2 wrote, as (header offset, used_length, bitmap
/// offset, pages offset): the other q35 blocks, and `-M none` 64 MiB files
/// written with `offset=4096` and `offset=1048576` (the 1 MiB alignment is
/// counted from the start of the file).
#[test]
fn compute_matches_captured_layouts() {
    let captured = [
        (0x810_001d, 0x2_0000, 0x810_0039, 0x820_0000),
        (0x822_0010, 0x4_0000, 0x822_002c, 0x830_0000),
        (0x834_000f, 0x2_0000, 0x834_002b, 0x840_0000),
        (0x842_001e, 0x1000, 0x842_003a, 0x850_0000),
        (0x850_101b, 0x1000, 0x850_1037, 0x860_0000),
        (0x64, 0x400_0000, 0x80, 0x10_0000),
        (0x1064, 0x400_0000, 0x1080, 0x10_0000),
        (0x10_0064, 0x400_0000, 0x10_0080, 0x20_0000),
    ];
    for (at, len, bitmap, pages) in captured {
        let l = BlockLayout::compute(at, len).unwrap();
        assert_eq!(
            (l.bitmap_offset(), l.pages_offset()),
            (bitmap, pages),
            "{at:#x}"
        );
        assert_eq!(
            BlockLayout::from_header(at, len, &header(bitmap, pages)),
            Ok(l)
        );
    }
}

#[test]
fn pages_region_alignment_edges() {
    // The bitmap ends exactly on a 1 MiB boundary: no padding.
    let len = 64 * 4096;
    let at = PAGES_ALIGNMENT - 8 - HEADER_SIZE_U64;
    let l = BlockLayout::compute(at, len).unwrap();
    assert_eq!(l.pages_offset(), PAGES_ALIGNMENT);
    // One byte later: the pages move to the next boundary.
    let l = BlockLayout::compute(at + 1, len).unwrap();
    assert_eq!(l.pages_offset(), 2 * PAGES_ALIGNMENT);
    // A bitmap longer than 1 MiB (32 GiB block).
    let l = BlockLayout::compute(0x64, 32 << 30).unwrap();
    assert_eq!(l.bitmap_len(), 1 << 20);
    assert_eq!(l.pages_offset(), 2 * PAGES_ALIGNMENT);
}

#[test]
fn header_rejections() {
    let err = |bytes: &[u8]| MappedRamHeader::decode(bytes).unwrap_err();
    assert_eq!(
        err(&Q35_M0_HEADER[..27]),
        WireError::Truncated {
            what: "mapped-ram header",
            needed: 28,
            available: 27
        }
    );
    assert!(matches!(
        err(&[]),
        WireError::Truncated { available: 0, .. }
    ));
    for version in [0u32, 2, u32::MAX] {
        let mut b = Q35_M0_HEADER;
        b[..4].copy_from_slice(&version.to_be_bytes());
        assert_eq!(
            err(&b),
            WireError::BadVersion {
                what: "mapped-ram header",
                found: version,
                expected: 1
            }
        );
    }
    for page_size in [0u64, 512, 8192, 1 << 21, u64::MAX] {
        let mut b = Q35_M0_HEADER;
        b[4..12].copy_from_slice(&page_size.to_be_bytes());
        assert!(
            matches!(err(&b), WireError::InvalidField { field: "mapped-ram page_size", value, .. } if value == page_size)
        );
    }
    for pages in [0x10_0800u64, 0x10_0001, u64::MAX] {
        let mut b = Q35_M0_HEADER;
        b[20..].copy_from_slice(&pages.to_be_bytes());
        assert!(
            matches!(err(&b), WireError::InvalidField { field: "mapped-ram pages_offset", value, .. } if value == pages)
        );
    }
    // The bitmap offset alone has no alignment rule: QEMU writes odd ones.
    let mut b = Q35_M0_HEADER;
    b[12..20].copy_from_slice(&0x810_0039u64.to_be_bytes());
    assert!(MappedRamHeader::decode(&b).is_ok());

    // The encoder refuses the same headers.
    let bad = MappedRamHeader {
        version: 2,
        ..header(0x87, 0x10_0000)
    };
    assert!(matches!(bad.encode(), Err(WireError::BadVersion { .. })));
    let bad = MappedRamHeader {
        page_size: 8192,
        ..header(0x87, 0x10_0000)
    };
    assert!(matches!(bad.encode(), Err(WireError::InvalidField { .. })));
    assert!(matches!(
        header(0x87, 0x10_0010).encode(),
        Err(WireError::InvalidField { .. })
    ));
}

#[test]
fn layout_rejections() {
    let len = 0x400_0000; // bitmap 0x800 bytes
    let at = 0x64;
    // Bitmap inside the header, or before it.
    for bitmap in [0, at, at + 27] {
        assert_eq!(
            BlockLayout::from_header(at, len, &header(bitmap, 0x10_0000)),
            Err(WireError::RegionOverlap {
                region: "bitmap",
                start: bitmap,
                previous: "header",
                previous_end: 0x80
            })
        );
    }
    // Pages region starting inside the bitmap, or before it.
    for pages in [0, 0x1000] {
        assert_eq!(
            BlockLayout::from_header(at, len, &header(0xf80, pages)),
            Err(WireError::RegionOverlap {
                region: "pages",
                start: pages,
                previous: "bitmap",
                previous_end: 0x1780
            })
        );
    }
    assert!(BlockLayout::from_header(at, len, &header(0xf80, 0x2000)).is_ok());
    // A bitmap far after the header is allowed (only order and overlap are
    // checked), and so is a page-aligned pages region right after it.
    let l = BlockLayout::from_header(at, len, &header(0x2000, 0x3000)).unwrap();
    assert!(!l.is_canonical());
    assert_eq!(l.next_offset(), 0x3000 + len);
    // Overflows, each region in turn.
    assert_eq!(
        BlockLayout::from_header(u64::MAX - 10, len, &header(0, 0)),
        Err(WireError::RegionOverflow {
            region: "header",
            start: u64::MAX - 10,
            len: 28
        })
    );
    assert_eq!(
        BlockLayout::from_header(at, len, &header(u64::MAX - 0x7ff, 0)),
        Err(WireError::RegionOverflow {
            region: "bitmap",
            start: u64::MAX - 0x7ff,
            len: 0x800
        })
    );
    let pages = u64::MAX - 0xfff;
    assert_eq!(
        BlockLayout::from_header(at, 0x2000, &header(0x80, pages)),
        Err(WireError::RegionOverflow {
            region: "pages",
            start: pages,
            len: 0x2000
        })
    );
    // The same checks when computing a layout: the round-up overflows,
    // then the pages region does.
    assert!(matches!(
        BlockLayout::compute(u64::MAX - 0x10_0000, 0x1000),
        Err(WireError::RegionOverflow {
            region: "pages",
            ..
        })
    ));
    let top = u64::MAX - (u64::MAX % PAGES_ALIGNMENT) - PAGES_ALIGNMENT;
    assert!(matches!(
        BlockLayout::compute(top, 2 * PAGES_ALIGNMENT),
        Err(WireError::RegionOverflow { region: "pages", start, .. }) if start == top + PAGES_ALIGNMENT
    ));
    assert!(BlockLayout::compute(top, 0x1000).is_ok());
    // Lengths.
    for bad_len in [0, 0x800, 0x1001] {
        assert!(matches!(
            BlockLayout::compute(at, bad_len),
            Err(WireError::InvalidField {
                field: "RAM block used_length",
                ..
            })
        ));
        assert!(matches!(
            BlockLayout::from_header(at, bad_len, &header(0x80, 0x10_0000)),
            Err(WireError::InvalidField {
                field: "RAM block used_length",
                ..
            })
        ));
        assert!(bitmap_len(bad_len).is_err());
    }
    // A header that fails its own checks.
    let v2 = MappedRamHeader {
        version: 2,
        ..header(0x80, 0x10_0000)
    };
    assert!(matches!(
        BlockLayout::from_header(at, len, &v2),
        Err(WireError::BadVersion { .. })
    ));
}

#[test]
fn regions_within_the_file() {
    let l = BlockLayout::compute(0x64, 0x400_0000).unwrap();
    let end = l.next_offset();
    assert_eq!(l.check_within(end), Ok(()));
    assert_eq!(l.check_within(u64::MAX), Ok(()));
    assert_eq!(
        l.check_within(end - 1),
        Err(WireError::RegionPastEof {
            region: "pages",
            end,
            file_len: end - 1
        })
    );
    assert_eq!(
        l.check_within(0x87f),
        Err(WireError::RegionPastEof {
            region: "bitmap",
            end: 0x880,
            file_len: 0x87f
        })
    );
    assert_eq!(
        l.check_within(0x70),
        Err(WireError::RegionPastEof {
            region: "header",
            end: 0x80,
            file_len: 0x70
        })
    );
}

#[test]
fn file_layout_overlaps() {
    let a = BlockLayout::compute(0x62, 0x800_0000).unwrap();
    let b = BlockLayout::compute(a.next_offset() + 0x1d, 0x2_0000).unwrap();
    let file_len = b.next_offset() + 0x1000;
    assert_eq!(check_file_layout(&[a, b], file_len), Ok(()));
    assert_eq!(
        check_file_layout(&[b, a], file_len),
        Ok(()),
        "order does not matter"
    );
    assert_eq!(check_file_layout(&[], 0), Ok(()));
    assert!(matches!(
        check_file_layout(&[a, b], b.next_offset() - 1),
        Err(WireError::RegionPastEof {
            region: "pages",
            ..
        })
    ));
    // A second block whose header lies inside the first one's pages.
    let inside = BlockLayout::compute(a.pages_offset() + 0x1000, 0x1000).unwrap();
    assert_eq!(
        check_file_layout(&[a, inside], file_len),
        Err(WireError::RegionOverlap {
            region: "header",
            start: inside.header_offset(),
            previous: "pages",
            previous_end: a.next_offset()
        })
    );
    // A second block whose bitmap points into the first one's bitmap.
    let h = header(a.bitmap_offset() + 8, b.pages_offset());
    let sneaky = BlockLayout::from_header(b.header_offset(), b.used_length(), &h);
    // Its own order is wrong already (bitmap before its header) ...
    assert!(matches!(
        sneaky,
        Err(WireError::RegionOverlap {
            region: "bitmap",
            ..
        })
    ));
    // ... and one whose pages region covers another block's header.
    let wide = BlockLayout::from_header(0x64, 0x400_0000, &header(0x80, 0x1000)).unwrap();
    let c = BlockLayout::compute(0x2000, 0x1000).unwrap();
    assert!(matches!(
        check_file_layout(&[wide, c], u64::MAX),
        Err(WireError::RegionOverlap {
            previous: "pages",
            ..
        })
    ));
    // Two identical blocks overlap.
    assert!(matches!(
        check_file_layout(&[a, a], file_len),
        Err(WireError::RegionOverlap { .. })
    ));
}

#[test]
fn page_offsets() {
    let l = BlockLayout::compute(0x64, 0x4000).unwrap();
    assert_eq!(l.page_offset(0), Some(0x10_0000));
    assert_eq!(l.page_offset(3), Some(0x10_3000));
    assert_eq!(l.page_offset(4), None);
    assert_eq!(l.page_offset(u64::MAX), None);
    assert_eq!(l.pages_file_range(1..3), Some(0x10_1000..0x10_3000));
    assert_eq!(l.pages_file_range(0..4), Some(l.pages_range()));
    assert_eq!(l.pages_file_range(0..5), None);
    assert_eq!(l.pages_file_range(2..2), None);
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 3..1;
    assert_eq!(l.pages_file_range(reversed), None);
}

/// First 16 bitmap bytes of a QEMU 10.0.2 `-M none` file whose guest had
/// data only in pages 0, 9, 63, 64, 100 and 127 of the first 128.
const CAPTURED_BITMAP_HEAD: [u8; 16] = [
    0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x80,
];

#[test]
fn captured_bitmap_is_little_endian_words() {
    let b = Bitmap::new(&CAPTURED_BITMAP_HEAD, 128).unwrap();
    let present: Vec<u64> = (0..128).filter(|&k| b.get(k) == Some(true)).collect();
    assert_eq!(present, [0, 9, 63, 64, 100, 127]);
    assert_eq!(
        b.runs().collect::<Vec<_>>(),
        [0..1, 9..10, 63..65, 100..101, 127..128]
    );
    assert_eq!(b.count_present(), 6);
    assert_eq!(b.get(128), None);
    assert!(!b.has_stray_bits());
}

#[test]
fn bitmap_runs() {
    // "data, zero, data, data" repeated: 0xDD bytes.
    let bytes = [0xdd; 8];
    let b = Bitmap::new(&bytes, 64).unwrap();
    let runs: Vec<_> = b.runs().take(3).collect();
    assert_eq!(runs, [0..1, 2..5, 6..9]);
    assert_eq!(b.count_present(), 48);

    // A run across a word boundary and one reaching the last page of a
    // block whose page count is not a multiple of 64.
    let mut buf = BitmapBuf::for_length(100 * 4096).unwrap();
    assert_eq!(buf.as_bytes().len(), 16);
    for k in (60..70).chain(97..100) {
        buf.set(k, true).unwrap();
    }
    assert_eq!(buf.view().runs().collect::<Vec<_>>(), [60..70, 97..100]);
    buf.set(65, false).unwrap();
    assert_eq!(
        buf.view().runs().collect::<Vec<_>>(),
        [60..65, 66..70, 97..100]
    );
    assert_eq!(buf.view().count_present(), 12);
    assert_eq!(
        buf.set(100, true),
        Err(WireError::InvalidField {
            field: "page index",
            value: 100,
            reason: "past the end of the block"
        })
    );

    // Bits past the last page are reported but never make a run.
    let mut bytes = buf.as_bytes().to_vec();
    bytes[15] |= 0x80; // page 127, past 100
    let b = Bitmap::new(&bytes, 100).unwrap();
    assert!(b.has_stray_bits());
    assert_eq!(b.runs().collect::<Vec<_>>(), [60..65, 66..70, 97..100]);
    assert_eq!(b.get(127), None);

    // All present, all absent.
    let full = [0xff; 16];
    let b = Bitmap::new(&full, 128).unwrap();
    let mut runs = b.runs();
    assert_eq!((runs.next(), runs.next()), (Some(0..128), None));
    assert!(!b.has_stray_bits());
    let b = Bitmap::new(&full, 65).unwrap();
    let mut runs = b.runs();
    assert_eq!((runs.next(), runs.next()), (Some(0..65), None));
    assert!(b.has_stray_bits());
    let b = Bitmap::new(&[0; 16], 128).unwrap();
    assert_eq!(b.runs().next(), None);
    // The iterator stays finished.
    let mut runs = Bitmap::new(&[1; 8], 1).unwrap().runs();
    assert_eq!(runs.next(), Some(0..1));
    assert_eq!(runs.next(), None);
    assert_eq!(runs.next(), None);
}

#[test]
fn bitmap_length_must_match() {
    assert!(Bitmap::new(&[0; 8], 64).is_ok());
    assert!(Bitmap::new(&[0; 8], 1).is_ok());
    assert!(Bitmap::new(&[], 0).is_ok());
    for (len, pages) in [(7, 1), (9, 64), (8, 65), (16, 64), (0, 1)] {
        assert!(
            matches!(
                Bitmap::new(&vec![0; len], pages),
                Err(WireError::InvalidField {
                    field: "mapped-ram bitmap length",
                    ..
                })
            ),
            "{len} bytes for {pages} pages"
        );
    }
    let l = BlockLayout::compute(0, 0x1000 * 65).unwrap();
    assert!(Bitmap::for_layout(&[0; 16], &l).is_ok());
    assert!(Bitmap::for_layout(&[0; 8], &l).is_err());
    assert!(BitmapBuf::for_length(0).is_err());
    assert!(BitmapBuf::for_length(0x1001).is_err());
}

#[test]
fn block_matching() {
    let b = |name: &str, len: u64| RamBlockInfo {
        idstr: name.into(),
        used_length: len,
    };
    let local = [
        b("pc.bios", 0x4_0000),
        b("m0", 0x800_0000),
        b("pc.rom", 0x2_0000),
    ];
    assert_eq!(
        match_blocks(&[b("m0", 0x800_0000), b("pc.bios", 0x4_0000)], &local),
        Ok(vec![1, 0])
    );
    assert_eq!(match_blocks(&[], &local), Ok(vec![]));
    assert_eq!(
        match_blocks(&[b("m0", 0x800_0000), b("m1", 0x1000)], &local),
        Err(WireError::UnknownRamBlock { name: "m1".into() })
    );
    assert_eq!(
        match_blocks(&[b("m0", 0x400_0000)], &local),
        Err(WireError::RamBlockLengthMismatch {
            name: "m0".into(),
            listed: 0x400_0000,
            local: 0x800_0000
        })
    );
}

proptest! {
    /// Runs, `get` and `count_present` agree with a bit-by-bit reading.
    #[test]
    fn runs_match_a_naive_scan(bytes in proptest::collection::vec(any::<u8>(), 0..40), cut in 0u64..64) {
        let bytes = &bytes[..bytes.len() / 8 * 8];
        // Any page count whose bitmap is exactly these whole words.
        let num_pages = if bytes.is_empty() { 0 } else { bytes.len() as u64 * 8 - cut };
        let b = Bitmap::new(bytes, num_pages).unwrap();
        let naive: Vec<bool> = (0..num_pages).map(|k| bytes[(k / 8) as usize] >> (k % 8) & 1 == 1).collect();
        let mut from_runs = vec![false; num_pages as usize];
        let mut last_end = None;
        for r in b.runs() {
            prop_assert!(r.start < r.end && r.end <= num_pages);
            // Maximal and increasing: a gap of at least one page between runs.
            if let Some(e) = last_end { prop_assert!(r.start > e); }
            last_end = Some(r.end);
            for k in r { from_runs[k as usize] = true; }
        }
        prop_assert_eq!(&from_runs, &naive);
        prop_assert_eq!(b.count_present(), naive.iter().filter(|&&x| x).count() as u64);
        for k in 0..num_pages { prop_assert_eq!(b.get(k), Some(naive[k as usize])); }
        prop_assert_eq!(b.get(num_pages), None);
    }

    /// Every layout computed for any position and length is accepted back
    /// from its header, is canonical, and keeps its regions in order.
    #[test]
    fn computed_layouts_round_trip(at in any::<u64>(), pages in 1u64..(1 << 40)) {
        let len = pages * 4096;
        if let Ok(l) = BlockLayout::compute(at, len) {
            let h = MappedRamHeader::decode(&l.header().encode().unwrap()).unwrap();
            prop_assert_eq!(BlockLayout::from_header(at, len, &h), Ok(l));
            prop_assert!(l.is_canonical());
            prop_assert!(l.header_range().end == l.bitmap_range().start);
            prop_assert!(l.bitmap_range().end <= l.pages_range().start);
            prop_assert!(l.pages_offset() % PAGES_ALIGNMENT == 0);
            prop_assert!(l.pages_offset() - l.bitmap_range().end < PAGES_ALIGNMENT);
            prop_assert_eq!(check_file_layout(&[l], l.next_offset()), Ok(()));
        }
    }

    /// Any header either fails to give a layout or gives one whose regions
    /// are ordered, do not overlap and do not overflow.
    #[test]
    fn arbitrary_headers_give_sane_layouts(at in any::<u64>(), pages in 1u64..(1 << 44), bitmap in any::<u64>(), pages_at in any::<u64>()) {
        let h = header(bitmap, pages_at & !0xfff);
        if let Ok(l) = BlockLayout::from_header(at, pages * 4096, &h) {
            prop_assert!(l.header_range().end <= l.bitmap_range().start);
            prop_assert!(l.bitmap_range().end <= l.pages_range().start);
            prop_assert!(l.pages_range().start <= l.pages_range().end);
            prop_assert_eq!(l.check_within(l.next_offset()), Ok(()));
        }
    }
}
