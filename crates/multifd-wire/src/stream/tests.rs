//! Stream-level tests: whole streams through the encoder and the decoder.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::WireError;

/// The 132-byte minimal stream a QEMU 10.0.2 `-M none` destination accepts
/// (wire doc 6.11).
const MINIMAL: &[u8] = &[
    0x51, 0x45, 0x56, 0x4d, 0x00, 0x00, 0x00, 0x03, // QEVM v3
    0x07, 0x00, 0x00, 0x00, 0x04, b'n', b'o', b'n', b'e', // configuration "none"
    0x01, 0x00, 0x00, 0x00, 0x01, 0x03, b'r', b'a', b'm', // START 1 "ram"
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, // instance 0, version 4
    0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x04, // MEM_SIZE 0x4000000
    0x02, b'm', b'0', 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, // "m0" 0x4000000
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // FLUSH
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, // EOS
    0x7e, 0x00, 0x00, 0x00, 0x01, // footer 1
    0x02, 0x00, 0x00, 0x00, 0x01, // PART 1
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // FLUSH
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, // EOS
    0x7e, 0x00, 0x00, 0x00, 0x01, // footer 1
    0x08, 0x00, 0x0b, 0x00, 0x00, // SWITCHOVER_START
    0x03, 0x00, 0x00, 0x00, 0x01, // END 1
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // FLUSH
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, // EOS
    0x7e, 0x00, 0x00, 0x00, 0x01, // footer 1
    0x00, // EOF
];

fn minimal_events() -> Vec<Event<'static>> {
    vec![
        Event::Header,
        Event::Configuration(Configuration {
            machine: "none".into(),
            ..Configuration::default()
        }),
        Event::RamStart { section_id: 1 },
        Event::MemSize {
            blocks: vec![RamBlockInfo {
                idstr: "m0".into(),
                used_length: 0x400_0000,
            }],
        },
        Event::Flush,
        Event::Eos,
        Event::Footer { section_id: 1 },
        Event::RamPart { section_id: 1 },
        Event::Flush,
        Event::Eos,
        Event::Footer { section_id: 1 },
        Event::Command(Command::SwitchoverStart),
        Event::RamEnd { section_id: 1 },
        Event::Flush,
        Event::Eos,
        Event::Footer { section_id: 1 },
        Event::Eof,
    ]
}

/// How [`decode_all`] ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Needs more input: total bytes (from the front of the remaining input).
    NeedMore(usize),
    /// The decoder handed over the rest (at this offset) as device state.
    DeviceTail(usize),
    /// Error after the events.
    Error(WireError),
}

/// Decodes `bytes` item by item with a fresh decoder.
fn decode_all(bytes: &[u8]) -> (Vec<Event<'_>>, End) {
    decode_with(&mut Decoder::new(), bytes)
}

fn decode_with<'a>(dec: &mut Decoder, bytes: &'a [u8]) -> (Vec<Event<'a>>, End) {
    let mut events = Vec::new();
    let mut pos = 0;
    loop {
        match dec.decode(&bytes[pos..]) {
            Ok(Decoded::NeedMore { at_least }) => {
                assert!(at_least > bytes.len() - pos, "NeedMore with enough bytes");
                return (events, End::NeedMore(at_least));
            }
            Ok(Decoded::Item {
                event: Event::DeviceTail,
                consumed,
            }) => {
                assert_eq!(consumed, 0);
                events.push(Event::DeviceTail);
                return (events, End::DeviceTail(pos));
            }
            Ok(Decoded::Item { event, consumed }) => {
                assert!(consumed > 0 && consumed <= bytes.len() - pos);
                pos += consumed;
                events.push(event);
            }
            Err(e) => return (events, End::Error(e)),
        }
    }
}

/// Re-encodes events the way QEMU does (CONTINUE when the block repeats).
fn encode_events(events: &[Event<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut open: Option<u32> = None;
    let mut last_block: Option<Arc<str>> = None;
    let mut block_arg = |block: &Arc<str>| {
        let same = last_block.as_ref() == Some(block);
        last_block = Some(block.clone());
        if same { None } else { Some(block.clone()) }
    };
    for ev in events {
        match ev {
            Event::Header => encode::header(&mut out),
            Event::Configuration(cfg) => encode::configuration(&mut out, cfg).unwrap(),
            Event::RamStart { section_id } => {
                encode::section_start(
                    &mut out,
                    *section_id,
                    RAM_SECTION_IDSTR,
                    0,
                    RAM_SECTION_VERSION,
                )
                .unwrap();
                open = Some(*section_id);
            }
            Event::RamPart { section_id } => encode::section_part(&mut out, *section_id),
            Event::RamEnd { section_id } => encode::section_end(&mut out, *section_id),
            Event::MemSize { blocks } => encode::mem_size(&mut out, blocks).unwrap(),
            Event::Zero { block, offset } => {
                let b = block_arg(block);
                encode::zero_page(&mut out, b.as_deref(), *offset).unwrap();
            }
            Event::Page {
                block,
                offset,
                data,
            } => {
                let b = block_arg(block);
                encode::page(&mut out, b.as_deref(), *offset, data).unwrap();
            }
            Event::Flush => encode::flush(&mut out),
            Event::Eos => encode::eos(&mut out),
            Event::Footer { section_id } => {
                assert_eq!(open, Some(*section_id));
                encode::section_footer(&mut out, *section_id);
            }
            Event::Command(cmd) => encode::command(&mut out, *cmd),
            Event::DeviceTail => {}
            Event::Eof => encode::eof(&mut out),
            Event::VmDesc { json } => encode::vmdesc(&mut out, json).unwrap(),
        }
    }
    out
}

#[test]
fn minimal_stream_decodes_to_the_expected_events() {
    assert_eq!(MINIMAL.len(), 132);
    let mut dec = Decoder::new();
    let (events, end) = decode_with(&mut dec, MINIMAL);
    assert_eq!(events, minimal_events());
    assert_eq!(end, End::NeedMore(1), "only a vmdesc may follow");
    assert_eq!(dec.ram_section_id(), Some(1));
}

#[test]
fn minimal_stream_is_encoded_byte_for_byte() {
    assert_eq!(encode_events(&minimal_events()), MINIMAL);
}

/// Device sections of a captured `-M none` migration (timer, globalstate).
const NONE_DEVICES: &str = "\
    04000000000574696d65720000000000000002000000000000000000000000000000000000000000\
    0000007e0000000004000000030b676c6f62616c737461746500000000000000010000000a707265\
    6c61756e636800000000000000000000000000000000000000000000000100000000000000000000\
    00000000000000000000000000000000000000000000000000000000000000000000000000000000\
    00000000000000000000000000000000007e00000003";

/// The vmdesc of the same capture.
const NONE_VMDESC: &str = r#"{"configuration": {"vmsd_name": "configuration", "version": 1, "fields": [{"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": 4}]}, "page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, {"name": "unused", "type": "unused_buffer", "size": 8}, {"name": "cpu_clock_offset", "type": "int64", "size": 8}]}, {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4}, {"name": "runstate", "type": "buffer", "size": 32}, {"name": "has_vm_was_suspended", "type": "uint8", "size": 1}, {"name": "vm_was_suspended", "type": "uint8", "size": 1}, {"name": "unused", "type": "buffer", "size": 66}]}]}"#;

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// The whole main stream of a captured QEMU 10.0.2 `-M none` migration
/// (two channels, 8 MiB prefilled): 1160 bytes.
fn captured_none_stream() -> Vec<u8> {
    let mut events = minimal_events();
    events.pop(); // EOF
    // The capture has an extra PART with only EOS before the one with FLUSH.
    events.splice(
        7..7,
        [
            Event::RamPart { section_id: 1 },
            Event::Eos,
            Event::Footer { section_id: 1 },
        ],
    );
    let mut out = encode_events(&events);
    out.extend_from_slice(&unhex(NONE_DEVICES));
    encode::eof(&mut out);
    encode::vmdesc(&mut out, NONE_VMDESC.as_bytes()).unwrap();
    out
}

#[test]
fn captured_none_stream_with_device_tail() {
    let stream = captured_none_stream();
    assert_eq!(stream.len(), 1160);
    assert_eq!(
        &stream[..0x20],
        &unhex("5145564d0000000307000000046e6f6e6501000000010372616d000000000000")[..]
    );
    let (events, end) = decode_all(&stream);
    assert_eq!(events.len(), 20);
    assert_eq!(events[19], Event::DeviceTail);
    let End::DeviceTail(at) = end else {
        panic!("{end:?}")
    };
    assert_eq!(at, 0x95);
    assert_eq!(check_tail(&stream[at..]), Ok(Some(NONE_VMDESC.as_bytes())));
    let mut dec = Decoder::new();
    let _ = decode_with(&mut dec, &stream);
    assert_eq!(dec.decode(&stream[at..]), Err(WireError::DecoderFinished));
}

/// A stream with legacy ZERO records, PAGE records, commands and a vmdesc.
fn rich_stream() -> Vec<u8> {
    let mut s = Vec::new();
    encode::header(&mut s);
    encode::configuration(
        &mut s,
        &Configuration {
            machine: "pc-q35-10.0".into(),
            target_page_bits: None,
            capabilities: vec![],
            uuid: Some([9; 16]),
        },
    )
    .unwrap();
    encode::command(&mut s, Command::OpenReturnPath);
    encode::command(&mut s, Command::Ping(1));
    encode::section_start(&mut s, 2, "ram", 0, 4).unwrap();
    let blocks = [("m0", 0x1000_0000), ("pc.bios", 0x40000)].map(|(n, l)| RamBlockInfo {
        idstr: n.into(),
        used_length: l,
    });
    encode::mem_size(&mut s, &blocks).unwrap();
    encode::flush(&mut s);
    encode::eos(&mut s);
    encode::section_footer(&mut s, 2);
    encode::section_part(&mut s, 2);
    encode::zero_page(&mut s, Some("m0"), 0x1000).unwrap();
    encode::zero_page(&mut s, None, 0x5000).unwrap();
    encode::page(&mut s, Some("pc.bios"), 0x3000, &[0xAB; 4096]).unwrap();
    encode::eos(&mut s);
    encode::section_footer(&mut s, 2);
    encode::command(&mut s, Command::SwitchoverStart);
    encode::section_end(&mut s, 2);
    encode::zero_page(&mut s, None, 0x6000).unwrap();
    encode::flush(&mut s);
    encode::eos(&mut s);
    encode::section_footer(&mut s, 2);
    encode::eof(&mut s);
    encode::vmdesc(&mut s, b"{}").unwrap();
    s
}

#[test]
fn legacy_zero_records_resolve_continue_across_sections() {
    let s = rich_stream();
    let (events, end) = decode_all(&s);
    assert_eq!(end, End::NeedMore(1));
    let m0: Arc<str> = Arc::from("m0");
    let bios: Arc<str> = Arc::from("pc.bios");
    let ram: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Zero { .. } | Event::Page { .. }))
        .cloned()
        .collect();
    assert_eq!(
        ram,
        [
            Event::Zero {
                block: m0.clone(),
                offset: 0x1000
            },
            Event::Zero {
                block: m0,
                offset: 0x5000
            },
            Event::Page {
                block: bios.clone(),
                offset: 0x3000,
                data: (&[0xAB; 4096][..]).into()
            },
            Event::Zero {
                block: bios,
                offset: 0x6000
            },
        ]
    );
    assert_eq!(
        events.last(),
        Some(&Event::VmDesc {
            json: (&b"{}"[..]).into()
        })
    );
    assert_eq!(encode_events(&events), s);
}

#[test]
fn every_prefix_of_a_valid_stream_needs_more() {
    for stream in [MINIMAL.to_vec(), rich_stream(), captured_none_stream()] {
        let (full, _) = decode_all(&stream);
        for cut in 0..stream.len() {
            let (events, end) = decode_all(&stream[..cut]);
            assert!(events.len() <= full.len());
            assert_eq!(events[..], full[..events.len()], "cut at {cut}");
            match end {
                End::NeedMore(_) | End::DeviceTail(_) => {}
                End::Error(e) => panic!("prefix of {cut} bytes: {e}"),
            }
        }
    }
}

#[test]
fn need_more_leaves_the_decoder_unchanged() {
    let mut dec = Decoder::new();
    let mut pos = 0;
    let mut events = Vec::new();
    // Feed one more byte each time the decoder asks for more.
    let mut avail = 0;
    while pos < MINIMAL.len() {
        match dec.decode(&MINIMAL[pos..pos + avail]).unwrap() {
            Decoded::NeedMore { at_least } => {
                assert!(at_least > avail && pos + at_least <= MINIMAL.len());
                avail += 1;
            }
            Decoded::Item { event, consumed } => {
                events.push(event);
                pos += consumed;
                avail -= consumed;
            }
        }
    }
    assert_eq!(events, minimal_events());
}

/// Replaces `len` bytes at `at` of the minimal stream, decodes, returns the error.
fn error_after_patch(at: usize, patch: &[u8]) -> WireError {
    let mut s = MINIMAL.to_vec();
    s[at..at + patch.len()].copy_from_slice(patch);
    match decode_all(&s).1 {
        End::Error(e) => e,
        end => panic!("patch at {at:#x} accepted: {end:?}"),
    }
}

fn error_after_insert(at: usize, extra: &[u8]) -> WireError {
    let mut s = MINIMAL.to_vec();
    s.splice(at..at, extra.iter().copied());
    match decode_all(&s).1 {
        End::Error(e) => e,
        end => panic!("insert at {at:#x} accepted: {end:?}"),
    }
}

#[test]
fn rejections() {
    use WireError as E;
    assert!(matches!(error_after_patch(0, b"QEVN"), E::BadMagic { .. }));
    assert!(matches!(
        error_after_patch(4, &[0, 0, 0, 2]),
        E::ObsoleteVersion { found: 2, .. }
    ));
    assert!(matches!(
        error_after_patch(4, &[0, 0, 0, 4]),
        E::BadVersion { found: 4, .. }
    ));
    assert!(matches!(
        error_after_patch(0x11, &[0x42]),
        E::UnknownElement(0x42)
    ));
    assert!(matches!(
        error_after_patch(0x11, &[0x05]),
        E::UnexpectedElement { element: 5, .. }
    ));
    // ram section: other version, other idstr, other instance.
    assert!(matches!(
        error_after_patch(0x21, &[5]),
        E::BadVersion { found: 5, .. }
    ));
    assert!(matches!(
        error_after_patch(0x17, b"rom"),
        E::UnsupportedSection { .. }
    ));
    assert!(matches!(
        error_after_patch(0x1d, &[1]),
        E::UnsupportedSection { instance_id: 1, .. }
    ));
    // MEM_SIZE total larger than the listed lengths: then the next bytes
    // are read as a block name and length, which overshoot.
    assert!(matches!(
        error_after_patch(0x26, &[0x05]),
        E::MemSizeMismatch { .. } | E::BadName { .. }
    ));
    assert!(matches!(
        error_after_patch(0x26, &[0x03]),
        E::MemSizeMismatch {
            total: 0x300_0000,
            ..
        }
    ));
    // START must begin with MEM_SIZE; MEM_SIZE later is refused.
    assert!(matches!(
        error_after_patch(0x29, &[0x10]),
        E::BadFlags { .. }
    ));
    assert!(matches!(
        error_after_patch(0x55, &[0x00, 0x04]),
        E::BadFlags { .. }
    ));
    assert!(matches!(
        error_after_patch(0x54, &[0x04]),
        E::InvalidField { .. }
    ));
    // Mismatched and missing footers.
    assert!(matches!(
        error_after_patch(0x49, &[2]),
        E::FooterMismatch {
            expected: 1,
            found: 2
        }
    ));
    assert!(matches!(
        error_after_patch(0x45, &[0x7d]),
        E::MissingFooter {
            section_id: 1,
            found: 0x7d
        }
    ));
    // PART of an unknown section.
    assert!(matches!(
        error_after_patch(0x4e, &[7]),
        E::UnknownSection { section_id: 7 }
    ));
    // Commands.
    assert!(matches!(
        error_after_patch(0x66, &[0x03]),
        E::UnsupportedCommand { command: 3, .. }
    ));
    assert!(matches!(
        error_after_patch(0x66, &[0x0c]),
        E::UnknownCommand(12)
    ));
    // EOF / FULL before the ram END.
    assert!(matches!(
        error_after_patch(0x64, &[0]),
        E::UnexpectedElement { element: 0, .. }
    ));
    assert!(matches!(
        error_after_patch(0x64, &[4]),
        E::UnexpectedElement { element: 4, .. }
    ));
    // After EOF only a vmdesc; after the vmdesc nothing.
    assert!(matches!(
        error_after_insert(132, &[0]),
        E::UnexpectedElement { element: 0, .. }
    ));
    assert!(matches!(
        error_after_insert(132, &[0x33]),
        E::UnknownElement(0x33)
    ));
    assert!(matches!(
        error_after_insert(132, &[6, 0, 0, 0, 0, 0]),
        E::UnexpectedElement { .. }
    ));
    assert!(matches!(
        error_after_insert(132, &[6, 0xff, 0, 0, 0]),
        E::InvalidField {
            field: "vmdesc length",
            ..
        }
    ));
    // A second START of "ram", a PART after the END.
    let start = &MINIMAL[0x11..0x22];
    assert!(matches!(
        error_after_insert(0x64, start),
        E::UnexpectedElement { element: 1, .. }
    ));
    assert!(matches!(
        error_after_insert(0x83, &MINIMAL[0x4a..0x64]),
        E::UnexpectedElement { element: 2, .. }
    ));
    // Command inside a section.
    assert!(matches!(
        error_after_insert(0x4f, &[8, 0, 11, 0, 0]),
        E::BadFlags { .. } | E::UnsupportedRecord { .. } | E::InvalidField { .. }
    ));
}

#[test]
fn zero_record_rejections() {
    use WireError as E;
    // CONTINUE without any block named before.
    let cont = [0, 0, 0, 0, 0, 0, 0x10, 0x22, 0];
    assert_eq!(
        error_after_insert(0x4f, &cont),
        E::ContinueWithoutBlock { offset: 0x1000 }
    );
    let fill = [0, 0, 0, 0, 0, 0, 0x10, 0x02, 2, b'm', b'0', 7];
    assert_eq!(
        error_after_insert(0x4f, &fill),
        E::NonZeroFill {
            offset: 0x1000,
            fill: 7
        }
    );
    // Several record types at once, unknown bits.
    assert!(matches!(
        error_after_insert(0x4f, &0x212u64.to_be_bytes()),
        E::BadFlags { .. }
    ));
    assert!(matches!(
        error_after_insert(0x4f, &0x401u64.to_be_bytes()),
        E::BadFlags { .. }
    ));
}

#[test]
fn validated_capabilities_block_mem_size() {
    for cap in ["mapped-ram", "x-ignore-shared"] {
        let mut s = Vec::new();
        encode::header(&mut s);
        let cfg = Configuration {
            machine: "none".into(),
            capabilities: vec![cap.into()],
            ..Configuration::default()
        };
        encode::configuration(&mut s, &cfg).unwrap();
        s.extend_from_slice(&MINIMAL[0x11..]);
        let (events, end) = decode_all(&s);
        assert_eq!(events[1], Event::Configuration(cfg));
        assert_eq!(
            end,
            End::Error(WireError::UnsupportedCapability { name: cap.into() })
        );
    }
}

// ---------------------------------------------------------------------------
// Property tests

/// One step of a generated ram stream.
#[derive(Debug, Clone)]
enum Op {
    /// A ZERO record: block index (or CONTINUE), page number.
    Zero(Option<usize>, u32),
    /// A PAGE record: block index (or CONTINUE), page number, fill byte.
    Page(Option<usize>, u32, u8),
    Flush,
    /// Close the current PART; a command at top level; open a new PART.
    Command(Command),
    /// Close the current PART and open a new one.
    NewPart,
}

fn op() -> impl Strategy<Value = Op> {
    let block = proptest::option::weighted(0.6, 0usize..4);
    prop_oneof![
        4 => (block.clone(), any::<u32>()).prop_map(|(b, p)| Op::Zero(b, p)),
        1 => (block, any::<u32>(), any::<u8>()).prop_map(|(b, p, f)| Op::Page(b, p, f)),
        2 => Just(Op::Flush),
        1 => prop_oneof![
            Just(Command::OpenReturnPath),
            any::<u32>().prop_map(Command::Ping),
            Just(Command::SwitchoverStart),
        ]
        .prop_map(Op::Command),
        1 => Just(Op::NewPart),
    ]
}

fn configuration() -> impl Strategy<Value = Configuration> {
    (
        "[a-z0-9.-]{1,40}",
        proptest::option::of(Just(12u32)),
        proptest::collection::vec("[a-z-]{1,20}", 0..3),
        proptest::option::of(any::<[u8; 16]>()),
    )
        .prop_map(
            |(machine, target_page_bits, capabilities, uuid)| Configuration {
                machine,
                target_page_bits,
                capabilities,
                uuid,
            },
        )
        .prop_filter("layout capabilities are refused", |c| {
            !c.capabilities
                .iter()
                .any(|c| c == "mapped-ram" || c == "x-ignore-shared")
        })
}

/// Builds a stream from ops; returns it and the events it must decode to.
fn build(
    cfg: &Configuration,
    section_id: u32,
    names: &[String],
    ops: &[Op],
    vmdesc: Option<&[u8]>,
) -> (Vec<u8>, Vec<Event<'static>>) {
    let mut s = Vec::new();
    let mut ev = vec![Event::Header, Event::Configuration(cfg.clone())];
    encode::header(&mut s);
    encode::configuration(&mut s, cfg).unwrap();
    encode::section_start(&mut s, section_id, "ram", 0, 4).unwrap();
    let blocks: Vec<_> = names
        .iter()
        .map(|n| RamBlockInfo {
            idstr: n.clone(),
            used_length: 1 << 44,
        })
        .collect();
    encode::mem_size(&mut s, &blocks).unwrap();
    ev.push(Event::RamStart { section_id });
    ev.push(Event::MemSize { blocks });
    let close = |s: &mut Vec<u8>, ev: &mut Vec<Event<'static>>| {
        encode::eos(s);
        encode::section_footer(s, section_id);
        ev.push(Event::Eos);
        ev.push(Event::Footer { section_id });
    };
    let open = |s: &mut Vec<u8>, ev: &mut Vec<Event<'static>>| {
        encode::section_part(s, section_id);
        ev.push(Event::RamPart { section_id });
    };
    let mut last: Option<Arc<str>> = None;
    let pages: &'static [[u8; 4096]] = Box::leak(
        ops.iter()
            .filter_map(|o| match o {
                Op::Page(_, _, fill) => Some([*fill; 4096]),
                _ => None,
            })
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let mut next_page = pages.iter();
    for o in ops {
        match o {
            Op::Zero(b, p) | Op::Page(b, p, _) => {
                // CONTINUE is only valid once a block was named.
                let b = b.or(if last.is_none() { Some(0) } else { None });
                let name = b.map(|i| names[i % names.len()].as_str());
                let block: Arc<str> = match name {
                    Some(n) => Arc::from(n),
                    None => last.clone().unwrap(),
                };
                last = Some(block.clone());
                let offset = u64::from(*p) << 12;
                if let Op::Page(..) = o {
                    let data = next_page.next().unwrap();
                    encode::page(&mut s, name, offset, data).unwrap();
                    ev.push(Event::Page {
                        block,
                        offset,
                        data: (&data[..]).into(),
                    });
                } else {
                    encode::zero_page(&mut s, name, offset).unwrap();
                    ev.push(Event::Zero { block, offset });
                }
            }
            Op::Flush => {
                encode::flush(&mut s);
                ev.push(Event::Flush);
            }
            Op::Command(cmd) => {
                close(&mut s, &mut ev);
                encode::command(&mut s, *cmd);
                ev.push(Event::Command(*cmd));
                open(&mut s, &mut ev);
            }
            Op::NewPart => {
                close(&mut s, &mut ev);
                open(&mut s, &mut ev);
            }
        }
    }
    close(&mut s, &mut ev);
    encode::section_end(&mut s, section_id);
    ev.push(Event::RamEnd { section_id });
    close(&mut s, &mut ev);
    encode::eof(&mut s);
    ev.push(Event::Eof);
    if let Some(json) = vmdesc {
        encode::vmdesc(&mut s, json).unwrap();
        let json: &'static [u8] = Box::leak(json.to_vec().into_boxed_slice());
        ev.push(Event::VmDesc { json: json.into() });
    }
    (s, ev)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_decode_round_trip(
        cfg in configuration(),
        section_id in any::<u32>(),
        names in proptest::collection::btree_set("[a-z0-9./@-]{1,30}", 1..4),
        ops in proptest::collection::vec(op(), 0..40),
        vmdesc in proptest::option::of(proptest::collection::vec(1u8..=255, 0..100)),
        chunk in 1usize..300,
    ) {
        let names: Vec<String> = names.into_iter().collect();
        let (stream, want) = build(&cfg, section_id, &names, &ops, vmdesc.as_deref());
        // All at once.
        let (events, end) = decode_all(&stream);
        prop_assert_eq!(&events, &want);
        prop_assert_eq!(end, End::NeedMore(1));
        // As a byte stream arriving in chunks.
        let mut dec = Decoder::new();
        let (mut pos, mut avail, mut got) = (0, 0, Vec::new());
        loop {
            match dec.decode(&stream[pos..pos + avail]).unwrap() {
                Decoded::Item { event, consumed } => {
                    got.push(event);
                    pos += consumed;
                    avail -= consumed;
                }
                Decoded::NeedMore { at_least } => {
                    prop_assert!(at_least > avail);
                    if pos + avail == stream.len() {
                        break;
                    }
                    avail = (avail + chunk).min(stream.len() - pos);
                }
            }
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn decode_never_panics(
        prefix in 0usize..4,
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        // Start from a valid prefix sometimes, to get past the header.
        let cut = [0, 8, 0x11, 0x2a][prefix];
        let mut input = MINIMAL[..cut].to_vec();
        input.extend_from_slice(&bytes);
        let _ = decode_all(&input);
        let _ = check_tail(&bytes);
    }

    #[test]
    fn mutated_streams_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut s = rich_stream();
        for (i, v) in flips {
            let i = i.index(s.len());
            s[i] = v;
        }
        let _ = decode_all(&s);
    }
}
