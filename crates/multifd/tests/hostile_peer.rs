//! Hostile peers against the real engine over loopback sockets.
//!
//! Receiver side: a test thread connects to `multifd::receive` and
//! writes hand-made bytes (built with the `multifd_wire` encoders, then
//! corrupted, truncated, or never finished). Sender side: a fake receiver
//! accepts `multifd::migrate`'s connections and
//! misbehaves, or a proxy / a SIGKILL breaks a real migration mid-stream.
//!
//! Every case must end in a *typed* error within 5 s, with every engine
//! thread joined and every socket closed (thread and fd counts of the
//! process back at their baseline; the tests of this binary are serialised
//! so those counts are meaningful), and without any write to guest RAM
//! outside the pages a valid packet addressed. Receiver-side cases are
//! `util::Scenario`s, whose `fails()` asserts the common part.

mod util;

use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use multifd::Endpoint;
use multifd::GuestRam;
use multifd::{Cancel, Compression, Error, MigrationConfig, Progress};
use multifd::{Connection, Listener, Uri};
use multifd::{SourceOptions, StaticRam, migrate};
use multifd_wire::WireError;
use multifd_wire::packet::{
    DeviceStateHeader, MULTIFD_MAGIC, RAM_PACKET_HEADER_SIZE, RamPacketHeader, flags,
};
use proptest::prelude::*;
use util::*;

// ---------------------------------------------------------------------------
// Harness (the rest is in `util::scenario`)

/// A receiver of two channels with file-backed RAM, fed a proper main
/// stream setup; channel 0 sends `body` then ends as told, channel 1 stays
/// silent.
fn packet_case(t: Transport, body: &[u8], end: End) -> Outcome {
    Scenario::new(t)
        .channels(2)
        .file_ram()
        .main_setup()
        .channel(0, body, end)
        .silent_channels()
        .fails()
}

fn assert_all_zero(ram: &[u8], what: &str) {
    if let Some(i) = ram.iter().position(|&b| b != 0) {
        panic!("{what}: guest RAM was written at byte {i:#x} although the packet was rejected");
    }
}

fn invalid_field(e: &Error, name: &str) -> bool {
    matches!(e, Error::Wire {
        endpoint: Endpoint::Channel(0),
        source: WireError::InvalidField { field, .. },
    } if *field == name)
}

// ---------------------------------------------------------------------------
// Handshake: classifying connections

#[test]
fn silent_connection_times_out() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t).connect(&[], End::Hold).fails();
        assert_err!(
            o.err,
            Error::HandshakeTimeout {
                endpoint: Endpoint::Unclassified,
                timeout_ms: 300
            },
            "{t:?}"
        );
        assert!(
            o.took >= Duration::from_millis(250),
            "{t:?}: timed out early: {:?}",
            o.took
        );
    }
}

#[test]
fn no_connection_at_all_times_out() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t).accept_timeout(Some(HS)).fails();
        assert_err!(
            o.err,
            Error::HandshakeTimeout {
                endpoint: Endpoint::Main,
                ..
            },
            "{t:?}"
        );
    }
}

#[test]
fn two_bytes_then_silence_times_out() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t).connect(&[0x11, 0x22], End::Hold).fails();
        assert_err!(
            o.err,
            Error::HandshakeTimeout {
                endpoint: Endpoint::Unclassified,
                ..
            },
            "{t:?}"
        );
    }
}

#[test]
fn two_bytes_then_close_is_peer_closed() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t).connect(&[0x11, 0x22], End::Close).fails();
        assert_err!(
            o.err,
            Error::PeerClosed { endpoint: Endpoint::Unclassified, when } if when.contains("handshake"),
            "{t:?}"
        );
    }
}

#[test]
fn close_without_a_byte_is_peer_closed() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t).connect(&[], End::Close).fails();
        assert_err!(
            o.err,
            Error::PeerClosed { endpoint: Endpoint::Unclassified, when } if when.contains("identifying"),
            "{t:?}"
        );
    }
}

#[test]
fn truncated_init_packet() {
    let _g = serial();
    let init = init_packet(UUID, 0);
    for t in TRANSPORTS {
        for cut in [4usize, 5, 24, 63] {
            // Peer closes in the middle of the initial packet.
            let o = Scenario::new(t)
                .main_setup()
                .connect(&init[..cut], End::Close)
                .fails();
            assert_err!(
                o.err,
                Error::PeerClosed { endpoint: Endpoint::Unclassified, when } if when.contains("handshake"),
                "{t:?} cut at {cut}"
            );
            // Peer stops in the middle of it and stays silent.
            let o = Scenario::new(t)
                .main_setup()
                .connect(&init[..cut], End::Hold)
                .fails();
            assert_err!(
                o.err,
                Error::HandshakeTimeout {
                    endpoint: Endpoint::Unclassified,
                    ..
                },
                "{t:?} stalled at {cut}"
            );
        }
    }
}

#[test]
fn bad_magic_on_first_bytes() {
    let _g = serial();
    let mut init = init_packet(UUID, 0);
    init[0] = 0x12;
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .main_setup()
            .connect(&init, End::Hold)
            .fails();
        assert_err!(
            o.err,
            Error::Wire {
                endpoint: Endpoint::Unclassified,
                source: WireError::BadMagic {
                    found: 0x1222_3344,
                    ..
                },
            },
            "{t:?}"
        );
        assert!(message(&o.err).contains("magic"), "{}", o.err);
        // HTTP instead of a migration.
        let o = Scenario::new(t)
            .connect(b"GET / HTTP/1.1\r\n\r\n", End::Hold)
            .fails();
        assert_err!(
            o.err,
            Error::Wire {
                endpoint: Endpoint::Unclassified,
                source: WireError::BadMagic { .. }
            },
            "{t:?}"
        );
    }
}

#[test]
fn init_packet_bad_version() {
    let _g = serial();
    let mut init = init_packet(UUID, 0);
    set_u32(&mut init, 4, 2);
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .main_setup()
            .connect(&init, End::Hold)
            .fails();
        assert_err!(
            o.err,
            Error::Wire {
                endpoint: Endpoint::Unclassified,
                source: WireError::BadVersion {
                    found: 2,
                    expected: 1,
                    ..
                },
            },
            "{t:?}"
        );
        assert!(message(&o.err).contains("version"), "{}", o.err);
    }
}

#[test]
fn wrong_uuid() {
    let _g = serial();
    let mut theirs = [0x11; 16];
    theirs[15] = 0x12;
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .channels(2)
            .uuid([0x11; 16])
            .main_setup()
            .connect(&init_packet(theirs, 1), End::Hold)
            .fails();
        match &o.err {
            Error::UuidMismatch {
                id: 1,
                received,
                expected,
            } => {
                assert_eq!(received, "11111111-1111-1111-1111-111111111112");
                assert_eq!(expected, "11111111-1111-1111-1111-111111111111");
            }
            other => panic!("{t:?}: {other:?}"),
        }
        assert!(message(&o.err).contains("uuid"), "{}", o.err);
    }
}

#[test]
fn channel_id_not_below_channel_count() {
    let _g = serial();
    for t in TRANSPORTS {
        for bad in [2u8, 3, 255] {
            let o = Scenario::new(t)
                .channels(2)
                .main_setup()
                .silent(0)
                .silent(bad)
                .fails();
            assert_err!(o.err, Error::BadChannelId { id, .. } if *id == bad, "{t:?} id {bad}");
            assert!(message(&o.err).contains("channel"), "{}", o.err);
        }
    }
}

#[test]
fn duplicate_channel_id() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .channels(3)
            .silent(1)
            .main_setup()
            .silent(1)
            .fails();
        assert_err!(
            o.err,
            Error::BadChannelId { id: 1, reason } if reason.contains("already"),
            "{t:?}"
        );
    }
}

#[test]
fn second_main_channel() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .channels(2)
            .main_setup()
            .main_setup()
            .fails();
        assert_err!(o.err, Error::Unsupported(_), "{t:?}");
    }
}

/// The main channel and N-1 channels arrive, the last one never does.
#[test]
fn missing_channel_times_out() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .channels(3)
            .main_setup()
            .silent(0)
            .silent(2)
            .fails();
        // The receiver names the channel that never came.
        match &o.err {
            Error::Mismatch(m) => assert!(m.contains("missing ids 1"), "{t:?}: {m}"),
            other => panic!("{t:?}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The main stream

#[test]
fn main_stream_garbage_after_header() {
    let _g = serial();
    for t in TRANSPORTS {
        for garbage in [
            vec![0xFFu8; 64],
            vec![0x42; 3],
            b"\x07\xff\xff\xff\xffnone".to_vec(),
        ] {
            let mut main = Vec::new();
            multifd_wire::stream::encode::header(&mut main);
            main.extend_from_slice(&garbage);
            let o = Scenario::new(t)
                .connect(&main, End::Hold)
                .silent_channels()
                .fails();
            assert_err!(
                o.err,
                Error::Wire {
                    endpoint: Endpoint::Main,
                    ..
                },
                "{t:?} garbage {garbage:02x?}"
            );
        }
    }
}

#[test]
fn main_stream_bad_version() {
    let _g = serial();
    for t in TRANSPORTS {
        for version in [2u32, 4] {
            let mut main = main_setup(&[(BLOCK, LEN)]);
            set_u32(&mut main, 4, version);
            let o = Scenario::new(t)
                .connect(&main, End::Hold)
                .silent_channels()
                .fails();
            assert_err!(
                o.err,
                Error::Wire {
                    endpoint: Endpoint::Main,
                    ..
                },
                "{t:?} version {version}"
            );
        }
    }
}

/// The main channel identifies itself, then stops before the `ram` block
/// list, and stays open. The receiver needs the block list before it can
/// do anything; it must give up after the handshake timeout instead of
/// waiting forever.
#[test]
fn main_stream_never_sends_block_list() {
    let _g = serial();
    let full = main_setup(&[(BLOCK, LEN)]);
    let header_and_config = main_head();
    let stops: [(&str, &[u8]); 4] = [
        ("magic only", &full[..4]),
        ("header only", &full[..8]),
        ("header and configuration", &header_and_config),
        ("inside MEM_SIZE", &full[..full.len() - 30]),
    ];
    for t in TRANSPORTS {
        for (what, main) in stops {
            let o = Scenario::new(t)
                .connect(main, End::Hold)
                .silent_channels()
                .fails();
            assert_err!(
                o.err,
                Error::HandshakeTimeout {
                    endpoint: Endpoint::Main,
                    ..
                },
                "{t:?} {what}"
            );
        }
    }
}

#[test]
fn main_stream_closes_before_block_list() {
    let _g = serial();
    let full = main_setup(&[(BLOCK, LEN)]);
    for t in TRANSPORTS {
        // Cuts before the end of the MEM_SIZE block list (FLUSH, EOS and
        // the footer, 21 bytes, follow it).
        for cut in [4usize, 8, 20, full.len() - 22] {
            let o = Scenario::new(t)
                .connect(&full[..cut], End::Close)
                .silent_channels()
                .fails();
            assert_err!(
                o.err,
                Error::PeerClosed {
                    endpoint: Endpoint::Main,
                    ..
                },
                "{t:?} cut at {cut}"
            );
        }
    }
}

/// The source dies inside the vmdesc trailer, after the EOF byte, the
/// vmdesc type byte and 1-3 bytes of its (big-endian, so zero) length: the
/// stream is incomplete and the receiver must not report success. (A tail
/// ending in a NUL byte could pass for "EOF without vmdesc", so receivers
/// require the vmdesc by default: `ReceiveOptions::require_vmdesc`.)
#[test]
fn main_stream_cut_inside_vmdesc_is_not_success() {
    let _g = serial();
    let ch0 = [sync_packet(0), sync_packet(1), sync_packet(2)].concat();
    let full = whole_main_stream();
    // main_end() ends with EOF, 0x06, a 4-byte length and 34 bytes of JSON.
    let json = 34;
    let mut bad = Vec::new();
    for t in TRANSPORTS {
        for missing in [json + 1, json + 2, json + 3] {
            let run = Scenario::new(t)
                .connect(&full[..full.len() - missing], End::Close)
                .channel(0, &ch0, End::Close)
                .ends_within(FAST);
            assert!(run.took < FAST);
            match &run.result {
                Ok(inc) => bad.push(format!(
                    "{t:?}: stream missing its last {missing} bytes accepted, tail {:02x?}",
                    inc.tail
                )),
                Err(e) => assert_err!(
                    e,
                    Error::PeerClosed {
                        endpoint: Endpoint::Main,
                        ..
                    } | Error::Wire {
                        endpoint: Endpoint::Main,
                        ..
                    },
                    "{t:?}"
                ),
            }
            run.finish("cut inside vmdesc");
        }
    }
    assert!(bad.is_empty(), "ENGINE BUG:\n{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------
// Multifd packets

#[test]
fn truncated_packet_header() {
    let _g = serial();
    let pkt = nocomp_packet(BLOCK, &[0, 4096], 2, 0xAB, 0);
    for t in TRANSPORTS {
        for cut in [1usize, 5, 11, 12, 13, 700, 1343] {
            let o = packet_case(t, &pkt[..cut], End::Close);
            assert_err!(
                o.err,
                Error::PeerClosed {
                    endpoint: Endpoint::Channel(0),
                    ..
                },
                "{t:?} cut at {cut}"
            );
            assert_all_zero(o.ram(), "truncated header");
        }
    }
}

#[test]
fn truncated_payload() {
    let _g = serial();
    let pkt = nocomp_packet(BLOCK, &[0, 4096, 8192], 3, 0xAB, 0);
    for t in TRANSPORTS {
        for cut in [1344usize + 1, 1344 + 4096, 1344 + 5000, pkt.len() - 1] {
            let o = packet_case(t, &pkt[..cut], End::Close);
            assert_err!(
                o.err,
                Error::PeerClosed {
                    endpoint: Endpoint::Channel(0),
                    ..
                },
                "{t:?} cut at {cut}"
            );
        }
        // Header complete, not one payload byte.
        let o = packet_case(t, &pkt[..1344], End::Close);
        assert_err!(
            o.err,
            Error::PeerClosed {
                endpoint: Endpoint::Channel(0),
                ..
            },
            "{t:?} no payload"
        );
        assert_all_zero(o.ram(), "no payload");
    }
}

#[test]
fn packet_bad_magic() {
    let _g = serial();
    let mut pkt = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
    set_u32(&mut pkt, field::MAGIC, 0xdead_beef);
    for t in TRANSPORTS {
        let o = packet_case(t, &pkt, End::Hold);
        assert_err!(
            o.err,
            Error::Wire {
                endpoint: Endpoint::Channel(0),
                source: WireError::BadMagic {
                    found: 0xdead_beef,
                    ..
                },
            },
            "{t:?}"
        );
        assert!(message(&o.err).contains("multifd channel 0"), "{}", o.err);
        assert_all_zero(o.ram(), "bad magic");
    }
}

#[test]
fn packet_bad_version() {
    let _g = serial();
    let mut pkt = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
    set_u32(&mut pkt, field::VERSION, 0);
    for t in TRANSPORTS {
        let o = packet_case(t, &pkt, End::Hold);
        assert_err!(
            o.err,
            Error::Wire {
                endpoint: Endpoint::Channel(0),
                source: WireError::BadVersion { found: 0, .. },
            },
            "{t:?}"
        );
        assert_all_zero(o.ram(), "bad version");
    }
}

#[test]
fn packet_unknown_flag_bits() {
    let _g = serial();
    for t in TRANSPORTS {
        for extra in [0x80u32, 0x100, 0x8000_0000, 0xFFFF_FF80] {
            let mut pkt = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
            set_u32(&mut pkt, field::FLAGS, extra);
            let o = packet_case(t, &pkt, End::Hold);
            assert_err!(
                o.err,
                Error::Wire {
                    endpoint: Endpoint::Channel(0),
                    source: WireError::BadFlags { flags, .. },
                } if *flags == u64::from(extra),
                "{t:?} flags {extra:#x}"
            );
            assert_all_zero(o.ram(), "unknown flags");
        }
    }
}

#[test]
fn packet_two_compression_bits() {
    let _g = serial();
    for t in TRANSPORTS {
        for fl in [
            flags::ZLIB | flags::ZSTD,
            flags::ZLIB | flags::QPL,
            flags::COMPRESSION_MASK,
            flags::SYNC | 0x0A,
        ] {
            let mut pkt = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
            set_u32(&mut pkt, field::FLAGS, fl);
            let o = packet_case(t, &pkt, End::Hold);
            assert_err!(
                o.err,
                Error::Wire {
                    endpoint: Endpoint::Channel(0),
                    source: WireError::BadFlags { .. }
                },
                "{t:?} flags {fl:#x}"
            );
            assert_all_zero(o.ram(), "two compression bits");
        }
    }
}

/// Offsets past the block end are rejected before any page of the packet
/// is written, the valid ones before them included.
#[test]
fn offset_past_block_end_rejected_before_any_write() {
    let _g = serial();
    let bad_offsets = [LEN, LEN + 4096, 1 << 40, !0xFFF];
    for t in TRANSPORTS {
        for bad in bad_offsets {
            // As a normal page, after two valid ones (payload present).
            let pkt = nocomp_packet(BLOCK, &[0, 4096, bad], 3, 0xAB, 0);
            let o = packet_case(t, &pkt, End::Hold);
            assert_err!(
                o.err,
                Error::Wire {
                    endpoint: Endpoint::Channel(0),
                    source: WireError::InvalidField { field: "page offset", value, .. },
                } if *value == bad,
                "{t:?} offset {bad:#x}"
            );
            assert!(message(&o.err).contains("past the end"), "{}", o.err);
            assert_all_zero(o.ram(), "offset past end (normal page)");
            // As a zero page after a valid normal page.
            let pkt = nocomp_packet(BLOCK, &[8192, bad], 1, 0xAB, 0);
            let o = packet_case(t, &pkt, End::Hold);
            assert!(
                invalid_field(&o.err, "page offset"),
                "{t:?} zero offset {bad:#x}: {:?}",
                o.err
            );
            assert_all_zero(o.ram(), "offset past end (zero page)");
        }
        // The last page is fine, one byte more is not (exact boundary).
        let pkt = nocomp_packet(BLOCK, &[LEN - 4096, LEN], 2, 0xAB, 0);
        let o = packet_case(t, &pkt, End::Hold);
        assert!(invalid_field(&o.err, "page offset"), "{t:?}: {:?}", o.err);
        assert_all_zero(o.ram(), "boundary");
    }
}

#[test]
fn unaligned_offset() {
    let _g = serial();
    for t in TRANSPORTS {
        for bad in [1u64, 4095, 4097, LEN - 1] {
            let mut pkt = nocomp_packet(BLOCK, &[0, 4096], 2, 0xAB, 0);
            set_u64(&mut pkt, field::OFFSET + 8, bad);
            let o = packet_case(t, &pkt, End::Hold);
            assert_err!(
                o.err,
                Error::Wire {
                    endpoint: Endpoint::Channel(0),
                    source: WireError::InvalidField { field: "page offset", value, .. },
                } if *value == bad,
                "{t:?} offset {bad:#x}"
            );
            assert!(message(&o.err).contains("aligned"), "{}", o.err);
            assert_all_zero(o.ram(), "unaligned offset");
        }
    }
}

#[test]
fn page_counts_over_128() {
    let _g = serial();
    let base = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
    let cases: [(&str, usize, u32); 6] = [
        ("pages_alloc", field::PAGES_ALLOC, 129),
        ("pages_alloc", field::PAGES_ALLOC, u32::MAX),
        ("normal_pages", field::NORMAL_PAGES, 129),
        ("normal_pages", field::NORMAL_PAGES, u32::MAX),
        ("zero_pages", field::ZERO_PAGES, 128),
        ("zero_pages", field::ZERO_PAGES, u32::MAX),
    ];
    for t in TRANSPORTS {
        for (name, at, value) in cases {
            let mut pkt = base.clone();
            set_u32(&mut pkt, at, value);
            if at == field::NORMAL_PAGES {
                // Keep next_packet_size consistent so only the count is wrong.
                set_u32(&mut pkt, field::NEXT_PACKET_SIZE, value.wrapping_mul(4096));
            }
            let o = packet_case(t, &pkt, End::Hold);
            assert!(
                invalid_field(&o.err, name),
                "{t:?} {name}={value}: {:?}",
                o.err
            );
            assert!(message(&o.err).contains(name), "{}", o.err);
            assert_all_zero(o.ram(), name);
        }
    }
}

#[test]
fn nocomp_payload_size_mismatch() {
    let _g = serial();
    let mut pkt = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
    set_u32(&mut pkt, field::NEXT_PACKET_SIZE, 4095);
    for t in TRANSPORTS {
        let o = packet_case(t, &pkt, End::Hold);
        assert!(
            invalid_field(&o.err, "next_packet_size"),
            "{t:?}: {:?}",
            o.err
        );
        assert_all_zero(o.ram(), "size mismatch");
    }
}

#[test]
fn unknown_block_name() {
    let _g = serial();
    let unknown = nocomp_packet("pc.ram2", &[0], 1, 0xAB, 0);
    // A name without its NUL terminator.
    let mut unterminated = nocomp_packet(BLOCK, &[0], 1, 0xAB, 0);
    unterminated[field::RAMBLOCK..field::RAMBLOCK + 256].fill(b'x');
    for t in TRANSPORTS {
        let o = packet_case(t, &unknown, End::Hold);
        assert_err!(
            o.err,
            Error::UnknownBlock { endpoint: Endpoint::Channel(0), name } if name == "pc.ram2",
            "{t:?}"
        );
        assert!(message(&o.err).contains("pc.ram2"), "{}", o.err);
        assert_all_zero(o.ram(), "unknown block");
        let o = packet_case(t, &unterminated, End::Hold);
        assert_err!(
            o.err,
            Error::Wire {
                endpoint: Endpoint::Channel(0),
                source: WireError::BadName { .. }
            },
            "{t:?}"
        );
    }
}

#[test]
fn compression_mismatch() {
    let _g = serial();
    let pkt = [
        ram_header(Compression::Zlib, BLOCK, &[0], 1, 10, 0),
        vec![0; 10],
    ]
    .concat();
    for t in TRANSPORTS {
        let o = packet_case(t, &pkt, End::Hold);
        assert_err!(o.err, Error::Mismatch(m) if m.contains("zlib"), "{t:?}");
        assert_all_zero(o.ram(), "compression mismatch");
    }
}

#[test]
fn device_state_packet_is_unsupported() {
    let _g = serial();
    let ds = DeviceStateHeader {
        idstr: "0000:00:02.0/vfio".into(),
        instance_id: 0,
        next_packet_size: 16,
    }
    .encode()
    .unwrap();
    let body = [&ds[..], &[0; 16]].concat();
    for t in TRANSPORTS {
        let o = packet_case(t, &body, End::Hold);
        assert_err!(o.err, Error::Unsupported(m) if m.contains("vfio"), "{t:?}");
    }
}

/// A valid packet is applied, the bad one after it is refused: exactly the
/// pages the valid packet addressed changed, nothing else.
#[test]
fn only_addressed_pages_change_before_a_bad_packet() {
    let _g = serial();
    let good = nocomp_packet(BLOCK, &[5 * 4096, 2 * 4096, 7 * 4096], 2, 0xCD, 0);
    let bad = nocomp_packet(BLOCK, &[9 * 4096, LEN], 2, 0xEE, 1);
    let body = [&good[..], &bad[..1344 + 2 * 4096]].concat();
    for t in TRANSPORTS {
        let o = packet_case(t, &body, End::Hold);
        assert!(invalid_field(&o.err, "page offset"), "{t:?}: {:?}", o.err);
        for (p, page) in o.ram().chunks(4096).enumerate() {
            let want = if p == 2 || p == 5 { 0xCD } else { 0 };
            assert!(
                page.iter().all(|&b| b == want),
                "{t:?}: page {p} should be all {want:#x}"
            );
        }
    }
}

// --- compressed payloads -----------------------------------------------------

fn zlib_pages(pages: &[[u8; 4096]]) -> Vec<u8> {
    use flate2::{Compress, Compression as Level, FlushCompress};
    let mut z = Compress::new(Level::new(1), true);
    let mut out = Vec::with_capacity(1 << 20);
    for (i, p) in pages.iter().enumerate() {
        let flush = if i + 1 == pages.len() {
            FlushCompress::Sync
        } else {
            FlushCompress::None
        };
        z.compress_vec(p, &mut out, flush).unwrap();
    }
    out
}

fn zstd_pages(pages: &[[u8; 4096]]) -> Vec<u8> {
    let mut enc = zstd::stream::raw::Encoder::new(1).unwrap();
    let mut out = vec![0u8; 1 << 20];
    let mut o = zstd::stream::raw::OutBuffer::around(&mut out[..]);
    for p in pages {
        let mut i = zstd::stream::raw::InBuffer::around(&p[..]);
        while i.pos() < p.len() {
            zstd::stream::raw::Operation::run(&mut enc, &mut i, &mut o).unwrap();
        }
    }
    while zstd::stream::raw::Operation::flush(&mut enc, &mut o).unwrap() != 0 {}
    let n = o.pos();
    out.truncate(n);
    out
}

/// A one-channel receiver expecting `comp`, with file-backed RAM and a
/// proper main stream setup; channel 0 sends one packet of `normal` pages
/// at `offsets` whose payload is `payload`, and holds the connection.
fn compressed_case(
    t: Transport,
    comp: Compression,
    offsets: &[u64],
    normal: usize,
    payload: &[u8],
) -> Outcome {
    let header = ram_header(comp, BLOCK, offsets, normal, payload.len() as u32, 0);
    Scenario::new(t)
        .method(comp)
        .file_ram()
        .main_setup()
        .channel(0, &[&header[..], payload].concat(), End::Hold)
        .fails()
}

/// The compression methods a receiver can expect, and their names.
const COMPRESSED: [(Compression, &str); 2] =
    [(Compression::Zlib, "zlib"), (Compression::Zstd, "zstd")];

/// `pages` compressed with `comp` (zlib or zstd) as a source does.
fn compress(comp: Compression, pages: &[[u8; 4096]]) -> Vec<u8> {
    match comp {
        Compression::Zlib => zlib_pages(pages),
        Compression::Zstd => zstd_pages(pages),
        other => unreachable!("{other:?} is not a compression"),
    }
}

fn is_corrupt(e: &Error, m: &str) -> bool {
    matches!(e, Error::Corrupt { endpoint: Endpoint::Channel(0), method, .. } if *method == m)
}

#[test]
fn compressed_garbage_is_corrupt() {
    let _g = serial();
    for t in TRANSPORTS {
        for (comp, name) in COMPRESSED {
            for garbage in [
                vec![0xFFu8; 100],
                vec![0u8; 1],
                (0..=255u8).cycle().take(5000).collect(),
            ] {
                let o = compressed_case(t, comp, &[0, 4096], 2, &garbage);
                assert!(
                    is_corrupt(&o.err, name),
                    "{t:?} {name} {} bytes: {:?}",
                    garbage.len(),
                    o.err
                );
                assert!(message(&o.err).contains(name), "{}", o.err);
                assert_all_zero(o.ram(), "compressed garbage");
            }
        }
    }
}

#[test]
fn compressed_stream_too_short_is_corrupt() {
    let _g = serial();
    let page = [0x5Au8; 4096];
    for t in TRANSPORTS {
        // A valid stream of one page; the header announces two.
        for (comp, name) in COMPRESSED {
            let payload = compress(comp, &[page]);
            let o = compressed_case(t, comp, &[3 * 4096, 4 * 4096], 2, &payload);
            assert!(is_corrupt(&o.err, name), "{t:?} {name}: {:?}", o.err);
            // Only the addressed pages may have changed.
            for (p, pg) in o.ram().chunks(4096).enumerate() {
                if p != 3 && p != 4 {
                    assert!(pg.iter().all(|&b| b == 0), "{t:?} {name}: page {p} written");
                }
            }
        }
    }
}

#[test]
fn compressed_trailing_garbage_is_corrupt() {
    let _g = serial();
    let page = [0x5Au8; 4096];
    for t in TRANSPORTS {
        for (comp, name) in COMPRESSED {
            let payload = [compress(comp, &[page]), vec![0xFF; 16]].concat();
            let o = compressed_case(t, comp, &[0], 1, &payload);
            assert!(is_corrupt(&o.err, name), "{t:?} {name}: {:?}", o.err);
            for (p, pg) in o.ram().chunks(4096).enumerate().skip(1) {
                assert!(pg.iter().all(|&b| b == 0), "{t:?} {name}: page {p} written");
            }
        }
    }
}

/// What a QEMU source sends for a batch of zero pages with zlib or zstd: a
/// packet with zero normal pages and `next_packet_size` 0 (no payload at
/// all, not even a sync flush). The receiver must apply it and go on.
#[test]
fn compressed_zero_only_packet_is_accepted() {
    let _g = serial();
    let page = [0x5Au8; 4096];
    for t in TRANSPORTS {
        for (comp, _) in COMPRESSED {
            let payload = compress(comp, &[page]);
            let size = payload.len() as u32;
            let ch0 = [
                sync_packet(0),
                ram_header(comp, BLOCK, &[0, 4096], 0, 0, 1),
                ram_header(comp, BLOCK, &[8192, 12288], 1, size, 2),
                payload,
                sync_packet(3),
                sync_packet(4),
            ]
            .concat();
            let run = Scenario::new(t)
                .label(format!("{t:?} {comp:?}"))
                .method(comp)
                .file_ram()
                .main_complete()
                .channel(0, &ch0, End::Close)
                .ends_within(FAST);
            let inc = run.completed();
            for p in [0, 1, 3] {
                assert!(
                    inc.ram.blocks()[0].is_received(p * 4096),
                    "{t:?} {comp:?}: page {p}"
                );
            }
            let ram = run
                .finish("compressed zero-only packet")
                .expect("file-backed RAM");
            assert!(ram[8192..12288].iter().all(|&b| b == 0x5A));
            assert!(ram[..8192].iter().chain(&ram[12288..]).all(|&b| b == 0));
        }
    }
}

/// Sanity check of the hand-made stream used above: unmodified, it migrates.
#[test]
fn handmade_stream_completes() {
    let _g = serial();
    let ch0 = [
        sync_packet(0),
        nocomp_packet(BLOCK, &[4096, 0], 1, 0x77, 2),
        sync_packet(4),
        sync_packet(6),
    ]
    .concat();
    let ch1 = [sync_packet(1), sync_packet(3), sync_packet(5)].concat();
    for t in TRANSPORTS {
        let run = Scenario::new(t)
            .channels(2)
            .main_complete()
            .channel(1, &ch1, End::Close)
            .channel(0, &ch0, End::Close)
            .ends_within(FAST);
        let inc = run.completed();
        assert!(run.took < FAST);
        assert_eq!(inc.flushes, 3);
        let mut page = [0u8; 4096];
        inc.ram.blocks()[0].read_page(4096, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x77));
        assert!(inc.ram.blocks()[0].is_received(0) && inc.ram.blocks()[0].is_received(4096));
        run.finish("hand-made stream");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random corruption of a data packet's header: the receiver ends with
    /// success or a typed error, never hangs, never writes outside the
    /// pages the packet addressed (0 and 1) or, where the corrupted header
    /// still decodes, the pages it now addresses (an edited offset is a
    /// lie the receiver cannot tell from the truth).
    #[test]
    fn random_header_corruption_is_typed(
        edits in proptest::collection::vec((0usize..1344, any::<u8>()), 1..6),
        unix in any::<bool>(),
    ) {
        let _g = serial();
        let t = if unix { Transport::Unix } else { Transport::Tcp };
        let mut pkt = nocomp_packet(BLOCK, &[0, 4096], 2, 0x33, 1);
        for &(at, v) in &edits {
            pkt[at] = v;
        }
        let mut addressed = vec![0u64, 1];
        if let Ok(h) = RamPacketHeader::decode(&pkt[..RAM_PACKET_HEADER_SIZE]) {
            addressed.extend(h.normal().iter().chain(h.zero()).map(|o| o / 4096));
        }
        let ch0 = [sync_packet(0), pkt, sync_packet(2), sync_packet(3)].concat();
        let run = Scenario::new(t)
            .label(format!("{t:?}, corrupted header"))
            .file_ram()
            .main_complete()
            .channel(0, &ch0, End::Close)
            .ends_within(Duration::from_secs(15));
        prop_assert!(run.took < FAST, "took {:?}", run.took);
        if let Err(e) = &run.result {
            prop_assert!(
                !matches!(e, Error::Aborted | Error::Panicked(_)),
                "untyped error {:?}", e
            );
        }
        let ram = run.finish("random header corruption").expect("file-backed RAM");
        for (p, pg) in ram.chunks(4096).enumerate() {
            if !addressed.contains(&(p as u64)) {
                prop_assert!(pg.iter().all(|&b| b == 0), "page {} written by a corrupted packet", p);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Cancelling a receiver

/// `ReceiveOptions::cancel` stops a receiver wherever it waits: in accept,
/// in a handshake read, in the main stream's setup, at the sync barrier, in
/// a channel's payload read, in the main stream mid-migration. Timeouts are
/// long (30 s), so only the cancel can end these.
#[test]
fn receiver_cancel_wherever_it_waits() {
    let _g = serial();
    let setup = main_setup(&[(BLOCK, LEN)]);
    let mut partial = nocomp_packet(BLOCK, &[0, 4096], 2, 0xAB, 1);
    partial.truncate(1344 + 100);
    let after_part = [setup.clone(), main_part()].concat();
    let two_syncs = [sync_packet(0), sync_packet(2)].concat();
    let cases: [(&str, &dyn Fn(Scenario) -> Scenario); 7] = [
        ("accept, no connection yet", &|s| s),
        ("accept, waiting for a channel", &|s| s.main_setup()),
        ("handshake read", &|s| s.connect(&[0x11], End::Hold)),
        ("main stream setup", &|s| {
            s.connect(&setup[..8], End::Hold).silent(0)
        }),
        ("sync barrier", &|s| s.main_setup().silent(0)),
        ("payload read", &|s| {
            s.main_setup().channel(0, &partial, End::Hold)
        }),
        ("main stream mid-migration", &|s| {
            s.connect(&after_part, End::Hold)
                .channel(0, &two_syncs, End::Hold)
        }),
    ];
    for t in TRANSPORTS {
        for (what, script) in cases {
            let cancel = Arc::new(Cancel::new());
            let running = script(
                Scenario::new(t)
                    .label(format!("{t:?} {what}: cancel"))
                    .handshake(Duration::from_secs(30))
                    .accept_timeout(None)
                    .cancel(&cancel),
            )
            .start();
            // Let it reach the wait.
            assert!(
                running.still_running_after(Duration::from_millis(300)),
                "{t:?} {what}: ended before the cancel"
            );
            cancel.cancel();
            let cancelled = Instant::now();
            let run = running.end(FAST);
            let took = run.returned_at - cancelled;
            assert!(
                matches!(run.result, Err(Error::Cancelled)),
                "{t:?} {what}: {:?}",
                run.result.as_ref().map(|_| ())
            );
            assert!(took < FAST, "{t:?} {what}: {took:?}");
            assert!(
                run.peer.all_closed_by_receiver,
                "{t:?} {what}: a connection left open"
            );
            run.finish(&format!("{t:?} cancel in {what}"));
        }
    }
}

// ---------------------------------------------------------------------------
// A sender dying mid-transfer

fn send_opts(channels: u8) -> SourceOptions {
    SourceOptions {
        config: MigrationConfig {
            channels,
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            ..MigrationConfig::default()
        },
        ..SourceOptions::default()
    }
}

fn dense_ram(pages: u64) -> GuestRam {
    let mut ram = GuestRam::new();
    ram.push(dense_block(BLOCK, pages)).unwrap();
    ram
}

/// A real sender, a real receiver, and a proxy that cuts every connection
/// abruptly once 2 MiB went through: both sides fail fast, typed.
#[test]
fn sender_connections_cut_mid_stream() {
    let _g = serial();
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let receiving = start_receiver(
            listener,
            recv_opts(3, Duration::from_secs(2)),
            Box::new(AnonRam),
        );
        let proxy = Proxy::start(t, uri, Cut::All { total: 2 << 20 });
        let ram = dense_ram(8192);
        let progress = Progress::default();
        let started = Instant::now();
        let sent = migrate(&proxy.uri, &ram, &mut StaticRam, &send_opts(3), &progress);
        let send_took = started.elapsed();
        let (recvd, recv_took) = receiving.wait(FAST).expect("receiver hangs after the cut");
        receiving.handle.join().unwrap();
        assert!(proxy.cut_done());
        proxy.finish();
        drop(dir);
        match &sent {
            // A write fails, or the peer watch sees the hang-up first.
            Err(Error::Io { .. } | Error::PeerClosed { .. }) => {}
            other => panic!("{t:?}: sender: {other:?}"),
        }
        match &recvd {
            Err(Error::PeerClosed { .. } | Error::Io { .. }) => {}
            other => panic!("{t:?}: receiver: {:?}", other.as_ref().map(|_| ())),
        }
        assert!(
            send_took < FAST && recv_took < FAST,
            "{send_took:?} {recv_took:?}"
        );
        drop(recvd);
        base.check("cut mid stream");
    }
}

const HELPER_ENV: &str = "MULTIFD_TEST_CHILD_SENDER";

/// Not a test on its own: the body of the child process that
/// `sigkill_sender_mid_transfer` kills. Migrates forever (the guest keeps
/// dirtying pages) to the URI in `MULTIFD_TEST_CHILD_SENDER`.
#[test]
fn child_sender_helper() {
    let Ok(uri) = std::env::var(HELPER_ENV) else {
        return;
    };
    // Never outlive a parent that forgot us.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(30));
        std::process::exit(3);
    });
    let uri: Uri = uri.parse().unwrap();
    let ram = source_ram(&[(BLOCK, 2048)], 5);
    let mut vm = Dirtier {
        calls: 0,
        seed: 5,
        per_call: 512,
        calls_limit: u64::MAX,
    };
    let opts = SourceOptions {
        downtime_limit: Duration::ZERO,
        max_rounds: u32::MAX,
        ..send_opts(2)
    };
    let r = migrate(&uri, &ram, &mut vm, &opts, &Progress::default());
    eprintln!("child sender ended: {r:?}");
    std::process::exit(2);
}

/// `kill -9` of a real sender process mid-transfer: the receiver sees the
/// kernel close every connection and fails fast.
#[test]
fn sigkill_sender_mid_transfer() {
    let _g = serial();
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let receiving = start_receiver(
            listener,
            recv_opts(2, Duration::from_secs(2)),
            Box::new(AnonRam),
        );
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "child_sender_helper",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(HELPER_ENV, uri.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill once a few sync rounds went through.
        let deadline = Instant::now() + Duration::from_secs(30);
        while receiving.progress.rounds.load(Ordering::Relaxed) < 4 {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{t:?}: the child sender made no progress");
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{t:?}: child sender exited by itself: {st}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let pages_before = receiving.progress.pages_done();
        child.kill().unwrap();
        let killed = Instant::now();
        let status = child.wait().unwrap();
        assert!(!status.success());
        let (res, _) = receiving
            .wait(FAST)
            .expect("receiver hangs after the sender was killed");
        let took = killed.elapsed();
        receiving.handle.join().unwrap();
        drop(dir);
        match &res {
            Err(Error::PeerClosed { .. } | Error::Io { .. }) => {}
            other => panic!("{t:?}: {:?}", other.as_ref().map(|_| ())),
        }
        assert!(took < FAST, "{t:?}: {took:?}");
        assert!(pages_before > 0);
        drop(res);
        base.check("sigkill sender");
    }
}

// ---------------------------------------------------------------------------
// Sender side: a fake receiver that misbehaves

/// Accepts the main channel and `n` multifd channels and reads their
/// identification (4 bytes, or the 64-byte initial packet).
fn fake_accept(listener: &Listener, n: usize) -> Vec<Connection> {
    let mut conns = Vec::new();
    while conns.len() < n + 1 {
        let Some(mut c) = listener.accept(Some(FAST)).unwrap() else {
            break;
        };
        let mut head = [0u8; 4];
        if !c.read_exact_or_eof(&mut head).unwrap() {
            continue;
        }
        if u32::from_be_bytes(head) == MULTIFD_MAGIC {
            let mut rest = [0u8; 60];
            c.read_exact_or_eof(&mut rest).unwrap();
        }
        conns.push(c);
    }
    conns
}

#[test]
fn sender_fails_fast_when_receiver_closes_after_handshake() {
    let _g = serial();
    let ram = dense_ram(8192);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let fake = spawn("fake-recv", move || {
            let conns = fake_accept(&listener, 2);
            let n = conns.len();
            drop(conns);
            n
        });
        let started = Instant::now();
        let r = migrate(
            &uri,
            &ram,
            &mut StaticRam,
            &send_opts(2),
            &Progress::default(),
        );
        let took = started.elapsed();
        assert_eq!(fake.join().unwrap(), 3);
        drop(dir);
        match &r {
            // The peer watch sees the hang-up (often before a write fails).
            Err(Error::PeerClosed { .. }) => {}
            Err(Error::Io { source, context }) => {
                assert!(
                    matches!(
                        source.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ),
                    "{t:?}: {context}: {source}"
                );
            }
            other => panic!("{t:?}: {other:?}"),
        }
        assert!(took < FAST, "{t:?}: {took:?}");
        base.check("receiver closes after handshake");
    }
}

#[test]
fn sender_connect_refused_fails_fast() {
    let _g = serial();
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        drop(listener);
        let mut opts = send_opts(2);
        opts.config.connect_timeout = HS;
        let started = Instant::now();
        let r = migrate(
            &uri,
            &dense_ram(4),
            &mut StaticRam,
            &opts,
            &Progress::default(),
        );
        let took = started.elapsed();
        drop(dir);
        assert!(matches!(&r, Err(Error::Io { .. })), "{t:?}: {r:?}");
        assert!(
            took >= Duration::from_millis(250) && took < FAST,
            "{t:?}: {took:?}"
        );
        base.check("connect refused");
    }
}

#[test]
fn cancel_set_before_start() {
    let _g = serial();
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let receiving = start_receiver(
            listener,
            recv_opts(2, Duration::from_secs(2)),
            Box::new(AnonRam),
        );
        let cancel = Arc::new(Cancel::new());
        cancel.cancel();
        let opts = SourceOptions {
            cancel: Some(cancel),
            ..send_opts(2)
        };
        let started = Instant::now();
        let r = migrate(
            &uri,
            &dense_ram(1024),
            &mut StaticRam,
            &opts,
            &Progress::default(),
        );
        assert!(matches!(r, Err(Error::Cancelled)), "{t:?}: {r:?}");
        assert!(started.elapsed() < FAST);
        let (res, _) = receiving
            .wait(FAST)
            .expect("receiver hangs after a cancelled sender");
        receiving.handle.join().unwrap();
        drop(dir);
        // A sender cancelled before it starts never connects: the receiver
        // times out waiting for a source.
        assert!(
            matches!(&res, Err(Error::HandshakeTimeout { .. })),
            "{t:?}: receiver: {:?}",
            res.as_ref().map(|_| ())
        );
        drop(res);
        base.check("cancel before start");
    }
}

/// The receiver accepts, reads the handshakes, then stops reading: the
/// sender's channel threads block in `writev`, its driver in the queue or
/// in a main-channel write. Setting `cancel` must still end the migration
/// with `Error::Cancelled` within 5 s: the cancel watcher shuts the
/// sockets down.
#[test]
fn sender_cancel_while_blocked_in_write() {
    let _g = serial();
    let ram = Arc::new(dense_ram(16384));
    let failures: Vec<String> = TRANSPORTS
        .into_iter()
        .filter_map(|t| cancel_while_blocked(t, &ram).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn cancel_while_blocked(t: Transport, ram: &Arc<GuestRam>) -> Result<(), String> {
    let base = Baseline::take();
    let Bound { listener, uri, dir } = bind(t);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let fake = spawn("fake-recv", move || {
        let conns = fake_accept(&listener, 2);
        // Hold everything unread until released.
        let _ = release_rx.recv_timeout(Duration::from_secs(60));
        drop(conns);
    });
    let cancel = Arc::new(Cancel::new());
    let progress = Arc::new(Progress::default());
    let (tx, rx) = mpsc::channel();
    let sender = {
        let (ram, cancel, progress) = (ram.clone(), cancel.clone(), progress.clone());
        spawn("send", move || {
            let opts = SourceOptions {
                cancel: Some(cancel),
                ..send_opts(2)
            };
            let r = migrate(&uri, &ram, &mut StaticRam, &opts, &progress);
            let _ = tx.send((r, Instant::now()));
        })
    };
    // Wait until the sender is stuck: no progress for 300 ms.
    let mut last = u64::MAX;
    let mut still_since = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let now = progress.bytes.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_millis(300) {
            break;
        }
        assert!(Instant::now() < give_up, "{t:?}: sender never blocked");
        assert!(
            rx.try_recv().is_err(),
            "{t:?}: sender ended before it blocked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cancelled_at = Instant::now();
    cancel.cancel();
    let outcome = rx.recv_timeout(FAST);
    // Whatever happened, release the fake receiver so every thread ends.
    let _ = release_tx.send(());
    let (r, ended) = match outcome {
        Ok(v) => v,
        Err(_) => {
            let late = rx.recv_timeout(Duration::from_secs(10));
            let _ = sender.join();
            let _ = fake.join();
            return Err(format!(
                "{t:?}: ENGINE BUG: cancel did not stop a sender blocked in a socket write \
                 within {FAST:?} ({last} bytes sent); it only returned after the receiver \
                 closed the connections: {:?}",
                late.map(|(r, _)| r)
            ));
        }
    };
    sender.join().unwrap();
    fake.join().unwrap();
    drop(dir);
    assert!(matches!(r, Err(Error::Cancelled)), "{t:?}: {r:?}");
    assert!(ended - cancelled_at < FAST);
    base.check("cancel while blocked");
    Ok(())
}
