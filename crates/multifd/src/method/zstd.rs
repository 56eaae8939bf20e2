//! zstd, framed as QEMU's multifd-zstd: one zstd frame per channel that is
//! never ended; the pages of a packet are fed with "continue" and the packet
//! ends with a flush, so a packet decodes given the packets before it.

use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{Compression, MAX_COMPRESSED_PAYLOAD, RamPacketHeader};

use super::{DataPages, RecvMethod, SendMethod, compression_failed, corrupt, read_payload};
use crate::error::{Error, Result};
use crate::ram::{PageCompressor, PageDecompressor, PageList};
use crate::transport::{Connection, IoSlice};

/// The sending half: pages are compressed straight from guest RAM, one
/// run of consecutive pages per call, as QEMU feeds its pages, or, when
/// they were read through the RAM file, from the channel's buffer.
pub(super) struct ZstdSend {
    z: PageCompressor,
    out: Vec<u8>,
}

fn too_big() -> Error {
    compression_failed("zstd", "payload over 1 MiB (QEMU's receive buffer)")
}

impl ZstdSend {
    pub(super) fn new(level: i32) -> Result<Self> {
        Ok(Self {
            z: PageCompressor::new(level)
                .map_err(|e| Error::Config(format!("zstd level {level}: {e}")))?,
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
        pages: DataPages<'a, '_>,
        iovs: &mut Vec<IoSlice<'a>>,
    ) -> Result<u32> {
        let fail = |e: &str| compression_failed("zstd", e);
        let mut len = 0;
        let fits = |fed: std::result::Result<bool, &str>| -> Result<()> {
            if fed.map_err(fail)? {
                Ok(())
            } else {
                Err(too_big())
            }
        };
        match pages {
            DataPages::Guest(list) => {
                for run in list.runs() {
                    fits(self.z.compress_run(run, &mut self.out, &mut len))?;
                }
            }
            DataPages::Own(staging) => {
                for page in staging.data_pages() {
                    fits(self.z.compress_bytes(page, &mut self.out, &mut len))?;
                }
            }
        }
        if !self.z.flush(&mut self.out, &mut len).map_err(fail)? {
            return Err(too_big());
        }
        iovs.push(IoSlice::new(&self.out[..len]));
        Ok(len as u32)
    }
}

/// Largest window a frame from the peer may ask for: 2^25 = 32 MiB, what
/// QEMU's highest `multifd-zstd-level` (20) uses; zstd's own default limit
/// (2^27) would let a frame header make a channel allocate 128 MiB.
pub(super) const WINDOW_LOG_MAX: u32 = 25;

/// The receiving half: a packet's payload is decompressed straight into
/// its pages, one run of consecutive pages at a time.
pub(super) struct ZstdRecv {
    channel: u8,
    z: PageDecompressor,
    payload: Vec<u8>,
}

impl ZstdRecv {
    pub(super) fn new(channel: u8) -> Result<Self> {
        let z = PageDecompressor::new(WINDOW_LOG_MAX)
            .map_err(|e| compression_failed("zstd", format!("decoder: {e}")))?;
        Ok(Self {
            channel,
            z,
            payload: Vec::new(),
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
        let payload = &self.payload[..];
        let total = pages.len() * PAGE_SIZE;
        let (mut pos, mut done) = (0, 0);
        for run in pages.runs() {
            let (len, mut filled) = (run.len() as usize, 0);
            while filled < len {
                let before = (pos, filled);
                self.z
                    .decompress_into_run(payload, &mut pos, run, &mut filled)?
                    .map_err(|e| bad(e.to_owned()))?;
                if (pos, filled) == before {
                    return Err(bad(format!(
                        "payload of {} bytes holds only {} of {total} bytes of pages",
                        hdr.next_packet_size,
                        done + filled,
                    )));
                }
            }
            done += len;
        }
        // A flush may leave block framing after the last page's bytes, and
        // the decoder may hold decoded bytes beyond the pages even with all
        // input read: one more call, with room to spare, finds either. An
        // empty payload (a packet of zero pages only) has nothing to check,
        // and calling would count towards libzstd's limit on calls without
        // progress.
        let mut spare = [0u8; 64];
        while !payload.is_empty() {
            let (before, mut made) = (pos, 0);
            self.z
                .decompress(payload, &mut pos, &mut spare, &mut made)
                .map_err(|e| bad(e.to_owned()))?;
            if made != 0 {
                return Err(bad("more data than the packet's pages".into()));
            }
            if pos == payload.len() {
                break;
            }
            if pos == before {
                return Err(bad(format!(
                    "{} bytes left over after {} pages",
                    payload.len() - before,
                    pages.len()
                )));
            }
        }
        for page in pages.iter() {
            page.mark_received();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use multifd_wire::PAGE_SIZE;
    use multifd_wire::packet::{RAM_PACKET_HEADER_SIZE, RamPacketEncoder};
    use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};

    use super::*;
    use crate::ram::RamBlock;

    /// One packet's payload as a peer would frame it: `pages` pages of
    /// pattern compressed at `level` with the window `window_log` (zstd's
    /// choice for the level when `None`), then flushed.
    fn payload(level: i32, window_log: Option<u32>, pages: usize) -> Vec<u8> {
        let mut z = Encoder::new(level).unwrap();
        if let Some(w) = window_log {
            z.set_parameter(CParameter::WindowLog(w)).unwrap();
        }
        let input: Vec<u8> = (0..pages * PAGE_SIZE)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 & 0x0f)
            .collect();
        let mut out = vec![0u8; MAX_COMPRESSED_PAYLOAD as usize];
        let mut ob = OutBuffer::around(&mut out[..]);
        let mut ib = InBuffer::around(&input[..]);
        while ib.pos() < input.len() {
            z.run(&mut ib, &mut ob).unwrap();
        }
        while z.flush(&mut ob).unwrap() != 0 {}
        let n = ob.pos();
        out.truncate(n);
        out
    }

    fn load(payload: &[u8], pages: usize) -> Result<()> {
        let dst = RamBlock::anonymous("m0", (pages * PAGE_SIZE) as u64).unwrap();
        let offsets: Vec<u64> = (0..pages as u64).map(|p| p * 4096).collect();
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Connection::from_unix_for_tests(a);
        let mut rx = Connection::from_unix_for_tests(b);
        std::io::Write::write_all(&mut tx, payload).unwrap();
        let mut hdr = [0u8; RAM_PACKET_HEADER_SIZE];
        RamPacketEncoder {
            compression: Compression::Zstd,
            sync: false,
            packet_num: 0,
            ramblock: "m0",
            offsets: &offsets,
            normal_pages: pages,
            next_packet_size: payload.len() as u32,
        }
        .encode(&mut hdr)
        .unwrap();
        let h = RamPacketHeader::decode(&hdr).unwrap();
        let mut recv = ZstdRecv::new(2)?;
        recv.load(&h, dst.page_list(h.normal())?, &mut rx)
    }

    #[test]
    fn every_level_qemu_uses_fits_the_window_limit() {
        // Level 20 (QEMU's highest) asks for exactly 2^25 when the size is
        // not known in advance, as in a channel's endless frame.
        for level in [1, 3, 9, 19, 20] {
            load(&payload(level, None, 4), 4).unwrap_or_else(|e| panic!("level {level}: {e}"));
        }
        load(&payload(1, Some(WINDOW_LOG_MAX), 4), 4).unwrap();
    }

    #[test]
    fn a_frame_asking_for_a_larger_window_is_corrupt() {
        for log in [WINDOW_LOG_MAX + 1, 27, 30] {
            let err = load(&payload(1, Some(log), 4), 4).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { method: "zstd", reason, .. }
                    if reason.contains("memory")),
                "window 2^{log}: {err:?}"
            );
        }
    }
}
