//! Multifd channel packets (QEMU 10.0 `MultiFDInit_t`, `MultiFDPacketHdr_t`,
//! `MultiFDPacket_t`, `MultiFDPacketDeviceState_t`).
//!
//! A multifd channel starts with one 64-byte [`InitPacket`], then carries a
//! sequence of packets, each a fixed-size header plus an optional payload:
//!
//! ```text
//! init (64 B) | RAM header (1344 B) + payload | RAM header (SYNC) | ... | DS header (276 B) + buffer | ...
//! ```
//!
//! Every packet starts with the 12-byte [`CommonHeader`] (magic, version,
//! flags); bit [`flags::DEVICE_STATE`] tells a device-state packet from a RAM
//! packet. The layouts are `#[repr(C)]` zerocopy structs of big-endian fields,
//! so the compiler checks sizes and offsets instead of an offset table.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{PAGE_SIZE_U64, WireError};

/// Magic of every multifd packet and of the initial packet.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// The only multifd packet version QEMU has ever used.
pub const MULTIFD_VERSION: u32 = 1;
/// Size of the initial packet sent first on every multifd channel.
pub const INIT_PACKET_SIZE: usize = 64;
/// Size of the header common to RAM and device-state packets.
pub const COMMON_HEADER_SIZE: usize = 12;
/// Size of a RAM block id / section idstr field.
pub const IDSTR_SIZE: usize = 256;
/// QEMU's `MULTIFD_PACKET_SIZE`: the payload of a full packet, 512 KiB.
pub const PACKET_DATA_SIZE: usize = 512 * 1024;
/// Pages per packet on a 4 KiB-page target: 512 KiB / 4 KiB.
pub const PAGES_PER_PACKET: usize = PACKET_DATA_SIZE / crate::PAGE_SIZE;
/// Size of a RAM packet header: 320 fixed bytes + one u64 offset per page slot.
pub const RAM_PACKET_HEADER_SIZE: usize = 320 + 8 * PAGES_PER_PACKET;
/// Size of a device-state packet header.
pub const DEVICE_STATE_HEADER_SIZE: usize = 276;
/// Largest compressed payload we accept or send. QEMU's receiver has a 1 MiB
/// buffer per channel and never bounds `next_packet_size` against it, so a
/// sender must stay below it; as a receiver we refuse anything larger.
pub const MAX_COMPRESSED_PAYLOAD: u32 = 1024 * 1024;
/// Largest device-state buffer we accept in one packet (a peer must not make
/// us allocate without bound). VFIO devices send state in far smaller pieces.
pub const MAX_DEVICE_STATE_PAYLOAD: u32 = 64 * 1024 * 1024;

/// Flag bits of the common header.
pub mod flags {
    /// End of a sync round on this channel.
    pub const SYNC: u32 = 0x01;
    /// zlib payload.
    pub const ZLIB: u32 = 0x02;
    /// zstd payload.
    pub const ZSTD: u32 = 0x04;
    /// Intel IAA through QPL.
    pub const QPL: u32 = 0x08;
    /// HiSilicon UADK.
    pub const UADK: u32 = 0x10;
    /// Intel QAT through QATzip.
    pub const QATZIP: u32 = 0x20;
    /// The packet carries device state rather than RAM.
    pub const DEVICE_STATE: u32 = 0x40;
    /// Bits 1..5: the payload method.
    pub const COMPRESSION_MASK: u32 = 0x3E;
    /// Every bit QEMU 10.0 defines.
    pub const KNOWN: u32 = SYNC | COMPRESSION_MASK | DEVICE_STATE;
}

/// The payload method named by the compression bits of a packet's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Raw pages (`multifd-compression=none`).
    None,
    /// One zlib stream per channel, sync-flushed per packet.
    Zlib,
    /// One zstd frame per channel, flushed per packet.
    Zstd,
    /// Intel IAA (recognised only).
    Qpl,
    /// HiSilicon UADK (recognised only).
    Uadk,
    /// Intel QAT (recognised only).
    Qatzip,
}

impl Compression {
    /// The flag value of this method (0 for none).
    pub const fn flag(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Zlib => flags::ZLIB,
            Self::Zstd => flags::ZSTD,
            Self::Qpl => flags::QPL,
            Self::Uadk => flags::UADK,
            Self::Qatzip => flags::QATZIP,
        }
    }

    /// The method named by the compression bits of `flags`.
    pub fn from_flags(flags_word: u32) -> Result<Self, WireError> {
        Ok(match flags_word & flags::COMPRESSION_MASK {
            0 => Self::None,
            flags::ZLIB => Self::Zlib,
            flags::ZSTD => Self::Zstd,
            flags::QPL => Self::Qpl,
            flags::UADK => Self::Uadk,
            flags::QATZIP => Self::Qatzip,
            _ => {
                return Err(WireError::BadFlags {
                    what: "packet (several compression bits)",
                    flags: flags_word.into(),
                });
            }
        })
    }

    /// QEMU's name for the method (`multifd-compression` values).
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
            Self::Qpl => "qpl",
            Self::Uadk => "uadk",
            Self::Qatzip => "qatzip",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Layouts

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawInit {
    magic: U32,
    version: U32,
    uuid: [u8; 16],
    id: u8,
    unused1: [u8; 7],
    unused2: [U64; 4],
}
const _: () = assert!(size_of::<RawInit>() == INIT_PACKET_SIZE);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCommon {
    magic: U32,
    version: U32,
    flags: U32,
}
const _: () = assert!(size_of::<RawCommon>() == COMMON_HEADER_SIZE);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRam {
    hdr: RawCommon,
    pages_alloc: U32,
    normal_pages: U32,
    next_packet_size: U32,
    packet_num: U64,
    zero_pages: U32,
    unused32: U32,
    unused64: [U64; 3],
    ramblock: [u8; IDSTR_SIZE],
    offset: [U64; PAGES_PER_PACKET],
}
const _: () = assert!(size_of::<RawRam>() == RAM_PACKET_HEADER_SIZE);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDeviceState {
    hdr: RawCommon,
    idstr: [u8; IDSTR_SIZE],
    instance_id: U32,
    next_packet_size: U32,
}
const _: () = assert!(size_of::<RawDeviceState>() == DEVICE_STATE_HEADER_SIZE);

fn need(what: &'static str, buf: &[u8], needed: usize) -> Result<(), WireError> {
    if buf.len() < needed {
        Err(WireError::Truncated {
            what,
            needed,
            available: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn check_magic_version(what: &'static str, magic: u32, version: u32) -> Result<(), WireError> {
    if magic != MULTIFD_MAGIC {
        return Err(WireError::BadMagic {
            what,
            found: magic,
            expected: MULTIFD_MAGIC,
        });
    }
    if version != MULTIFD_VERSION {
        return Err(WireError::BadVersion {
            what,
            found: version,
            expected: MULTIFD_VERSION,
        });
    }
    Ok(())
}

/// Decodes a NUL-terminated, NUL-padded idstr field into a name.
fn decode_idstr<'a>(what: &'static str, field: &'a [u8; IDSTR_SIZE]) -> Result<&'a str, WireError> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::BadName {
            what,
            reason: "not NUL-terminated",
        })?;
    if end == 0 {
        return Err(WireError::BadName {
            what,
            reason: "empty",
        });
    }
    std::str::from_utf8(&field[..end]).map_err(|_| WireError::BadName {
        what,
        reason: "not UTF-8",
    })
}

fn encode_idstr(name: &str) -> Result<[u8; IDSTR_SIZE], WireError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= IDSTR_SIZE || bytes.contains(&0) {
        return Err(WireError::BadName {
            what: "idstr to encode",
            reason: "empty, longer than 255 bytes, or containing NUL",
        });
    }
    let mut field = [0u8; IDSTR_SIZE];
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(field)
}

// ---------------------------------------------------------------------------
// Initial packet

/// The 64-byte packet that opens every multifd channel (`MultiFDInit_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPacket {
    /// The VM UUID; a QEMU destination requires its own UUID here.
    pub uuid: [u8; 16],
    /// Channel id, `0..N`.
    pub id: u8,
}

impl InitPacket {
    /// Encodes the packet (`multifd_send_initial_packet()`).
    pub fn encode(&self) -> [u8; INIT_PACKET_SIZE] {
        let raw = RawInit {
            magic: MULTIFD_MAGIC.into(),
            version: MULTIFD_VERSION.into(),
            uuid: self.uuid,
            id: self.id,
            unused1: [0; 7],
            unused2: [U64::ZERO; 4],
        };
        let mut out = [0u8; INIT_PACKET_SIZE];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes and checks magic and version (`multifd_recv_initial_packet()`).
    /// The caller checks the UUID and the id against its own configuration.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        need("initial packet", buf, INIT_PACKET_SIZE)?;
        let raw = RawInit::ref_from_bytes(&buf[..INIT_PACKET_SIZE]).expect("size checked");
        check_magic_version("initial packet", raw.magic.get(), raw.version.get())?;
        Ok(Self {
            uuid: raw.uuid,
            id: raw.id,
        })
    }
}

// ---------------------------------------------------------------------------
// Common header

/// What kind of packet a common header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// A RAM packet: read the rest of the 1344-byte header.
    Ram,
    /// A device-state packet: read the rest of the 276-byte header.
    DeviceState,
}

/// The 12 bytes every packet starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    /// The flags word.
    pub flags: u32,
}

impl CommonHeader {
    /// Decodes magic, version and flags; rejects flag bits QEMU 10.0 does not define.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        need("packet header", buf, COMMON_HEADER_SIZE)?;
        let raw = RawCommon::ref_from_bytes(&buf[..COMMON_HEADER_SIZE]).expect("size checked");
        check_magic_version("packet", raw.magic.get(), raw.version.get())?;
        let flags_word = raw.flags.get();
        if flags_word & !flags::KNOWN != 0 {
            return Err(WireError::BadFlags {
                what: "packet header",
                flags: flags_word.into(),
            });
        }
        Ok(Self { flags: flags_word })
    }

    /// Which header follows.
    pub fn kind(&self) -> PacketKind {
        if self.flags & flags::DEVICE_STATE != 0 {
            PacketKind::DeviceState
        } else {
            PacketKind::Ram
        }
    }
}

// ---------------------------------------------------------------------------
// RAM packet

/// A decoded, validated RAM packet header (`MultiFDPacket_t`).
///
/// Validation done here: magic, version, known flags, a single compression
/// method, `pages_alloc <= 128`, `normal + zero <= pages_alloc`, a proper
/// block name when the packet carries pages, page-aligned offsets, a payload
/// size consistent with the method. What needs the receiver's state (the
/// block exists, each offset lies inside it, the method is the configured
/// one) is checked by the receiver, see [`RamPacketHeader::check_offsets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamPacketHeader {
    /// The flags word.
    pub flags: u32,
    /// Payload method named by the flags.
    pub compression: Compression,
    /// Capacity field (128 in QEMU 10.0 data packets, 0 in SYNC packets).
    pub pages_alloc: u32,
    /// Number of pages whose data follows.
    pub normal_pages: u32,
    /// Payload bytes after the header.
    pub next_packet_size: u32,
    /// Global packet sequence number.
    pub packet_num: u64,
    /// Number of zero pages listed after the normal ones.
    pub zero_pages: u32,
    /// RAM block id; empty when the packet carries no pages.
    pub ramblock: String,
    /// `normal_pages` normal offsets then `zero_pages` zero offsets.
    pub offsets: Vec<u64>,
}

impl RamPacketHeader {
    /// True when the SYNC flag is set.
    pub fn is_sync(&self) -> bool {
        self.flags & flags::SYNC != 0
    }

    /// Offsets of the pages whose data follows, in payload order.
    pub fn normal(&self) -> &[u64] {
        &self.offsets[..self.normal_pages as usize]
    }

    /// Offsets of the pages to be zeroed.
    pub fn zero(&self) -> &[u64] {
        &self.offsets[self.normal_pages as usize..]
    }

    /// Total pages described (normal + zero).
    pub fn page_count(&self) -> usize {
        self.offsets.len()
    }

    /// Checks every offset against a block of `block_len` bytes:
    /// `offset + PAGE_SIZE <= block_len`.
    pub fn check_offsets(&self, block_len: u64) -> Result<(), WireError> {
        for &off in &self.offsets {
            if off
                .checked_add(PAGE_SIZE_U64)
                .is_none_or(|end| end > block_len)
            {
                return Err(WireError::InvalidField {
                    field: "page offset",
                    value: off,
                    reason: "past the end of its RAM block",
                });
            }
        }
        Ok(())
    }

    /// Decodes the full 1344-byte header (the first 12 bytes included).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        need("RAM packet header", buf, RAM_PACKET_HEADER_SIZE)?;
        let common = CommonHeader::decode(buf)?;
        if common.kind() != PacketKind::Ram {
            return Err(WireError::BadFlags {
                what: "RAM packet (device-state bit set)",
                flags: common.flags.into(),
            });
        }
        let raw = RawRam::ref_from_bytes(&buf[..RAM_PACKET_HEADER_SIZE]).expect("size checked");
        let compression = Compression::from_flags(common.flags)?;
        let pages_alloc = raw.pages_alloc.get();
        let normal_pages = raw.normal_pages.get();
        let zero_pages = raw.zero_pages.get();
        let next_packet_size = raw.next_packet_size.get();
        if pages_alloc as usize > PAGES_PER_PACKET {
            return Err(WireError::InvalidField {
                field: "pages_alloc",
                value: pages_alloc.into(),
                reason: "more than 128 pages",
            });
        }
        if normal_pages > pages_alloc {
            return Err(WireError::InvalidField {
                field: "normal_pages",
                value: normal_pages.into(),
                reason: "more than pages_alloc",
            });
        }
        if zero_pages > pages_alloc - normal_pages {
            return Err(WireError::InvalidField {
                field: "zero_pages",
                value: zero_pages.into(),
                reason: "normal + zero pages exceed pages_alloc",
            });
        }
        let count = (normal_pages + zero_pages) as usize;
        match compression {
            Compression::None => {
                if u64::from(next_packet_size) != u64::from(normal_pages) * PAGE_SIZE_U64 {
                    return Err(WireError::InvalidField {
                        field: "next_packet_size",
                        value: next_packet_size.into(),
                        reason: "not normal_pages x 4096 for an uncompressed packet",
                    });
                }
            }
            _ => {
                if next_packet_size > MAX_COMPRESSED_PAYLOAD {
                    return Err(WireError::InvalidField {
                        field: "next_packet_size",
                        value: next_packet_size.into(),
                        reason: "compressed payload over 1 MiB",
                    });
                }
                if normal_pages == 0 && next_packet_size != 0 {
                    return Err(WireError::InvalidField {
                        field: "next_packet_size",
                        value: next_packet_size.into(),
                        reason: "payload in a packet without normal pages",
                    });
                }
                if normal_pages != 0 && next_packet_size == 0 {
                    return Err(WireError::InvalidField {
                        field: "next_packet_size",
                        value: 0,
                        reason: "no payload for normal pages",
                    });
                }
            }
        }
        let (ramblock, offsets) = if count == 0 {
            (String::new(), Vec::new())
        } else {
            let name = decode_idstr("RAM packet ramblock", &raw.ramblock)?;
            let mut offsets = Vec::with_capacity(count);
            for off in &raw.offset[..count] {
                let off = off.get();
                if off % PAGE_SIZE_U64 != 0 {
                    return Err(WireError::InvalidField {
                        field: "page offset",
                        value: off,
                        reason: "not page-aligned",
                    });
                }
                offsets.push(off);
            }
            (name.to_owned(), offsets)
        };
        Ok(Self {
            flags: common.flags,
            compression,
            pages_alloc,
            normal_pages,
            next_packet_size,
            packet_num: raw.packet_num.get(),
            zero_pages,
            ramblock,
            offsets,
        })
    }
}

/// Encodes RAM packet headers into a caller-owned 1344-byte buffer without
/// allocating (`multifd_send_fill_packet()`).
#[derive(Debug, Clone, Copy)]
pub struct RamPacketEncoder<'a> {
    /// Payload method; its flag is set when the packet carries pages.
    pub compression: Compression,
    /// Set SYNC.
    pub sync: bool,
    /// Global packet number.
    pub packet_num: u64,
    /// RAM block id (ignored when `offsets` is empty).
    pub ramblock: &'a str,
    /// Offsets: the first `normal_pages` are normal pages, the rest zero pages.
    pub offsets: &'a [u64],
    /// How many of `offsets` are normal pages.
    pub normal_pages: usize,
    /// Payload size after the header.
    pub next_packet_size: u32,
}

impl RamPacketEncoder<'_> {
    /// Writes the header into `out`. A packet without pages is written the
    /// way QEMU 10.0 writes a SYNC: pages_alloc 0, empty ramblock, no
    /// compression bit.
    pub fn encode(&self, out: &mut [u8; RAM_PACKET_HEADER_SIZE]) -> Result<(), WireError> {
        if self.offsets.len() > PAGES_PER_PACKET || self.normal_pages > self.offsets.len() {
            return Err(WireError::InvalidField {
                field: "page count to encode",
                value: self.offsets.len() as u64,
                reason: "more than 128 pages or normal > total",
            });
        }
        let has_pages = !self.offsets.is_empty();
        let mut flags_word = if self.sync { flags::SYNC } else { 0 };
        if has_pages || !self.sync {
            flags_word |= self.compression.flag();
        }
        let raw = RawRam::mut_from_bytes(&mut out[..]).expect("size is exact");
        raw.hdr.magic = MULTIFD_MAGIC.into();
        raw.hdr.version = MULTIFD_VERSION.into();
        raw.hdr.flags = flags_word.into();
        raw.pages_alloc = if has_pages || !self.sync {
            (PAGES_PER_PACKET as u32).into()
        } else {
            U32::ZERO
        };
        raw.normal_pages = (self.normal_pages as u32).into();
        raw.next_packet_size = self.next_packet_size.into();
        raw.packet_num = self.packet_num.into();
        raw.zero_pages = ((self.offsets.len() - self.normal_pages) as u32).into();
        raw.unused32 = U32::ZERO;
        raw.unused64 = [U64::ZERO; 3];
        raw.ramblock = if has_pages {
            encode_idstr(self.ramblock)?
        } else {
            [0; IDSTR_SIZE]
        };
        for (slot, &off) in raw.offset.iter_mut().zip(self.offsets) {
            *slot = off.into();
        }
        for slot in raw.offset.iter_mut().skip(self.offsets.len()) {
            *slot = U64::ZERO;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Device-state packet

/// A decoded, validated device-state packet header (`MultiFDPacketDeviceState_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStateHeader {
    /// Section idstr of the device.
    pub idstr: String,
    /// Instance id of the device.
    pub instance_id: u32,
    /// Length of the opaque buffer that follows.
    pub next_packet_size: u32,
}

impl DeviceStateHeader {
    /// Decodes the full 276-byte header (the first 12 bytes included).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        need("device-state packet header", buf, DEVICE_STATE_HEADER_SIZE)?;
        let common = CommonHeader::decode(buf)?;
        if common.kind() != PacketKind::DeviceState {
            return Err(WireError::BadFlags {
                what: "device-state packet (device-state bit clear)",
                flags: common.flags.into(),
            });
        }
        if common.flags != flags::DEVICE_STATE {
            return Err(WireError::BadFlags {
                what: "device-state packet (SYNC or compression set)",
                flags: common.flags.into(),
            });
        }
        let raw =
            RawDeviceState::ref_from_bytes(&buf[..DEVICE_STATE_HEADER_SIZE]).expect("size checked");
        let idstr = decode_idstr("device-state idstr", &raw.idstr)?.to_owned();
        let size = raw.next_packet_size.get();
        if size == 0 {
            return Err(WireError::InvalidField {
                field: "next_packet_size",
                value: 0,
                reason: "empty device state packet",
            });
        }
        if size > MAX_DEVICE_STATE_PAYLOAD {
            return Err(WireError::InvalidField {
                field: "next_packet_size",
                value: size.into(),
                reason: "device state packet over 64 MiB",
            });
        }
        Ok(Self {
            idstr,
            instance_id: raw.instance_id.get(),
            next_packet_size: size,
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> Result<[u8; DEVICE_STATE_HEADER_SIZE], WireError> {
        if self.next_packet_size == 0 || self.next_packet_size > MAX_DEVICE_STATE_PAYLOAD {
            return Err(WireError::InvalidField {
                field: "next_packet_size",
                value: self.next_packet_size.into(),
                reason: "device state must be 1 byte to 64 MiB",
            });
        }
        let raw = RawDeviceState {
            hdr: RawCommon {
                magic: MULTIFD_MAGIC.into(),
                version: MULTIFD_VERSION.into(),
                flags: flags::DEVICE_STATE.into(),
            },
            idstr: encode_idstr(&self.idstr)?,
            instance_id: self.instance_id.into(),
            next_packet_size: self.next_packet_size.into(),
        };
        let mut out = [0u8; DEVICE_STATE_HEADER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn init_packet_matches_capture() {
        // Channel id 1, no -uuid, as captured from QEMU 10.0.2.
        let bytes = InitPacket {
            uuid: [0; 16],
            id: 1,
        }
        .encode();
        let mut want = [0u8; 64];
        want[..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        want[24] = 1;
        assert_eq!(bytes, want);
        assert_eq!(InitPacket::decode(&bytes).unwrap().id, 1);
    }

    #[test]
    fn init_packet_rejects_bad_magic_version_and_truncation() {
        let mut bytes = InitPacket {
            uuid: [7; 16],
            id: 0,
        }
        .encode();
        assert!(matches!(
            InitPacket::decode(&bytes[..63]),
            Err(WireError::Truncated { .. })
        ));
        bytes[7] = 2;
        assert!(matches!(
            InitPacket::decode(&bytes),
            Err(WireError::BadVersion { found: 2, .. })
        ));
        bytes[0] = 0x51;
        assert!(matches!(
            InitPacket::decode(&bytes),
            Err(WireError::BadMagic { .. })
        ));
    }

    fn data_packet(offsets: &[u64], normal: usize) -> [u8; RAM_PACKET_HEADER_SIZE] {
        let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
        RamPacketEncoder {
            compression: Compression::None,
            sync: false,
            packet_num: 3,
            ramblock: "m0",
            offsets,
            normal_pages: normal,
            next_packet_size: (normal * 4096) as u32,
        }
        .encode(&mut buf)
        .unwrap();
        buf
    }

    #[test]
    fn ram_packet_matches_capture_layout() {
        let offsets: Vec<u64> = (0..128).map(|i| i * 4096).collect();
        let buf = data_packet(&offsets, 96);
        assert_eq!(
            &buf[..32],
            &[
                0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0x60, 0,
                0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3
            ]
        );
        assert_eq!(&buf[32..36], &[0, 0, 0, 0x20]);
        assert_eq!(&buf[64..67], b"m0\0");
        assert_eq!(&buf[320 + 8..320 + 16], &4096u64.to_be_bytes());
        let hdr = RamPacketHeader::decode(&buf).unwrap();
        assert_eq!(hdr.normal().len(), 96);
        assert_eq!(hdr.zero().len(), 32);
        assert_eq!(hdr.ramblock, "m0");
    }

    #[test]
    fn sync_packet_is_qemu_10_shaped() {
        let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
        RamPacketEncoder {
            compression: Compression::Zstd,
            sync: true,
            packet_num: 9,
            ramblock: "",
            offsets: &[],
            normal_pages: 0,
            next_packet_size: 0,
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(
            &buf[8..12],
            &[0, 0, 0, 1],
            "SYNC carries no compression bit"
        );
        assert_eq!(&buf[12..16], &[0, 0, 0, 0], "pages_alloc is 0 in a SYNC");
        assert!(buf[64..].iter().all(|&b| b == 0));
        let hdr = RamPacketHeader::decode(&buf).unwrap();
        assert!(hdr.is_sync());
        assert_eq!(hdr.page_count(), 0);
    }

    #[test]
    fn ram_packet_rejections() {
        let offsets: Vec<u64> = (0..4).map(|i| i * 4096).collect();
        let good = data_packet(&offsets, 2);
        let set32 =
            |buf: &mut [u8], at: usize, v: u32| buf[at..at + 4].copy_from_slice(&v.to_be_bytes());

        let mut b = good;
        set32(&mut b, 12, 129);
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::InvalidField {
                field: "pages_alloc",
                ..
            })
        ));

        let mut b = good;
        set32(&mut b, 32, 127);
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::InvalidField {
                field: "zero_pages",
                ..
            })
        ));

        let mut b = good;
        set32(&mut b, 8, 0x80);
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::BadFlags { .. })
        ));

        let mut b = good;
        set32(&mut b, 8, 0x06);
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::BadFlags { .. })
        ));

        let mut b = good;
        b[64..320].fill(b'x');
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::BadName { .. })
        ));

        let mut b = good;
        b[320 + 7] = 1;
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::InvalidField {
                field: "page offset",
                ..
            })
        ));

        let mut b = good;
        set32(&mut b, 20, 4096);
        assert!(matches!(
            RamPacketHeader::decode(&b),
            Err(WireError::InvalidField {
                field: "next_packet_size",
                ..
            })
        ));

        assert!(matches!(
            RamPacketHeader::decode(&good[..1343]),
            Err(WireError::Truncated { .. })
        ));

        let hdr = RamPacketHeader::decode(&good).unwrap();
        assert!(hdr.check_offsets(4 * 4096).is_ok());
        assert!(hdr.check_offsets(4 * 4096 - 1).is_err());
    }

    #[test]
    fn device_state_round_trip_and_rules() {
        let h = DeviceStateHeader {
            idstr: "0000:00:02.0/vfio".into(),
            instance_id: 0,
            next_packet_size: 100,
        };
        let bytes = h.encode().unwrap();
        assert_eq!(
            CommonHeader::decode(&bytes).unwrap().kind(),
            PacketKind::DeviceState
        );
        assert_eq!(DeviceStateHeader::decode(&bytes).unwrap(), h);
        let mut b = bytes;
        b[11] |= 1;
        assert!(
            DeviceStateHeader::decode(&b).is_err(),
            "SYNC on device state"
        );
        let mut b = bytes;
        b[272..276].fill(0);
        assert!(DeviceStateHeader::decode(&b).is_err(), "empty device state");
    }

    fn compression() -> impl Strategy<Value = Compression> {
        prop_oneof![
            Just(Compression::None),
            Just(Compression::Zlib),
            Just(Compression::Zstd)
        ]
    }

    proptest! {
        #[test]
        fn ram_packet_round_trip(
            pages in proptest::collection::btree_set(0u64..1_000_000, 1..=128usize),
            normal_frac in 0.0f64..=1.0,
            comp in compression(),
            packet_num in any::<u64>(),
            name in "[a-z./@0-9]{1,255}",
        ) {
            let offsets: Vec<u64> = pages.into_iter().map(|p| p * 4096).collect();
            let normal = ((offsets.len() as f64) * normal_frac) as usize;
            let size = match comp {
                Compression::None => (normal * 4096) as u32,
                _ if normal == 0 => 0,
                _ => 1000,
            };
            let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
            RamPacketEncoder {
                compression: comp, sync: false, packet_num, ramblock: &name,
                offsets: &offsets, normal_pages: normal, next_packet_size: size,
            }.encode(&mut buf).unwrap();
            let hdr = RamPacketHeader::decode(&buf).unwrap();
            prop_assert_eq!(hdr.compression, comp);
            prop_assert_eq!(hdr.packet_num, packet_num);
            prop_assert_eq!(&hdr.ramblock, &name);
            prop_assert_eq!(hdr.normal(), &offsets[..normal]);
            prop_assert_eq!(hdr.zero(), &offsets[normal..]);
        }

        #[test]
        fn ram_packet_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let _ = RamPacketHeader::decode(&bytes);
            let _ = DeviceStateHeader::decode(&bytes);
            let _ = InitPacket::decode(&bytes);
        }

        #[test]
        fn init_round_trip(uuid in any::<[u8; 16]>(), id in any::<u8>()) {
            let p = InitPacket { uuid, id };
            prop_assert_eq!(InitPacket::decode(&p.encode()).unwrap(), p);
        }
    }
}
