//! No compression: pages go from guest RAM to the socket and from the
//! socket to guest RAM with vectored I/O, no copy (QEMU's multifd-nocomp).

use multifd_wire::packet::{Compression, RamPacketHeader};
use multifd_wire::{PAGE_SIZE, PAGE_SIZE_U64};

use super::{RecvMethod, SendMethod};
use crate::error::Result;
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
        super::payload_read(conn.readv_exact(&mut iovs), self.channel)?;
        for &off in hdr.normal() {
            block.received().set(off / PAGE_SIZE_U64);
        }
        Ok(())
    }
}
