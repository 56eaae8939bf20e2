//! zstd, framed as QEMU's multifd-zstd: one zstd frame per channel that is
//! never ended; pages are fed with "continue" and each packet ends with a
//! flush, so a packet decodes given the packets before it.

use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{Compression, MAX_COMPRESSED_PAYLOAD, RamPacketHeader};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::{RecvMethod, SendMethod, corrupt, read_payload};
use crate::error::{Endpoint, Error, Result};
use crate::ram::{IoVec, RamBlock};
use crate::transport::Connection;

pub(super) struct ZstdSend {
    z: Encoder<'static>,
    page: Box<[u8; PAGE_SIZE]>,
    out: Vec<u8>,
}

fn zerr(e: std::io::Error) -> Error {
    Error::Corrupt {
        endpoint: Endpoint::Unclassified,
        method: "zstd",
        reason: e.to_string(),
    }
}

impl ZstdSend {
    pub(super) fn new(level: i32) -> Result<Self> {
        Ok(Self {
            z: Encoder::new(level).map_err(zerr)?,
            page: Box::new([0; PAGE_SIZE]),
            // Worst case for 512 KiB of input plus block headers.
            out: vec![0; MAX_COMPRESSED_PAYLOAD as usize],
        })
    }
}

impl SendMethod for ZstdSend {
    fn compression(&self) -> Compression {
        Compression::Zstd
    }

    fn prepare<'a>(
        &'a mut self,
        block: &'a RamBlock,
        normal: &[u64],
        iovs: &mut Vec<IoVec<'a>>,
    ) -> Result<u32> {
        let mut out = OutBuffer::around(&mut self.out[..]);
        for &off in normal {
            block.read_page(off, &mut self.page)?;
            let mut input = InBuffer::around(&self.page[..]);
            while input.pos() < PAGE_SIZE {
                self.z.run(&mut input, &mut out).map_err(zerr)?;
                if out.pos() == out.capacity() {
                    return Err(Error::Unsupported("zstd payload over 1 MiB".into()));
                }
            }
        }
        loop {
            let remaining = self.z.flush(&mut out).map_err(zerr)?;
            if remaining == 0 {
                break;
            }
            if out.pos() == out.capacity() {
                return Err(Error::Unsupported("zstd payload over 1 MiB".into()));
            }
        }
        let len = out.pos();
        iovs.push(IoVec::from_slice(&self.out[..len]));
        Ok(len as u32)
    }
}

pub(super) struct ZstdRecv {
    channel: u8,
    z: Decoder<'static>,
    buf: Vec<u8>,
    page: Box<[u8; PAGE_SIZE]>,
}

impl ZstdRecv {
    pub(super) fn new(channel: u8) -> Result<Self> {
        Ok(Self {
            channel,
            z: Decoder::new().map_err(zerr)?,
            buf: Vec::new(),
            page: Box::new([0; PAGE_SIZE]),
        })
    }

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        corrupt(self.channel, "zstd", reason)
    }
}

impl RecvMethod for ZstdRecv {
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        block: &RamBlock,
        conn: &mut Connection,
    ) -> Result<()> {
        read_payload(conn, self.channel, hdr.next_packet_size, &mut self.buf)?;
        let mut input = InBuffer::around(&self.buf[..]);
        for &off in hdr.normal() {
            let mut out = OutBuffer::around(&mut self.page[..]);
            while out.pos() < PAGE_SIZE {
                let before = (input.pos(), out.pos());
                let channel = self.channel;
                self.z
                    .run(&mut input, &mut out)
                    .map_err(|e| corrupt(channel, "zstd", e.to_string()))?;
                if (input.pos(), out.pos()) == before {
                    return Err(corrupt(
                        channel,
                        "zstd",
                        format!(
                            "payload of {} bytes ends inside page {off:#x}",
                            hdr.next_packet_size
                        ),
                    ));
                }
            }
            block.write_page(off, &self.page[..])?;
        }
        // A flush may leave block framing after the last page's bytes.
        let mut scratch = [0u8; 64];
        while input.pos() < self.buf.len() {
            let before = input.pos();
            let mut out = OutBuffer::around(&mut scratch[..]);
            self.z
                .run(&mut input, &mut out)
                .map_err(|e| self.corrupt(e.to_string()))?;
            if out.pos() != 0 {
                return Err(self.corrupt("more data than the packet's pages"));
            }
            if input.pos() == before {
                break;
            }
        }
        if input.pos() != self.buf.len() {
            return Err(self.corrupt(format!(
                "{} bytes left over after {} pages",
                self.buf.len() - input.pos(),
                hdr.normal().len()
            )));
        }
        Ok(())
    }
}
