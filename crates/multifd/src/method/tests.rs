//! Round trips of every method over a real socket pair.

use std::os::unix::net::UnixStream;

use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{
    Compression, RAM_PACKET_HEADER_SIZE, RamPacketEncoder, RamPacketHeader,
};

use super::*;
use crate::ram::RamBlock;
use crate::transport::Connection;

fn cfg(compression: Compression) -> MethodConfig {
    MethodConfig {
        compression,
        ..MethodConfig::default()
    }
}

/// Both ends of a connected socket pair.
fn pair() -> (Connection, Connection) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        Connection::from_unix_for_tests(a),
        Connection::from_unix_for_tests(b),
    )
}

/// The header of a packet of block `m0` whose pages (all data) are at
/// `offsets`, with a payload of `size` bytes.
fn header(compression: Compression, offsets: &[u64], size: u32) -> [u8; RAM_PACKET_HEADER_SIZE] {
    let mut hdr = [0u8; RAM_PACKET_HEADER_SIZE];
    RamPacketEncoder {
        compression,
        sync: false,
        packet_num: 0,
        ramblock: "m0",
        offsets,
        normal_pages: offsets.len(),
        next_packet_size: size,
    }
    .encode(&mut hdr)
    .unwrap();
    hdr
}

/// Whether page `p` holds the same bytes in `a` and in `b`.
fn same_page(a: &RamBlock, b: &RamBlock, p: u64) -> bool {
    let (mut x, mut y) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
    a.read_page(p * 4096, &mut x).unwrap();
    b.read_page(p * 4096, &mut y).unwrap();
    x == y
}

fn fill(block: &RamBlock, seed: u8) {
    for p in 0..block.pages() {
        let mut page = [0u8; PAGE_SIZE];
        match p % 3 {
            0 => {}
            1 => page
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 7) as u8 ^ seed),
            _ => page.iter_mut().enumerate().for_each(|(i, b)| {
                *b = ((i as u64 * 2_654_435_761 + p * 97 + u64::from(seed)) >> 7) as u8;
            }),
        }
        block.write_page(p * PAGE_SIZE as u64, &page).unwrap();
    }
}

/// Where the sender takes the pages from.
#[derive(Clone, Copy, Debug)]
enum From {
    /// The guest mapping of anonymous memory.
    Mapping,
    /// Copies read through the block's file (a RAM file).
    File,
}

fn round_trip(compression: Compression, from: From) {
    let cfg = cfg(compression);
    let dir = tempfile::tempdir().unwrap();
    let src = match from {
        From::Mapping => RamBlock::anonymous("m0", 300 * 4096).unwrap(),
        From::File => RamBlock::create_file("m0", &dir.path().join("ram"), 300 * 4096).unwrap(),
    };
    let dst = RamBlock::anonymous("m0", 300 * 4096).unwrap();
    let (mut tx, mut rx) = pair();
    let mut send = new_send(&cfg).unwrap();
    let mut recv = new_recv(&cfg, 0).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Several packets, so the stream state carries across packets.
            for seed in 0..3u8 {
                fill(&src, seed);
                for chunk in (0..300u64).collect::<Vec<_>>().chunks(128) {
                    let offsets: Vec<u64> = chunk.iter().map(|p| p * 4096).collect();
                    let mut iovs = Vec::new();
                    let mut batch = crate::ram::PageBatch::new(&src, offsets.len());
                    offsets.iter().for_each(|&o| batch.push(o).unwrap());
                    let mut staging = crate::ram::Staging::default();
                    let mut order = Vec::new();
                    let pages = match from {
                        From::Mapping => DataPages::Guest(src.page_list(&offsets).unwrap()),
                        From::File => {
                            // Without zero-page detection: every page, in order.
                            let n = staging.read(&batch, false, &mut order).unwrap().unwrap();
                            assert_eq!((n, &order), (offsets.len(), &offsets));
                            DataPages::Own(&staging)
                        }
                    };
                    let size = send.prepare(pages, &mut iovs).unwrap();
                    let hdr = header(compression, &offsets, size);
                    iovs.insert(0, crate::transport::IoSlice::new(&hdr));
                    tx.writev_all(&mut iovs).unwrap();
                }
                // Wait for the receiver before changing the source pages.
                let mut ack = [0u8; 1];
                std::io::Read::read_exact(&mut tx, &mut ack).unwrap();
            }
        });
        for _ in 0..3 {
            for _ in 0..3 {
                let mut hdr = vec![0u8; RAM_PACKET_HEADER_SIZE];
                assert!(rx.read_exact_or_eof(&mut hdr).unwrap());
                let h = RamPacketHeader::decode(&hdr).unwrap();
                let pages = dst.page_list(h.normal()).unwrap();
                recv.load(&h, pages, &mut rx).unwrap();
            }
            for p in 0..300u64 {
                assert!(
                    same_page(&src, &dst, p),
                    "page {p} differs ({compression}, {from:?})"
                );
            }
            std::io::Write::write_all(&mut rx, &[1]).unwrap();
        }
    });
}

#[test]
fn nocomp_round_trip() {
    round_trip(Compression::None, From::Mapping);
    round_trip(Compression::None, From::File);
}

#[test]
fn zlib_round_trip() {
    round_trip(Compression::Zlib, From::Mapping);
    round_trip(Compression::Zlib, From::File);
}

#[test]
fn zstd_round_trip() {
    round_trip(Compression::Zstd, From::Mapping);
    round_trip(Compression::Zstd, From::File);
}

#[test]
fn corrupt_zlib_payload_is_a_typed_error() {
    let dst = RamBlock::anonymous("m0", 4096).unwrap();
    let err = load_into(Compression::Zlib, &dst, &[0], &[0x55; 100]).unwrap_err();
    assert!(matches!(err, crate::error::Error::Corrupt { .. }), "{err}");
}

/// The payload `compression` makes of the source pages `pages` (indices)
/// as the first packet of a channel.
fn payload_of(compression: Compression, src: &RamBlock, pages: &[u64]) -> Vec<u8> {
    let offsets: Vec<u64> = pages.iter().map(|p| p * 4096).collect();
    let (mut tx, mut rx) = pair();
    let mut send = new_send(&cfg(compression)).unwrap();
    let mut iovs = Vec::new();
    let n = send
        .prepare(
            DataPages::Guest(src.page_list(&offsets).unwrap()),
            &mut iovs,
        )
        .unwrap();
    tx.writev_all(&mut iovs).unwrap();
    let mut out = vec![0u8; n as usize];
    std::io::Read::read_exact(&mut rx, &mut out).unwrap();
    out
}

/// Loads `payload` as the first packet of a channel for the pages `pages`
/// (indices) of `dst`.
fn load_into(
    compression: Compression,
    dst: &RamBlock,
    pages: &[u64],
    payload: &[u8],
) -> crate::error::Result<()> {
    let mut recv = new_recv(&cfg(compression), 1).unwrap();
    load_with(&mut *recv, compression, dst, pages, payload)
}

/// Loads `payload` as the next packet of `recv` for the pages `pages`
/// (indices) of `dst`.
pub(super) fn load_with(
    recv: &mut dyn RecvMethod,
    compression: Compression,
    dst: &RamBlock,
    pages: &[u64],
    payload: &[u8],
) -> crate::error::Result<()> {
    let offsets: Vec<u64> = pages.iter().map(|p| p * 4096).collect();
    let (mut tx, mut rx) = pair();
    std::io::Write::write_all(&mut tx, payload).unwrap();
    let hdr = header(compression, &offsets, payload.len() as u32);
    let h = RamPacketHeader::decode(&hdr).unwrap();
    recv.load(&h, dst.page_list(h.normal()).unwrap(), &mut rx)
}

#[test]
fn a_bad_payload_errors_without_touching_other_pages() {
    // The packet's pages are 2, 3 (a run) and 6 of a block of 8 whose
    // other pages hold a sentinel; whatever the payload, they keep it and
    // no page of the packet is marked received.
    let src = RamBlock::anonymous("m0", 8 * 4096).unwrap();
    fill(&src, 5);
    let packet = [2u64, 3, 6];
    for compression in [Compression::Zstd, Compression::Zlib] {
        let good = payload_of(compression, &src, &packet);
        let longer = payload_of(compression, &src, &[0, 1, 2, 4, 5, 7]);
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid..].iter_mut().for_each(|b| *b ^= 0x5a);
        let cases: [(&str, Vec<u8>); 4] = [
            ("short", good[..good.len() / 2].to_vec()),
            ("garbage", vec![0x55; 300]),
            ("corrupt", flipped),
            ("more pages than the packet", longer),
        ];
        for (what, payload) in cases {
            let dst = RamBlock::anonymous("m0", 8 * 4096).unwrap();
            for p in [0u64, 1, 4, 5, 7] {
                dst.write_page(p * 4096, &[0xa5; PAGE_SIZE]).unwrap();
            }
            let err = load_into(compression, &dst, &packet, &payload)
                .expect_err(&format!("{compression} {what}"));
            assert!(
                matches!(err, crate::error::Error::Corrupt { .. }),
                "{compression} {what}: {err}"
            );
            for p in [0u64, 1, 4, 5, 7] {
                let mut page = [0u8; PAGE_SIZE];
                dst.read_page(p * 4096, &mut page).unwrap();
                assert!(
                    page == [0xa5; PAGE_SIZE],
                    "{compression} {what}: page {p} written"
                );
            }
            assert_eq!(dst.received_pages(), 5, "{compression} {what}");
        }
        // The good payload still loads, into exactly its pages.
        let dst = RamBlock::anonymous("m0", 8 * 4096).unwrap();
        load_into(compression, &dst, &packet, &good).unwrap();
        for p in 0..8u64 {
            // Pages outside the packet differ, but where the source's is
            // zero.
            let mut x = [0u8; PAGE_SIZE];
            src.read_page(p * 4096, &mut x).unwrap();
            assert_eq!(
                same_page(&src, &dst, p),
                packet.contains(&p) || x == [0; PAGE_SIZE],
                "page {p}"
            );
        }
        assert_eq!(dst.received_pages(), 3, "{compression}");
    }
}

#[test]
fn runs_of_zero_only_packets_load() {
    // A packet of zero pages only has an empty payload (QEMU sends such
    // runs, before the first data packet too); none may upset the stream.
    let src = RamBlock::anonymous("m0", 8 * 4096).unwrap();
    fill(&src, 9);
    for compression in [Compression::Zstd, Compression::Zlib] {
        let good = payload_of(compression, &src, &[1, 2]);
        let dst = RamBlock::anonymous("m0", 8 * 4096).unwrap();
        let mut recv = new_recv(&cfg(compression), 1).unwrap();
        for _ in 0..40 {
            load_with(&mut *recv, compression, &dst, &[], &[]).unwrap();
        }
        load_with(&mut *recv, compression, &dst, &[1, 2], &good).unwrap();
        for _ in 0..40 {
            load_with(&mut *recv, compression, &dst, &[], &[]).unwrap();
        }
        for p in [1u64, 2] {
            assert!(same_page(&src, &dst, p), "{compression}: page {p}");
        }
    }
}
