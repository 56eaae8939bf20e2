//! zlib, framed as QEMU's multifd-zlib: one zlib stream (with its 2-byte
//! header, never finished) per channel for the whole migration; the pages of
//! a packet are fed without flushing and the packet ends with a sync flush,
//! so its payload ends in `00 00 ff ff` and decodes given the packets
//! before it. Feeding the packet's pages in one call or page by page gives
//! the same stream.

use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress, Status};
use multifd_wire::packet::{Compression, MAX_COMPRESSED_PAYLOAD, RamPacketHeader};

use super::{RecvMethod, SendMethod, compression_failed, corrupt, gather, read_payload, scatter};
use crate::error::{Error, Result};
use crate::ram::PageList;
use crate::transport::{Connection, IoSlice};

pub(super) struct ZlibSend {
    z: Compress,
    input: Vec<u8>,
    out: Vec<u8>,
}

impl ZlibSend {
    pub(super) fn new(level: u32) -> Self {
        Self {
            z: Compress::new(Level::new(level), true),
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
        pages: PageList<'a, '_>,
        iovs: &mut Vec<IoSlice<'a>>,
    ) -> Result<u32> {
        gather(pages, &mut self.input);
        self.out.clear();
        let start = self.z.total_in();
        loop {
            if self.out.capacity() - self.out.len() < 64 * 1024 {
                self.out.reserve(64 * 1024);
            }
            let consumed = (self.z.total_in() - start) as usize;
            self.z
                .compress_vec(&self.input[consumed..], &mut self.out, FlushCompress::Sync)
                .map_err(|e| compression_failed("zlib", e))?;
            let all_in = (self.z.total_in() - start) as usize == self.input.len();
            // The sync flush is complete once it did not fill the output.
            if all_in && self.out.len() < self.out.capacity() {
                break;
            }
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
    z: Decompress,
    payload: Vec<u8>,
    pages: Vec<u8>,
}

impl ZlibRecv {
    pub(super) fn new(channel: u8) -> Self {
        Self {
            channel,
            z: Decompress::new(true),
            payload: Vec::new(),
            pages: Vec::new(),
        }
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
        self.pages.resize(pages.len() * multifd_wire::PAGE_SIZE, 0);
        let (mut pos, mut filled) = (0, 0);
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
