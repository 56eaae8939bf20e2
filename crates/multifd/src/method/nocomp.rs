//! No compression: pages go from guest RAM to the socket and from the
//! socket to guest RAM with vectored I/O, no copy (QEMU's multifd-nocomp).

use multifd_wire::packet::{Compression, RamPacketHeader};
use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

use super::{RecvMethod, SendMethod};
use crate::error::{Endpoint, Error, Result};
use crate::ram::{IoVec, RamBlock};
use crate::transport::Connection;

pub(super) struct NoCompSend;

impl SendMethod for NoCompSend {
    fn compression(&self) -> Compression {
        Compression::None
    }

    fn prepare<'a>(
        &'a mut self,
        block: &'a RamBlock,
        normal: &[u64],
        iovs: &mut Vec<IoVec<'a>>,
    ) -> Result<u32> {
        for &off in normal {
            iovs.push(block.page_iov(off)?);
        }
        Ok((normal.len() * PAGE_SIZE) as u32)
    }
}

pub(super) struct NoCompRecv {
    channel: u8,
}

impl NoCompRecv {
    pub(super) fn new(channel: u8) -> Self {
        Self { channel }
    }
}

impl RecvMethod for NoCompRecv {
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        block: &RamBlock,
        conn: &mut Connection,
    ) -> Result<()> {
        let mut iovs = Vec::with_capacity(hdr.normal().len());
        for &off in hdr.normal() {
            iovs.push(block.page_iov_mut(off)?);
        }
        match conn.readv_exact(&mut iovs) {
            Ok(true) => {}
            Ok(false) if iovs.is_empty() => {}
            Ok(false) => {
                return Err(Error::PeerClosed {
                    endpoint: Endpoint::Channel(self.channel),
                    when: "after a packet header",
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::PeerClosed {
                    endpoint: Endpoint::Channel(self.channel),
                    when: "inside a packet payload",
                });
            }
            Err(e) => {
                return Err(Error::io(
                    format!("multifd channel {}: reading pages", self.channel),
                    e,
                ));
            }
        }
        for &off in hdr.normal() {
            block.received().set(off / PAGE_SIZE_U64);
        }
        Ok(())
    }
}
