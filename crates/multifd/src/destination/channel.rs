//! One receiving channel thread (QEMU's `multifd_recv_thread()`): reads a
//! packet header, checks it, applies its zero pages, lets the payload
//! method load its data pages straight into guest RAM, and waits at the
//! barrier after a SYNC.

use multifd_wire::packet::{
    COMMON_HEADER_SIZE, CommonHeader, DEVICE_STATE_HEADER_SIZE, DeviceStateHeader, PacketKind,
    RAM_PACKET_HEADER_SIZE, RamPacketHeader,
};

use multifd_wire::WireError;

use super::barrier::SyncBarrier;
use crate::config::MethodConfig;
use crate::error::{Endpoint, Error, Result};
use crate::method::RecvMethod;
use crate::ram::GuestRam;
use crate::stats::Progress;
use crate::transport::Connection;

pub(super) struct RecvChannel<'a> {
    pub(super) id: u8,
    pub(super) conn: Connection,
    pub(super) method: Box<dyn RecvMethod>,
    pub(super) method_cfg: MethodConfig,
    pub(super) ram: &'a GuestRam,
    pub(super) barrier: &'a SyncBarrier,
    pub(super) progress: &'a Progress,
}

impl RecvChannel<'_> {
    fn endpoint(&self) -> Endpoint {
        Endpoint::Channel(self.id)
    }

    /// Reads the rest of a header that was cut `when`: a clean EOF here
    /// is still the peer closing in the middle.
    fn read_rest(&mut self, buf: &mut [u8], when: &'static str) -> Result<()> {
        let r = self.conn.read_exact_or_eof(buf);
        if self.read_result(r, when)? {
            Ok(())
        } else {
            Err(Error::PeerClosed {
                endpoint: self.endpoint(),
                when,
            })
        }
    }

    /// Reads the next packet's header: at least the common part, and as much
    /// of a RAM header as is already there (never waiting for more than the
    /// common part, since a device-state header is shorter). `Ok(0)`: clean
    /// EOF between packets.
    fn read_header_start(&mut self, header: &mut [u8]) -> Result<usize> {
        let r = self.conn.read_at_least(header, COMMON_HEADER_SIZE);
        self.read_result(r, "inside a packet header")
    }

    fn read_result<T>(&self, r: std::io::Result<T>, when: &'static str) -> Result<T> {
        let endpoint = self.endpoint();
        r.map_err(|e| {
            let context = format!("{endpoint}: read failed {when}");
            Error::from_read(e, endpoint, when, |e| Error::io(context, e))
        })
    }

    /// Reads packets until a clean EOF at a packet boundary.
    pub(super) fn run(mut self) -> Result<()> {
        let mut header = vec![0u8; RAM_PACKET_HEADER_SIZE];
        loop {
            let got = self.read_header_start(&mut header)?;
            if got == 0 {
                self.barrier.channel_ended();
                return Ok(());
            }
            let ep = self.endpoint();
            let common = CommonHeader::decode(&header).map_err(|e| Error::wire(ep, e))?;
            match common.kind() {
                PacketKind::DeviceState => {
                    // `header[DEVICE_STATE_HEADER_SIZE..got]`, if any, is the
                    // start of the payload: whoever adds device state must
                    // use it, not read past it.
                    let mut rest = [0u8; DEVICE_STATE_HEADER_SIZE];
                    let have = got.min(DEVICE_STATE_HEADER_SIZE);
                    rest[..have].copy_from_slice(&header[..have]);
                    if have < DEVICE_STATE_HEADER_SIZE {
                        self.read_rest(&mut rest[have..], "inside a device-state header")?;
                    }
                    let ds = DeviceStateHeader::decode(&rest).map_err(|e| Error::wire(ep, e))?;
                    return Err(Error::Unsupported(format!(
                        "{ep}: device state packet for {:?} (multifd device state transfer, used by VFIO, is not supported)",
                        ds.idstr
                    )));
                }
                PacketKind::Ram => {}
            }
            if got < RAM_PACKET_HEADER_SIZE {
                self.read_rest(&mut header[got..], "inside a packet header")?;
            }
            let hdr = RamPacketHeader::decode(&header).map_err(|e| Error::wire(ep, e))?;
            self.progress.add(
                &self.progress.bytes,
                (RAM_PACKET_HEADER_SIZE as u64) + u64::from(hdr.next_packet_size),
            );
            if hdr.page_count() > 0 {
                self.barrier.begin_pages(self.id)?;
                if hdr.compression != self.method_cfg.compression {
                    return Err(Error::Mismatch(format!(
                        "{ep}: packet compressed with {} but {} is configured",
                        hdr.compression, self.method_cfg.compression
                    )));
                }
                let block = self
                    .ram
                    .get(&hdr.ramblock)
                    .ok_or_else(|| Error::UnknownBlock {
                        endpoint: ep,
                        name: hdr.ramblock.clone(),
                    })?;
                // Every offset checked once, here; one outside the block is
                // invalid data from the peer.
                let pages = block.page_list(&hdr.offsets).map_err(|e| match e {
                    Error::OffsetOutOfRange { offset, .. } => Error::wire(
                        ep,
                        WireError::InvalidField {
                            field: "page offset",
                            value: offset,
                            reason: "past the end of its RAM block",
                        },
                    ),
                    e => e,
                })?;
                let (data, zeros) = pages.split_at(hdr.normal().len());
                for page in zeros.iter() {
                    page.apply_zero()?;
                }
                self.method.load(&hdr, data, &mut self.conn)?;
                self.progress
                    .add(&self.progress.normal_pages, u64::from(hdr.normal_pages));
                self.progress
                    .add(&self.progress.zero_pages, u64::from(hdr.zero_pages));
            }
            if hdr.is_sync() {
                self.barrier.arrive_and_wait(self.id)?;
            }
        }
    }
}
