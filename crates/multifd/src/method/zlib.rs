//! zlib, framed as QEMU's multifd-zlib: one zlib stream (with its 2-byte
//! header, never finished) per channel for the whole migration; the pages of
//! a packet are fed without flushing and the packet ends with a sync flush,
//! so its payload ends in `00 00 ff ff` and decodes given the packets
//! before it. The sender feeds the pages one by one, as QEMU does; how the
//! input was cut does not matter to a receiver.
//!
//! Pages that look incompressible (random, encrypted or compressed data)
//! go into the stream as stored blocks, written by hand where the stream is
//! byte-aligned (after a sync flush), instead of through the compressor:
//! deflate would spend twice its usual time on them to make them larger.
//! The compressor then forgets its window before its next page, since the
//! receiver's window holds the stored bytes it never saw. Any inflate
//! decodes the result; only the cost of a page and its size differ.
//!
//! The stream is never finished, so its Adler-32 trailer is never written
//! nor checked: both ends run a raw deflate stream and handle the 2-byte
//! zlib header themselves (the sender puts the header a zlib stream of its
//! level starts with before its first packet, the receiver checks and skips
//! it), so neither computes a checksum nobody reads. The bytes on the wire
//! are those of a zlib stream, unchanged.

use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress, Status};
use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{Compression, MAX_COMPRESSED_PAYLOAD, RamPacketHeader};

use super::incompressible::looks_incompressible;
use super::{
    DataPages, RecvMethod, SendMethod, compression_failed, compressor_input, corrupt, read_payload,
    scatter,
};
use crate::error::{Error, Result};
use crate::ram::PageList;
use crate::transport::{Connection, IoSlice};

pub(super) struct ZlibSend {
    /// Raw deflate: the zlib stream without its header and checksum.
    z: Compress,
    /// The zlib header, until the first packet carries it.
    header: Option<[u8; 2]>,
    /// Whether the compressor took input since its last sync flush.
    open: bool,
    /// Whether pages were stored since the compressor last started afresh:
    /// the receiver's window then holds bytes the compressor never saw, so
    /// it must forget its own window before it compresses again (its
    /// matches would point at the wrong bytes otherwise).
    stored: bool,
    input: Vec<u8>,
    out: Vec<u8>,
}

/// The 2-byte header a zlib stream compressing at `level` starts with.
fn zlib_header(level: u32) -> [u8; 2] {
    let mut z = Compress::new(Level::new(level), true);
    let mut out = Vec::with_capacity(64);
    z.compress_vec(&[], &mut out, FlushCompress::Sync)
        .expect("flushing an empty zlib stream");
    [out[0], out[1]]
}

/// The header of a stored deflate block of `len` bytes that is not the
/// last (RFC 1951: BFINAL 0 and BTYPE 00 padded to the byte, LEN, NLEN).
/// It may only start where the stream is byte-aligned: at the start or
/// after a sync flush.
fn stored_block_header(len: u16) -> [u8; 5] {
    let [l0, l1] = len.to_le_bytes();
    let [n0, n1] = (!len).to_le_bytes();
    [0, l0, l1, n0, n1]
}

/// Feeds `input` to `z` with `flush`, appending all it gives to `out`.
fn deflate(z: &mut Compress, out: &mut Vec<u8>, input: &[u8], flush: FlushCompress) -> Result<()> {
    let start = z.total_in();
    loop {
        if out.capacity() - out.len() < 64 * 1024 {
            out.reserve(64 * 1024);
        }
        let consumed = (z.total_in() - start) as usize;
        z.compress_vec(&input[consumed..], out, flush)
            .map_err(|e| compression_failed("zlib", e))?;
        let all_in = (z.total_in() - start) as usize == input.len();
        // All is in (and a flush complete) once the output was not filled.
        if all_in && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

impl ZlibSend {
    pub(super) fn new(level: u32) -> Self {
        Self {
            z: Compress::new(Level::new(level), false),
            header: Some(zlib_header(level)),
            open: false,
            stored: false,
            input: Vec::new(),
            out: Vec::with_capacity(MAX_COMPRESSED_PAYLOAD as usize),
        }
    }
}

impl SendMethod for ZlibSend {
    fn compression(&self) -> Compression {
        Compression::Zlib
    }

    fn prepare<'a>(
        &'a mut self,
        pages: DataPages<'a, '_>,
        iovs: &mut Vec<IoSlice<'a>>,
    ) -> Result<u32> {
        self.out.clear();
        if let Some(header) = self.header.take() {
            self.out.extend_from_slice(&header);
        }
        let mut ends_stored = false;
        for chunk in compressor_input(pages, &mut self.input) {
            for page in chunk.chunks(PAGE_SIZE) {
                if looks_incompressible(page) {
                    if self.open {
                        deflate(&mut self.z, &mut self.out, &[], FlushCompress::Sync)?;
                        self.open = false;
                    }
                    self.out
                        .extend_from_slice(&stored_block_header(page.len() as u16));
                    self.out.extend_from_slice(page);
                    self.stored = true;
                    ends_stored = true;
                } else {
                    if self.stored {
                        self.z.reset();
                        self.stored = false;
                    }
                    deflate(&mut self.z, &mut self.out, page, FlushCompress::None)?;
                    self.open = true;
                    ends_stored = false;
                }
            }
        }
        // Every payload ends with the empty stored block of a sync flush.
        if self.open {
            deflate(&mut self.z, &mut self.out, &[], FlushCompress::Sync)?;
            self.open = false;
        } else if ends_stored {
            self.out.extend_from_slice(&stored_block_header(0));
        }
        if self.out.len() > MAX_COMPRESSED_PAYLOAD as usize {
            return Err(compression_failed(
                "zlib",
                "payload over 1 MiB (QEMU's receive buffer)",
            ));
        }
        iovs.push(IoSlice::new(&self.out));
        Ok(self.out.len() as u32)
    }
}

pub(super) struct ZlibRecv {
    channel: u8,
    /// Raw inflate: the zlib stream after its header, checksum unchecked
    /// (the stream never ends, so its trailer never comes).
    z: Decompress,
    /// Whether the zlib header (at the start of the first packet) was read.
    header_read: bool,
    payload: Vec<u8>,
    pages: Vec<u8>,
}

impl ZlibRecv {
    pub(super) fn new(channel: u8) -> Self {
        Self {
            channel,
            z: Decompress::new(false),
            header_read: false,
            payload: Vec::new(),
            pages: Vec::new(),
        }
    }

    /// Checks the zlib header at the start of the payload (RFC 1950:
    /// deflate, a window of at most 32 KiB, no preset dictionary, check
    /// bits right); returns its length.
    fn read_header(&mut self) -> Result<usize> {
        let [cmf, flg, ..] = self.payload[..] else {
            return Err(self.corrupt("first packet shorter than a zlib header"));
        };
        let ok = cmf & 0x0f == 8
            && cmf >> 4 <= 7
            && flg & 0x20 == 0
            && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0;
        if !ok {
            return Err(self.corrupt(format!("not a zlib header: {cmf:02x} {flg:02x}")));
        }
        self.header_read = true;
        Ok(2)
    }

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        corrupt(self.channel, "zlib", reason)
    }

    /// Inflates `payload[pos..]` into `out`; returns (input used, output made).
    fn inflate(&mut self, pos: usize, out_from: usize, scratch: bool) -> Result<(usize, usize)> {
        let (in0, out0) = (self.z.total_in(), self.z.total_out());
        let mut spare = [0u8; 64];
        let out: &mut [u8] = if scratch {
            &mut spare
        } else {
            &mut self.pages[out_from..]
        };
        let status = self
            .z
            .decompress(&self.payload[pos..], out, FlushDecompress::Sync)
            .map_err(|e| corrupt(self.channel, "zlib", e.to_string()))?;
        if status == Status::StreamEnd {
            return Err(self.corrupt("the stream ended inside a migration"));
        }
        Ok((
            (self.z.total_in() - in0) as usize,
            (self.z.total_out() - out0) as usize,
        ))
    }
}

impl RecvMethod for ZlibRecv {
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        pages: PageList<'_, '_>,
        conn: &mut Connection,
    ) -> Result<()> {
        read_payload(conn, self.channel, hdr.next_packet_size, &mut self.payload)?;
        // A packet of zero pages only has an empty payload, even first.
        let mut pos = if self.header_read || self.payload.is_empty() {
            0
        } else {
            self.read_header()?
        };
        self.pages.resize(pages.len() * PAGE_SIZE, 0);
        let mut filled = 0;
        while filled < self.pages.len() {
            let (used, made) = self.inflate(pos, filled, false)?;
            if used == 0 && made == 0 {
                return Err(self.corrupt(format!(
                    "payload of {} bytes holds only {filled} of {} bytes of pages",
                    hdr.next_packet_size,
                    self.pages.len()
                )));
            }
            pos += used;
            filled += made;
        }
        // The sync flush's empty stored block may still be unread, and the
        // decoder may hold the rest of a match beyond the pages even with
        // all input read: one more call, with room to spare, finds either.
        loop {
            let (used, made) = self.inflate(pos, 0, true)?;
            if made != 0 {
                return Err(self.corrupt("more data than the packet's pages"));
            }
            if pos + used == self.payload.len() {
                break;
            }
            if used == 0 {
                return Err(self.corrupt(format!(
                    "{} bytes left over after {} pages",
                    self.payload.len() - pos,
                    pages.len()
                )));
            }
            pos += used;
        }
        scatter(pages, &self.pages)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use multifd_wire::PAGE_SIZE;

    use super::*;
    use crate::ram::RamBlock;
    use crate::transport::Connection;

    #[test]
    fn payloads_are_those_of_a_zlib_stream() {
        // Header plus raw deflate must give, packet by packet, the bytes a
        // zlib stream fed page by page with a sync flush per packet gives.
        let block = RamBlock::anonymous("m0", 40 * PAGE_SIZE as u64).unwrap();
        for p in 0..40u64 {
            let mut page = [0u8; PAGE_SIZE];
            for (i, b) in page.iter_mut().enumerate() {
                *b = ((i as u64 * 2_654_435_761 + p * 97) >> (7 + p % 3)) as u8;
            }
            block.write_page(p * PAGE_SIZE as u64, &page).unwrap();
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut tx = Connection::from_unix_for_tests(a);
        let mut send = ZlibSend::new(1);
        let mut zlib = Compress::new(Level::new(1), true);
        let long: Vec<u64> = (3..40).collect();
        for packet in [&[0u64, 1, 2][..], &long, &[7, 5, 6]] {
            let offsets: Vec<u64> = packet.iter().map(|p| p * PAGE_SIZE as u64).collect();
            let pages = block.page_list(&offsets).unwrap();
            let mut iovs = Vec::new();
            let n = send.prepare(DataPages::Guest(pages), &mut iovs).unwrap() as usize;
            tx.writev_all(&mut iovs).unwrap();
            let mut got = vec![0u8; n];
            b.read_exact(&mut got).unwrap();

            let mut want = Vec::with_capacity(1 << 20);
            for &off in &offsets {
                let mut page = [0u8; PAGE_SIZE];
                block.read_page(off, &mut page).unwrap();
                assert!(!looks_incompressible(&page));
                zlib.compress_vec(&page, &mut want, FlushCompress::None)
                    .unwrap();
            }
            zlib.compress_vec(&[], &mut want, FlushCompress::Sync)
                .unwrap();
            assert_eq!(got, want, "packet {packet:?}");
        }
    }

    #[test]
    fn incompressible_pages_are_stored_and_any_inflate_decodes_them() {
        // Random pages among compressible ones, in packets that start and
        // end with either kind, so the compressor restarts after stored
        // pages within a packet and across packets.
        let random = [0u64, 2, 3, 5, 8, 9];
        let block = RamBlock::anonymous("m0", 12 * PAGE_SIZE as u64).unwrap();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for p in 0..12u64 {
            let mut page = [0u8; PAGE_SIZE];
            for (i, b) in page.iter_mut().enumerate() {
                *b = if random.contains(&p) {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 32) as u8
                } else {
                    b"pages of text, page "[i % 20]
                };
            }
            assert_eq!(looks_incompressible(&page), random.contains(&p));
            block.write_page(p * PAGE_SIZE as u64, &page).unwrap();
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut tx = Connection::from_unix_for_tests(a);
        let mut send = ZlibSend::new(1);
        let mut recv = ZlibRecv::new(1);
        let mut inflate = Decompress::new(true);
        let dst = RamBlock::anonymous("m0", 12 * PAGE_SIZE as u64).unwrap();
        let packets: [&[u64]; 6] = [&[0, 1, 2], &[4, 3], &[5], &[6, 7], &[8, 9], &[10, 11]];
        for (k, packet) in packets.into_iter().enumerate() {
            let offsets: Vec<u64> = packet.iter().map(|p| p * PAGE_SIZE as u64).collect();
            let mut iovs = Vec::new();
            let pages = DataPages::Guest(block.page_list(&offsets).unwrap());
            let n = send.prepare(pages, &mut iovs).unwrap() as usize;
            tx.writev_all(&mut iovs).unwrap();
            let mut payload = vec![0u8; n];
            b.read_exact(&mut payload).unwrap();
            assert!(payload.ends_with(&[0, 0, 0xff, 0xff]), "packet {k}");

            let mut want = vec![0u8; offsets.len() * PAGE_SIZE];
            for (page, &off) in want.chunks_exact_mut(PAGE_SIZE).zip(&offsets) {
                block.read_page(off, page.try_into().unwrap()).unwrap();
                if random.contains(&(off / PAGE_SIZE as u64)) {
                    let stored = [&stored_block_header(PAGE_SIZE as u16)[..], page].concat();
                    assert!(payload.windows(stored.len()).any(|w| w == stored));
                }
            }
            if packet == [5] {
                assert_eq!(n, 5 + PAGE_SIZE + 5, "a stored page costs 5 bytes");
            }
            // A zlib decoder (header included) fed the stream as it comes.
            let mut got = vec![0u8; want.len() + 64];
            let in0 = inflate.total_in();
            let out0 = inflate.total_out();
            inflate
                .decompress(&payload, &mut got, FlushDecompress::Sync)
                .unwrap();
            assert_eq!(inflate.total_in() - in0, n as u64, "packet {k}");
            assert_eq!(&got[..(inflate.total_out() - out0) as usize], &want[..]);
            // And the receiving method.
            super::super::tests::load_with(&mut recv, Compression::Zlib, &dst, packet, &payload)
                .unwrap();
            for &off in &offsets {
                let (mut x, mut y) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
                block.read_page(off, &mut x).unwrap();
                dst.read_page(off, &mut y).unwrap();
                assert!(x == y, "page {} of packet {k}", off / PAGE_SIZE as u64);
            }
        }
    }

    #[test]
    fn a_bad_zlib_header_is_corrupt() {
        let mut recv = ZlibRecv::new(1);
        for bad in [&[0x78u8][..], &[0x78, 0x02], &[0x79, 0x01], &[0x78, 0x20]] {
            recv.payload = bad.to_vec();
            let err = recv.read_header().unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { method: "zlib", .. }),
                "{bad:02x?}: {err}"
            );
        }
        recv.payload = vec![0x78, 0x01];
        assert_eq!(recv.read_header().unwrap(), 2);
    }
}
