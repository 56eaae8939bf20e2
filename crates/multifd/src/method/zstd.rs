//! zstd, framed as QEMU's multifd-zstd: one zstd frame per channel that is
//! never ended; the pages of a packet are fed with "continue" and the packet
//! ends with a flush, so a packet decodes given the packets before it.

use multifd_wire::packet::{Compression, MAX_COMPRESSED_PAYLOAD, RamPacketHeader};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::{RecvMethod, SendMethod, compression_failed, corrupt, gather, read_payload, scatter};
use crate::error::{Error, Result};
use crate::ram::PageList;
use crate::transport::{Connection, IoSlice};

pub(super) struct ZstdSend {
    z: Encoder<'static>,
    input: Vec<u8>,
    out: Vec<u8>,
}

fn too_big() -> Error {
    compression_failed("zstd", "payload over 1 MiB (QEMU's receive buffer)")
}

impl ZstdSend {
    pub(super) fn new(level: i32) -> Result<Self> {
        Ok(Self {
            z: Encoder::new(level)
                .map_err(|e| Error::Config(format!("zstd level {level}: {e}")))?,
            input: Vec::new(),
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
        pages: PageList<'a, '_>,
        iovs: &mut Vec<IoSlice<'a>>,
    ) -> Result<u32> {
        gather(pages, &mut self.input);
        let fail = |e: std::io::Error| compression_failed("zstd", e);
        let mut out = OutBuffer::around(&mut self.out[..]);
        let mut input = InBuffer::around(&self.input[..]);
        while input.pos() < self.input.len() {
            self.z.run(&mut input, &mut out).map_err(fail)?;
            if out.pos() == out.capacity() {
                return Err(too_big());
            }
        }
        while self.z.flush(&mut out).map_err(fail)? != 0 {
            if out.pos() == out.capacity() {
                return Err(too_big());
            }
        }
        let len = out.pos();
        iovs.push(IoSlice::new(&self.out[..len]));
        Ok(len as u32)
    }
}

pub(super) struct ZstdRecv {
    channel: u8,
    z: Decoder<'static>,
    payload: Vec<u8>,
    pages: Vec<u8>,
}

impl ZstdRecv {
    pub(super) fn new(channel: u8) -> Result<Self> {
        Ok(Self {
            channel,
            z: Decoder::new().map_err(|e| compression_failed("zstd", format!("decoder: {e}")))?,
            payload: Vec::new(),
            pages: Vec::new(),
        })
    }
}

impl RecvMethod for ZstdRecv {
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        pages: PageList<'_, '_>,
        conn: &mut Connection,
    ) -> Result<()> {
        let channel = self.channel;
        let bad = |reason: String| corrupt(channel, "zstd", reason);
        read_payload(conn, channel, hdr.next_packet_size, &mut self.payload)?;
        self.pages.resize(pages.len() * multifd_wire::PAGE_SIZE, 0);
        let mut input = InBuffer::around(&self.payload[..]);
        let mut out = OutBuffer::around(&mut self.pages[..]);
        while out.pos() < out.capacity() {
            let before = (input.pos(), out.pos());
            self.z
                .run(&mut input, &mut out)
                .map_err(|e| bad(e.to_string()))?;
            if (input.pos(), out.pos()) == before {
                return Err(bad(format!(
                    "payload of {} bytes holds only {} of {} bytes of pages",
                    hdr.next_packet_size,
                    out.pos(),
                    out.capacity()
                )));
            }
        }
        // A flush may leave block framing after the last page's bytes.
        let mut spare = [0u8; 64];
        while input.pos() < self.payload.len() {
            let before = input.pos();
            let mut extra = OutBuffer::around(&mut spare[..]);
            self.z
                .run(&mut input, &mut extra)
                .map_err(|e| bad(e.to_string()))?;
            if extra.pos() != 0 {
                return Err(bad("more data than the packet's pages".into()));
            }
            if input.pos() == before {
                return Err(bad(format!(
                    "{} bytes left over after {} pages",
                    self.payload.len() - before,
                    pages.len()
                )));
            }
        }
        scatter(pages, &self.pages)
    }
}
