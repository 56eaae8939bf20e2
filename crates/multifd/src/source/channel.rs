//! One sending channel thread (QEMU's `multifd_send_thread()`): takes jobs
//! from its queue, turns a batch of pages into a packet (zero-page
//! detection, then the payload method's I/O vectors) and writes header and
//! payload with one vectored write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use multifd_wire::packet::{PAGES_PER_PACKET, RAM_PACKET_HEADER_SIZE, RamPacketEncoder};

use super::dispatch::{Job, JobQueue, SyncsWritten};
use super::rate_limit::RateLimiter;
use crate::config::ZeroPageDetection;
use crate::error::{Endpoint, Error, Result};
use crate::lifecycle::Abort;
use crate::method::{DataPages, SendMethod};
use crate::ram::{PageBatch, Staging};
use crate::stats::Progress;
use crate::transport::{Connection, IoSlice};

/// Everything one channel thread needs.
pub(super) struct ChannelWorker<'a, 'w> {
    pub(super) id: u8,
    pub(super) conn: Connection,
    pub(super) method: Box<dyn SendMethod>,
    pub(super) zero_pages: ZeroPageDetection,
    pub(super) packet_num: &'a AtomicU64,
    pub(super) progress: &'a Progress,
    /// Set once this channel wrote its last byte (a hang-up is then normal).
    pub(super) done: &'a AtomicBool,
    /// `max_bandwidth`, shared by all channels.
    pub(super) limiter: &'a RateLimiter,
    /// Counts the SYNC packets written.
    pub(super) syncs: &'a SyncsWritten,
    pub(super) abort: &'a Abort<'w>,
}

/// A packet header's buffer.
type Header = [u8; RAM_PACKET_HEADER_SIZE];

impl ChannelWorker<'_, '_> {
    /// Runs until the queue closes (normal end) or an error.
    pub(super) fn run(mut self, jobs: JobQueue<'_>) -> Result<()> {
        let mut header: Box<Header> = Box::new([0; RAM_PACKET_HEADER_SIZE]);
        let mut offsets: Vec<u64> = Vec::with_capacity(PAGES_PER_PACKET);
        let mut staging = Staging::default();
        while let Some(job) = jobs.next() {
            match job {
                Job::Pages(batch) => {
                    self.send_pages(&batch, &mut header, &mut offsets, &mut staging)?;
                }
                Job::Sync => self.send_sync(&mut header)?,
            }
        }
        self.done.store(true, Ordering::Release);
        self.conn.shutdown_write();
        Ok(())
    }

    fn send_pages(
        &mut self,
        batch: &PageBatch<'_>,
        header: &mut Header,
        offsets: &mut Vec<u64>,
        staging: &mut Staging,
    ) -> Result<()> {
        // Zero-page detection on this thread: data pages first, zero pages
        // after them (QEMU's multifd_send_zero_page_detect()). Pages the
        // driver found in holes of the block's file are neither read nor
        // scanned. A block that is a shared mapping of a file of 4 KiB
        // pages is read through the file into the channel's own buffer
        // (see `Staging`), anything else through its mapping.
        let detect = self.zero_pages == ZeroPageDetection::Multifd;
        let compression = self.method.compression();
        let (sorted, normal, data) = match staging.read(batch, detect, offsets) {
            Some(read) => {
                let normal = read.map_err(|e| {
                    Error::io(format!("multifd channel {}: reading guest RAM", self.id), e)
                })?;
                (&offsets[..], normal, DataPages::Own(staging))
            }
            None => {
                batch.populate_read(detect);
                let (sorted, normal) = batch.zero_pages_last(detect, offsets);
                let (data, _) = sorted.split_at(normal);
                (sorted.offsets(), normal, DataPages::Guest(data))
            }
        };
        let mut iovs: Vec<IoSlice<'_>> = Vec::with_capacity(normal + 1);
        iovs.push(IoSlice::new(&[]));
        // A packet of zero pages only has no payload (QEMU skips the method
        // and asserts next_packet_size == 0); a compressor would still emit
        // a sync flush.
        let payload = if normal == 0 {
            0
        } else {
            self.method.prepare(data, &mut iovs)?
        };
        RamPacketEncoder {
            compression,
            sync: false,
            packet_num: self.packet_num.fetch_add(1, Ordering::Relaxed),
            ramblock: batch.block().name(),
            offsets: sorted,
            normal_pages: normal,
            next_packet_size: payload,
        }
        .encode(header)
        .map_err(|source| Error::Encode {
            endpoint: Endpoint::Channel(self.id),
            source,
        })?;
        iovs[0] = IoSlice::new(&header[..]);
        self.limiter.take(
            RAM_PACKET_HEADER_SIZE as u64 + u64::from(payload),
            self.abort,
        );
        self.conn
            .writev_all(&mut iovs)
            .map_err(|e| Error::io(format!("multifd channel {}: writing a packet", self.id), e))?;
        let p = self.progress;
        p.add(&p.bytes, RAM_PACKET_HEADER_SIZE as u64 + u64::from(payload));
        p.add(&p.normal_pages, normal as u64);
        p.add(&p.zero_pages, (sorted.len() - normal) as u64);
        Ok(())
    }

    fn send_sync(&mut self, header: &mut Header) -> Result<()> {
        RamPacketEncoder {
            compression: self.method.compression(),
            sync: true,
            packet_num: self.packet_num.fetch_add(1, Ordering::Relaxed),
            ramblock: "",
            offsets: &[],
            normal_pages: 0,
            next_packet_size: 0,
        }
        .encode(header)
        .map_err(|source| Error::Encode {
            endpoint: Endpoint::Channel(self.id),
            source,
        })?;
        self.conn
            .writev_all(&mut [IoSlice::new(&header[..])])
            .map_err(|e| Error::io(format!("multifd channel {}: writing a SYNC", self.id), e))?;
        self.progress
            .add(&self.progress.bytes, RAM_PACKET_HEADER_SIZE as u64);
        self.syncs.add();
        Ok(())
    }
}
