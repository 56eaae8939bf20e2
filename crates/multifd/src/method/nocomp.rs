//! No compression: pages go from guest RAM to the socket and from the
//! socket to guest RAM with vectored I/O, no copy (QEMU's multifd-nocomp).

use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{Compression, RamPacketHeader};

use super::{DataPages, RecvMethod, SendMethod};
use crate::error::Result;
use crate::ram::PageList;
use crate::transport::{Connection, IoSlice};

pub(super) struct NoCompSend;

impl SendMethod for NoCompSend {
    fn compression(&self) -> Compression {
        Compression::None
    }

    fn prepare<'a>(
        &'a mut self,
        pages: DataPages<'a, '_>,
        iovs: &mut Vec<IoSlice<'a>>,
    ) -> Result<u32> {
        match pages {
            DataPages::Guest(list) => iovs.extend(list.iter().map(|page| page.io_slice())),
            DataPages::Own(staging) => iovs.extend(staging.data_slices()),
        }
        Ok((pages.len() * PAGE_SIZE) as u32)
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
        _hdr: &RamPacketHeader,
        pages: PageList<'_, '_>,
        conn: &mut Connection,
    ) -> Result<()> {
        let mut iovs = pages
            .iter()
            .map(|page| page.io_slice_mut())
            .collect::<Result<Vec<_>>>()?;
        super::payload_read(conn.readv_exact(&mut iovs), self.channel)?;
        for page in pages.iter() {
            page.mark_received();
        }
        Ok(())
    }
}
