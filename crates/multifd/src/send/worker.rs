//! One sending channel thread (QEMU's `multifd_send_thread()`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use multifd_wire::packet::{PAGES_PER_PACKET, RAM_PACKET_HEADER_SIZE, RamPacketEncoder};

use crate::config::ZeroPageDetection;
use crate::error::{Error, Result};
use crate::method::SendMethod;
use crate::ram::{GuestRam, IoVec, RamBlock};
use crate::stats::Progress;
use crate::transport::Connection;
use multifd_wire::PAGE_SIZE_U64;

/// Maps each run of consecutive pages of `batch` with one system call
/// before they are read (see [`RamBlock::populate_read`]).
fn populate_runs(block: &RamBlock, batch: &[u64]) {
    let mut i = 0;
    while i < batch.len() {
        let start = batch[i];
        let mut j = i + 1;
        while j < batch.len() && batch[j] == batch[j - 1] + PAGE_SIZE_U64 {
            j += 1;
        }
        if j - i > 1 {
            block.populate_read(start, (j - i) as u64 * PAGE_SIZE_U64);
        }
        i = j;
    }
}

/// Work for a channel.
#[derive(Debug)]
pub(crate) enum Job {
    /// Up to 128 page offsets of block `block`.
    Pages {
        /// Index into [`GuestRam::blocks`].
        block: usize,
        /// Page offsets inside the block.
        offsets: Vec<u64>,
    },
    /// Send a SYNC packet after everything queued before.
    Sync,
}

/// Everything one channel thread needs.
pub(crate) struct ChannelWorker<'a> {
    pub(crate) id: u8,
    pub(crate) conn: Connection,
    pub(crate) method: Box<dyn SendMethod>,
    pub(crate) ram: &'a GuestRam,
    pub(crate) zero_pages: ZeroPageDetection,
    pub(crate) packet_num: &'a AtomicU64,
    pub(crate) progress: &'a Progress,
    /// Set once this channel wrote its last byte (a hang-up is then normal).
    pub(crate) done: &'a AtomicBool,
}

impl ChannelWorker<'_> {
    /// Runs until the queue closes (normal end) or an error.
    pub(crate) fn run(mut self, jobs: super::JobQueue) -> Result<()> {
        let mut header = Box::new([0u8; RAM_PACKET_HEADER_SIZE]);
        let mut offsets: Vec<u64> = Vec::with_capacity(PAGES_PER_PACKET);
        let compression = self.method.compression();
        while let Some(job) = jobs.next() {
            match job {
                Job::Pages {
                    block,
                    offsets: batch,
                } => {
                    let blk = self.ram.block(block);
                    populate_runs(blk, &batch);
                    // Zero-page detection on this thread: normal pages first,
                    // zero pages after them (QEMU's multifd_send_zero_page_detect()).
                    offsets.clear();
                    let mut zeros = Vec::new();
                    for &off in &batch {
                        if self.zero_pages == ZeroPageDetection::Multifd && blk.is_zero_page(off)? {
                            zeros.push(off);
                        } else {
                            offsets.push(off);
                        }
                    }
                    let normal = offsets.len();
                    offsets.extend_from_slice(&zeros);
                    let mut iovs: Vec<IoVec<'_>> = Vec::with_capacity(PAGES_PER_PACKET + 1);
                    // A packet of zero pages only has no payload (QEMU skips
                    // the method and asserts next_packet_size == 0); a
                    // compressor would still emit a sync flush.
                    let payload = if normal == 0 {
                        0
                    } else {
                        self.method.prepare(blk, &offsets[..normal], &mut iovs)?
                    };
                    RamPacketEncoder {
                        compression,
                        sync: false,
                        packet_num: self.packet_num.fetch_add(1, Ordering::Relaxed),
                        ramblock: blk.name(),
                        offsets: &offsets,
                        normal_pages: normal,
                        next_packet_size: payload,
                    }
                    .encode(&mut header)
                    .map_err(|e| Error::Config(format!("encoding a packet: {e}")))?;
                    iovs.insert(0, IoVec::from_slice(&header[..]));
                    self.conn.writev_all(&mut iovs).map_err(|e| {
                        Error::io(format!("multifd channel {}: writing a packet", self.id), e)
                    })?;
                    drop(iovs);
                    let p = self.progress;
                    p.add(&p.bytes, RAM_PACKET_HEADER_SIZE as u64 + u64::from(payload));
                    p.add(&p.normal_pages, normal as u64);
                    p.add(&p.zero_pages, zeros.len() as u64);
                }
                Job::Sync => {
                    RamPacketEncoder {
                        compression,
                        sync: true,
                        packet_num: self.packet_num.fetch_add(1, Ordering::Relaxed),
                        ramblock: "",
                        offsets: &[],
                        normal_pages: 0,
                        next_packet_size: 0,
                    }
                    .encode(&mut header)
                    .map_err(|e| Error::Config(format!("encoding a SYNC: {e}")))?;
                    let mut one = [IoVec::from_slice(&header[..])];
                    self.conn.writev_all(&mut one).map_err(|e| {
                        Error::io(format!("multifd channel {}: writing a SYNC", self.id), e)
                    })?;
                    self.progress
                        .add(&self.progress.bytes, RAM_PACKET_HEADER_SIZE as u64);
                }
            }
        }
        self.done.store(true, Ordering::Release);
        self.conn.shutdown_write();
        Ok(())
    }
}
