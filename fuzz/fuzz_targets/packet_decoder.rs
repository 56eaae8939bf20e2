//! Feeds arbitrary bytes to every multifd packet decoder; whatever decodes
//! is re-encoded and must decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::packet::{
    CommonHeader, DeviceStateHeader, InitPacket, PacketKind, RAM_PACKET_HEADER_SIZE,
    RamPacketEncoder, RamPacketHeader,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(init) = InitPacket::decode(data) {
        let bytes = init.encode();
        assert_eq!(InitPacket::decode(&bytes), Ok(init));
        assert_eq!(
            bytes[..24],
            data[..24],
            "magic, version and uuid are kept as sent"
        );
    }

    let common = CommonHeader::decode(data);
    if let Ok(h) = &common {
        // The kind must agree with which full-header decoder can succeed.
        match h.kind() {
            PacketKind::Ram => assert!(DeviceStateHeader::decode(data).is_err()),
            PacketKind::DeviceState => assert!(RamPacketHeader::decode(data).is_err()),
        }
    }

    if let Ok(hdr) = RamPacketHeader::decode(data) {
        assert!(common.is_ok());
        assert!(hdr.page_count() <= hdr.pages_alloc as usize);
        let mut buf = [0u8; RAM_PACKET_HEADER_SIZE];
        RamPacketEncoder {
            compression: hdr.compression,
            sync: hdr.is_sync(),
            packet_num: hdr.packet_num,
            ramblock: &hdr.ramblock,
            offsets: &hdr.offsets,
            normal_pages: hdr.normal_pages as usize,
            next_packet_size: hdr.next_packet_size,
        }
        .encode(&mut buf)
        .expect("a decoded header re-encodes");
        let again = RamPacketHeader::decode(&buf).expect("re-encoded header decodes");
        assert_eq!(again.is_sync(), hdr.is_sync());
        assert_eq!(again.packet_num, hdr.packet_num);
        assert_eq!(again.normal_pages, hdr.normal_pages);
        assert_eq!(again.zero_pages, hdr.zero_pages);
        assert_eq!(again.next_packet_size, hdr.next_packet_size);
        assert_eq!(again.ramblock, hdr.ramblock);
        assert_eq!(again.offsets, hdr.offsets);
        // A SYNC without pages is re-encoded QEMU 10.0 style (no compression
        // bit); otherwise the method survives.
        if hdr.page_count() > 0 || !hdr.is_sync() {
            assert_eq!(again.compression, hdr.compression);
        }
        // Encoding is canonical: a second round gives the same bytes.
        let mut buf2 = [0u8; RAM_PACKET_HEADER_SIZE];
        RamPacketEncoder {
            compression: again.compression,
            sync: again.is_sync(),
            packet_num: again.packet_num,
            ramblock: &again.ramblock,
            offsets: &again.offsets,
            normal_pages: again.normal_pages as usize,
            next_packet_size: again.next_packet_size,
        }
        .encode(&mut buf2)
        .expect("re-encodes");
        assert_eq!(buf, buf2);
    }

    if let Ok(ds) = DeviceStateHeader::decode(data) {
        assert!(common.is_ok());
        let bytes = ds.encode().expect("a decoded header re-encodes");
        assert_eq!(DeviceStateHeader::decode(&bytes), Ok(ds));
    }
});
