//! The sending engine: one thread per multifd channel.
//!
//! The driver hands a *job* to a channel: a batch of up to 128 pages of one
//! RAM block, or a SYNC. Each channel has a queue of capacity one, and a
//! batch goes to whichever channel has room first (a channel takes work only
//! when it is nearly idle, like QEMU's `multifd_send_pages()`). A SYNC is
//! queued on every channel, behind the batches already there, so each
//! channel's SYNC packet follows all of its round's data. The channel thread
//! runs zero-page detection, asks the payload method for I/O vectors and
//! writes header and payload with one vectored write.

mod worker;

use crossbeam_channel::{Select, Sender};

use crate::error::{Error, Result};

pub(crate) use worker::{ChannelWorker, Job};

/// The driver's side of the channel queues.
pub(crate) struct Dispatcher {
    queues: Vec<Sender<Job>>,
}

impl Dispatcher {
    pub(crate) fn new(queues: Vec<Sender<Job>>) -> Self {
        Self { queues }
    }

    /// Gives `job` to the first channel with room, blocking until one has.
    /// Fails when the channels are gone (one of them failed).
    pub(crate) fn dispatch(&self, job: Job) -> Result<()> {
        // Fast path: a channel with room right now, scanning from a rotating start.
        let mut job = job;
        for tx in &self.queues {
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::TrySendError::Full(j)) => job = j,
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                    return Err(Error::Aborted);
                }
            }
        }
        let mut sel = Select::new();
        for tx in &self.queues {
            sel.send(tx);
        }
        let op = sel.select();
        let idx = op.index();
        op.send(&self.queues[idx], job).map_err(|_| Error::Aborted)
    }

    /// Queues a SYNC on every channel (QEMU's `multifd_send_sync_main()`).
    pub(crate) fn sync_all(&self) -> Result<()> {
        for tx in &self.queues {
            tx.send(Job::Sync).map_err(|_| Error::Aborted)?;
        }
        Ok(())
    }
}
