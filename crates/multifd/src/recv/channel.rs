//! One receiving channel thread (QEMU's `multifd_recv_thread()`).

use multifd_wire::packet::{
    COMMON_HEADER_SIZE, CommonHeader, DEVICE_STATE_HEADER_SIZE, DeviceStateHeader, PacketKind,
    RAM_PACKET_HEADER_SIZE, RamPacketHeader,
};

use crate::barrier::SyncBarrier;
use crate::config::MethodConfig;
use crate::error::{Endpoint, Error, Result};
use crate::method::RecvMethod;
use crate::ram::GuestRam;
use crate::stats::Progress;
use crate::transport::Connection;

pub(crate) struct RecvChannel<'a> {
    pub(crate) id: u8,
    pub(crate) conn: Connection,
    pub(crate) method: Box<dyn RecvMethod>,
    pub(crate) method_cfg: MethodConfig,
    pub(crate) ram: &'a GuestRam,
    pub(crate) barrier: &'a SyncBarrier,
    pub(crate) progress: &'a Progress,
}

impl RecvChannel<'_> {
    fn endpoint(&self) -> Endpoint {
        Endpoint::Channel(self.id)
    }

    fn read(&mut self, buf: &mut [u8], when: &'static str) -> Result<bool> {
        let r = self.conn.read_exact_or_eof(buf);
        self.read_result(r, when)
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
        let ep = self.endpoint();
        match r {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::PeerClosed { endpoint: ep, when })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(Error::PeerClosed {
                    endpoint: ep,
                    when: "(stopped sending and did not close after the main stream ended)",
                })
            }
            Err(e) => Err(Error::io(format!("{ep}: reading"), e)),
        }
    }

    /// Reads packets until a clean EOF at a packet boundary.
    pub(crate) fn run(mut self) -> Result<()> {
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
                    if have < DEVICE_STATE_HEADER_SIZE
                        && !self.read(&mut rest[have..], "inside a device-state header")?
                    {
                        return Err(Error::PeerClosed {
                            endpoint: ep,
                            when: "inside a device-state header",
                        });
                    }
                    let ds = DeviceStateHeader::decode(&rest).map_err(|e| Error::wire(ep, e))?;
                    return Err(Error::Unsupported(format!(
                        "{ep}: device state packet for {:?} (multifd device state transfer, used by VFIO, is not supported)",
                        ds.idstr
                    )));
                }
                PacketKind::Ram => {}
            }
            if got < RAM_PACKET_HEADER_SIZE
                && !self.read(&mut header[got..], "inside a packet header")?
            {
                return Err(Error::PeerClosed {
                    endpoint: ep,
                    when: "inside a packet header",
                });
            }
            let hdr = RamPacketHeader::decode(&header).map_err(|e| Error::wire(ep, e))?;
            self.progress.add(
                &self.progress.bytes,
                (RAM_PACKET_HEADER_SIZE as u64) + u64::from(hdr.next_packet_size),
            );
            if hdr.page_count() > 0 {
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
                hdr.check_offsets(block.len())
                    .map_err(|e| Error::wire(ep, e))?;
                for &off in hdr.zero() {
                    block.apply_zero_page(off)?;
                }
                self.method.load(&hdr, block, &mut self.conn)?;
                self.progress
                    .add(&self.progress.normal_pages, u64::from(hdr.normal_pages));
                self.progress
                    .add(&self.progress.zero_pages, u64::from(hdr.zero_pages));
            }
            if hdr.is_sync() {
                self.barrier.arrive_and_wait()?;
            }
        }
    }
}
