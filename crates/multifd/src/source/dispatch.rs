//! The hand-off from the driver to the channel threads.
//!
//! The driver hands a *job* to a channel: a batch of up to 128 pages of one
//! RAM block, or a SYNC. Each channel has a short queue, and a batch goes to
//! the next channel with room (like QEMU's `multifd_send_pages()`, which
//! picks a channel that is free). A SYNC is queued on every channel, behind
//! the batches already there, so each channel's SYNC packet follows all of
//! its round's data. The channel thread runs zero-page detection, asks the
//! payload method for I/O vectors and writes header and payload with one
//! vectored write.
//!
//! When every queue is full the driver sleeps until some channel has worked
//! its queue down to half ([`LOW_WATER`]), then refills the queues in one go:
//! it wakes once per several batches, not once per batch (on two cores, a
//! wake-up per packet was three quarters of a migration's context switches).

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::error::{Error, Result};
use crate::ram::PageBatch;

/// Work for a channel.
#[derive(Debug)]
pub(crate) enum Job<'b> {
    /// Up to 128 pages of one block, checked when the batch was made.
    Pages(PageBatch<'b>),
    /// Send a SYNC packet after everything queued before.
    Sync,
}

/// A channel's queue length at or below which taking a job wakes a
/// sleeping driver.
const LOW_WATER: usize = 4;

/// The driver's side of the channel queues.
pub(crate) struct Dispatcher<'b> {
    queues: Vec<Sender<Job<'b>>>,
    /// A token arrives when some channel's queue went down to [`LOW_WATER`].
    /// Disconnected once every channel has ended.
    room: Receiver<()>,
    /// The queue to try first (round robin).
    next: usize,
}

/// A channel's side: its queue of jobs, and the way to wake the driver.
pub(crate) struct JobQueue<'b> {
    jobs: Receiver<Job<'b>>,
    room: Sender<()>,
}

impl<'b> JobQueue<'b> {
    /// The next job, waiting for one; `None` once the driver closed the
    /// queue and it is empty.
    pub(crate) fn next(&self) -> Option<Job<'b>> {
        let job = self.jobs.recv().ok()?;
        if self.jobs.len() <= LOW_WATER {
            // A full slot means the driver has a wake-up pending already.
            let _ = self.room.try_send(());
        }
        Some(job)
    }
}

/// Queues of `depth` jobs (more than [`LOW_WATER`]) for `channels` channels.
pub(crate) fn queues<'b>(channels: usize, depth: usize) -> (Dispatcher<'b>, Vec<JobQueue<'b>>) {
    assert!(depth > LOW_WATER, "queue depth {depth} <= LOW_WATER");
    let (room_tx, room) = bounded(1);
    let (queues, ends) = (0..channels)
        .map(|_| {
            let (tx, rx) = bounded(depth);
            (
                tx,
                JobQueue {
                    jobs: rx,
                    room: room_tx.clone(),
                },
            )
        })
        .unzip();
    let dispatcher = Dispatcher {
        queues,
        room,
        next: 0,
    };
    (dispatcher, ends)
}

impl<'b> Dispatcher<'b> {
    /// Gives `job` to the next channel with room, sleeping while none has.
    /// Fails when a channel is gone (it failed, and the migration is ending).
    pub(super) fn dispatch(&mut self, job: Job<'b>) -> Result<()> {
        let n = self.queues.len();
        let mut job = job;
        loop {
            for i in 0..n {
                let k = (self.next + i) % n;
                match self.queues[k].try_send(job) {
                    Ok(()) => {
                        self.next = (k + 1) % n;
                        return Ok(());
                    }
                    Err(TrySendError::Full(j)) => job = j,
                    Err(TrySendError::Disconnected(_)) => return Err(Error::Aborted),
                }
            }
            // Every queue is full, so every live channel will take jobs
            // until its queue is at LOW_WATER and then send a token. When
            // all channels have ended, `recv` fails.
            self.room.recv().map_err(|_| Error::Aborted)?;
        }
    }

    /// Queues a SYNC on every channel (QEMU's `multifd_send_sync_main()`).
    pub(super) fn sync_all(&self) -> Result<()> {
        for tx in &self.queues {
            tx.send(Job::Sync).map_err(|_| Error::Aborted)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RamBlock;
    use std::sync::LazyLock;

    static BLOCK: LazyLock<RamBlock> =
        LazyLock::new(|| RamBlock::anonymous("m0", 256 * 4096).unwrap());

    fn pages(n: u64) -> Job<'static> {
        let mut batch = PageBatch::new(&BLOCK, 1);
        batch.push(n * 4096).unwrap();
        Job::Pages(batch)
    }

    fn offset(job: Job<'_>) -> u64 {
        match job {
            Job::Pages(batch) => batch.as_list().offsets()[0],
            Job::Sync => u64::MAX,
        }
    }

    #[test]
    fn jobs_go_round_robin_and_only_low_water_wakes_the_driver() {
        let depth = LOW_WATER + 2;
        let (mut d, ends) = queues(2, depth);
        for n in 0..2 * depth as u64 {
            d.dispatch(pages(n)).unwrap();
        }
        assert_eq!(offset(ends[0].next().unwrap()), 0);
        assert_eq!(offset(ends[1].next().unwrap()), 4096);
        // Both queues are at LOW_WATER + 1: no wake-up yet.
        assert!(d.room.try_recv().is_err(), "a wake-up above LOW_WATER");
        assert_eq!(offset(ends[0].next().unwrap()), 2 * 4096);
        assert!(d.room.try_recv().is_ok(), "no wake-up at LOW_WATER");
        // Refill: queue 0 has two free slots, queue 1 one.
        for n in 100..103 {
            d.dispatch(pages(n)).unwrap();
        }
        // All full, no token: the driver sleeps until queue 1 is at
        // LOW_WATER, which takes two more jobs from it.
        std::thread::scope(|s| {
            let h = s.spawn(move || d.dispatch(pages(103)));
            ends[1].next().unwrap();
            ends[1].next().unwrap();
            h.join().unwrap().unwrap();
        });
    }

    #[test]
    fn a_sleeping_driver_fails_once_every_channel_has_ended() {
        let (mut d, ends) = queues(2, LOW_WATER + 1);
        for n in 0..2 * (LOW_WATER as u64 + 1) {
            d.dispatch(pages(n)).unwrap();
        }
        std::thread::scope(|s| {
            let h = s.spawn(move || d.dispatch(pages(99)));
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(ends);
            assert!(matches!(h.join().unwrap(), Err(Error::Aborted)));
        });
    }

    #[test]
    fn a_channel_that_ended_fails_the_dispatch() {
        let (mut d, mut ends) = queues(2, LOW_WATER + 1);
        drop(ends.remove(1));
        // Channel 0 takes its share; then channel 1's turn fails.
        d.dispatch(pages(0)).unwrap();
        assert!(matches!(d.dispatch(pages(1)), Err(Error::Aborted)));
    }
}
