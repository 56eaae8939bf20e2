//! zlib, framed as QEMU's multifd-zlib: one zlib stream (with its 2-byte
//! header, never finished) per channel for the whole migration; pages are fed
//! without flushing and each packet ends with a sync flush, so its payload
//! ends in `00 00 ff ff` and decodes given the packets before it.

use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress, Status};
use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{Compression, MAX_COMPRESSED_PAYLOAD, RamPacketHeader};

use super::{RecvMethod, SendMethod, corrupt, read_payload};
use crate::error::{Endpoint, Error, Result};
use crate::ram::{IoVec, RamBlock};
use crate::transport::Connection;

pub(super) struct ZlibSend {
    z: Compress,
    page: Box<[u8; PAGE_SIZE]>,
    out: Vec<u8>,
}

impl ZlibSend {
    pub(super) fn new(level: u32) -> Self {
        Self {
            z: Compress::new(Level::new(level), true),
            page: Box::new([0; PAGE_SIZE]),
            out: Vec::with_capacity(MAX_COMPRESSED_PAYLOAD as usize),
        }
    }
}

fn zerr(e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        endpoint: Endpoint::Unclassified,
        method: "zlib",
        reason: e.to_string(),
    }
}

impl SendMethod for ZlibSend {
    fn compression(&self) -> Compression {
        Compression::Zlib
    }

    fn prepare<'a>(
        &'a mut self,
        block: &'a RamBlock,
        normal: &[u64],
        iovs: &mut Vec<IoVec<'a>>,
    ) -> Result<u32> {
        self.out.clear();
        for (i, &off) in normal.iter().enumerate() {
            block.read_page(off, &mut self.page)?;
            let flush = if i + 1 == normal.len() {
                FlushCompress::Sync
            } else {
                FlushCompress::None
            };
            let start_in = self.z.total_in();
            loop {
                if self.out.capacity() - self.out.len() < 64 {
                    self.out.reserve(64 * 1024);
                }
                let consumed = (self.z.total_in() - start_in) as usize;
                self.z
                    .compress_vec(&self.page[consumed..], &mut self.out, flush)
                    .map_err(zerr)?;
                let done_in = (self.z.total_in() - start_in) as usize == PAGE_SIZE;
                // With a sync flush, the flush is complete once the output
                // buffer was not filled up.
                if done_in && (flush == FlushCompress::None || self.out.len() < self.out.capacity())
                {
                    break;
                }
            }
        }
        if self.out.len() > MAX_COMPRESSED_PAYLOAD as usize {
            return Err(Error::Unsupported(
                "zlib payload over 1 MiB (QEMU's receive buffer)".into(),
            ));
        }
        iovs.push(IoVec::from_slice(&self.out));
        Ok(self.out.len() as u32)
    }
}

pub(super) struct ZlibRecv {
    channel: u8,
    z: Decompress,
    buf: Vec<u8>,
    page: Box<[u8; PAGE_SIZE]>,
}

impl ZlibRecv {
    pub(super) fn new(channel: u8) -> Self {
        Self {
            channel,
            z: Decompress::new(true),
            buf: Vec::new(),
            page: Box::new([0; PAGE_SIZE]),
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        corrupt(self.channel, "zlib", reason)
    }
}

impl RecvMethod for ZlibRecv {
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        block: &RamBlock,
        conn: &mut Connection,
    ) -> Result<()> {
        read_payload(conn, self.channel, hdr.next_packet_size, &mut self.buf)?;
        let mut pos = 0usize;
        for &off in hdr.normal() {
            let mut filled = 0usize;
            while filled < PAGE_SIZE {
                let (in0, out0) = (self.z.total_in(), self.z.total_out());
                let status = self
                    .z
                    .decompress(
                        &self.buf[pos..],
                        &mut self.page[filled..],
                        FlushDecompress::Sync,
                    )
                    .map_err(|e| self.corrupt(e.to_string()))?;
                let used = (self.z.total_in() - in0) as usize;
                let made = (self.z.total_out() - out0) as usize;
                pos += used;
                filled += made;
                if status == Status::StreamEnd {
                    return Err(self.corrupt("stream ended inside a migration"));
                }
                if used == 0 && made == 0 {
                    return Err(self.corrupt(format!(
                        "payload of {} bytes ends inside page {:#x}",
                        hdr.next_packet_size, off
                    )));
                }
            }
            block.write_page(off, &self.page[..])?;
        }
        // The sync flush's empty stored block may still be unread: drain it.
        let mut scratch = [0u8; 64];
        while pos < self.buf.len() {
            let (in0, out0) = (self.z.total_in(), self.z.total_out());
            self.z
                .decompress(&self.buf[pos..], &mut scratch, FlushDecompress::Sync)
                .map_err(|e| self.corrupt(e.to_string()))?;
            let used = (self.z.total_in() - in0) as usize;
            if self.z.total_out() != out0 {
                return Err(self.corrupt("more data than the packet's pages"));
            }
            if used == 0 {
                break;
            }
            pos += used;
        }
        if pos != self.buf.len() {
            return Err(self.corrupt(format!(
                "{} bytes left over after {} pages",
                self.buf.len() - pos,
                hdr.normal().len()
            )));
        }
        Ok(())
    }
}
