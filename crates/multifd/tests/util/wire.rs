//! Hand-made wire bytes: a main stream's sections, a channel's initial
//! packet, RAM and SYNC packets, and the field offsets and setters that
//! tests use to corrupt them.

use multifd::Compression;
use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{InitPacket, RAM_PACKET_HEADER_SIZE, RamPacketEncoder};
use multifd_wire::stream::{Configuration, RamBlockInfo, encode};

pub const RAM_SECTION: u32 = 1;

/// The start of every main stream: header and configuration (`none`).
pub fn main_head() -> Vec<u8> {
    let mut out = Vec::new();
    encode::header(&mut out);
    encode::configuration(
        &mut out,
        &Configuration {
            machine: "none".into(),
            ..Configuration::default()
        },
    )
    .unwrap();
    out
}

/// Main stream up to the end of the `ram` START section: [`main_head`],
/// START, MEM_SIZE, FLUSH (per-round), EOS, footer.
pub fn main_setup(blocks: &[(&str, u64)]) -> Vec<u8> {
    let mut out = main_head();
    encode::section_start(&mut out, RAM_SECTION, "ram", 0, 4).unwrap();
    let infos: Vec<RamBlockInfo> = blocks
        .iter()
        .map(|&(n, len)| RamBlockInfo {
            idstr: n.into(),
            used_length: len,
        })
        .collect();
    encode::mem_size(&mut out, &infos).unwrap();
    flush_and_close(&mut out);
    out
}

/// A PART section holding one FLUSH.
pub fn main_part() -> Vec<u8> {
    let mut out = Vec::new();
    encode::section_part(&mut out, RAM_SECTION);
    flush_and_close(&mut out);
    out
}

/// END section with one FLUSH, then EOF and a vmdesc.
pub fn main_end() -> Vec<u8> {
    let mut out = Vec::new();
    encode::section_end(&mut out, RAM_SECTION);
    flush_and_close(&mut out);
    encode::eof(&mut out);
    encode::vmdesc(&mut out, br#"{"page_size": 4096, "devices": []}"#).unwrap();
    out
}

/// The end of every `ram` section here: one FLUSH, EOS, the footer.
fn flush_and_close(out: &mut Vec<u8>) {
    encode::flush(out);
    encode::eos(out);
    encode::section_footer(out, RAM_SECTION);
}

pub fn init_packet(uuid: [u8; 16], id: u8) -> Vec<u8> {
    InitPacket { uuid, id }.encode().to_vec()
}

/// A RAM packet header: `offsets[..normal]` normal, the rest zero pages.
pub fn ram_header(
    compression: Compression,
    block: &str,
    offsets: &[u64],
    normal: usize,
    payload: u32,
    packet_num: u64,
) -> Vec<u8> {
    let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
    RamPacketEncoder {
        compression,
        sync: false,
        packet_num,
        ramblock: block,
        offsets,
        normal_pages: normal,
        next_packet_size: payload,
    }
    .encode(&mut buf)
    .unwrap();
    buf.to_vec()
}

/// An uncompressed data packet with `normal` pages of `fill` bytes.
pub fn nocomp_packet(
    block: &str,
    offsets: &[u64],
    normal: usize,
    fill: u8,
    packet_num: u64,
) -> Vec<u8> {
    let mut out = ram_header(
        Compression::None,
        block,
        offsets,
        normal,
        (normal * PAGE_SIZE) as u32,
        packet_num,
    );
    out.resize(out.len() + normal * PAGE_SIZE, fill);
    out
}

pub fn sync_packet(packet_num: u64) -> Vec<u8> {
    let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
    RamPacketEncoder {
        compression: Compression::None,
        sync: true,
        packet_num,
        ramblock: "",
        offsets: &[],
        normal_pages: 0,
        next_packet_size: 0,
    }
    .encode(&mut buf)
    .unwrap();
    buf.to_vec()
}

/// Overwrites a big-endian u32 field of a packet.
pub fn set_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Overwrites a big-endian u64 field of a packet.
pub fn set_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Byte offsets of RAM packet header fields (QEMU's `MultiFDPacket_t`).
pub mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 8;
    pub const PAGES_ALLOC: usize = 12;
    pub const NORMAL_PAGES: usize = 16;
    pub const NEXT_PACKET_SIZE: usize = 20;
    pub const ZERO_PAGES: usize = 32;
    pub const RAMBLOCK: usize = 64;
    pub const OFFSET: usize = 320;
}
