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

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::lifecycle::Wake;
use crate::ram::PageBatch;
use crate::sync::{Arc, Condvar, Mutex, MutexGuard};

/// SYNC packets the channels have written, for a driver that waits for a
/// round to be on the wire (QEMU's `multifd_send_sync_main()` waits too):
/// that is what makes a round's measured time its transfer time. The abort
/// path wakes a waiting driver (it is registered as a [`Wake`]).
#[derive(Debug, Default)]
pub(crate) struct SyncsWritten {
    state: Mutex<SyncState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    written: u64,
    aborted: bool,
}

impl SyncsWritten {
    /// A channel wrote a SYNC packet.
    pub(crate) fn add(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).written += 1;
        self.changed.notify_all();
    }

    /// Waits until `target` SYNCs were written, or the migration aborted.
    pub(crate) fn wait_for(&self, target: u64) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.written < target && !s.aborted {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.written < target {
            return Err(Error::Aborted);
        }
        Ok(())
    }
}

impl Wake for SyncsWritten {
    fn wake_for_abort(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).aborted = true;
        self.changed.notify_all();
    }
}

/// Work for a channel.
#[derive(Debug)]
pub(crate) enum Job<'b> {
    /// Up to 128 pages of one block, checked when the batch was made.
    Pages(PageBatch<'b>),
    /// Send a SYNC packet after everything queued before.
    Sync,
}

/// A channel's queue length at or below which taking a job wakes a
/// sleeping driver. (Under the model checker: 1, with queues of 2, so that
/// full queues and wake-ups come within a few jobs.)
#[cfg(not(loom))]
const LOW_WATER: usize = 4;
#[cfg(loom)]
const LOW_WATER: usize = 1;

/// One channel's queue: a bounded FIFO under a mutex (the jobs are few and
/// large: one per packet of up to 512 KiB).
struct Queue<'b> {
    state: Mutex<QueueState<'b>>,
    /// The channel waits here for a job.
    jobs: Condvar,
    /// A blocking push ([`Dispatcher::sync_all`]) waits here for room.
    space: Condvar,
}

struct QueueState<'b> {
    jobs: VecDeque<Job<'b>>,
    /// The driver dropped its side: no job will come.
    closed: bool,
    /// The channel dropped its side: no job will be taken.
    gone: bool,
    /// Whether the channel waits for a job (a push then wakes it).
    taker_waiting: bool,
    /// Whether a blocking push waits for room.
    pusher_waiting: bool,
}

/// The driver's wake-up: a token set when some channel's queue went down to
/// [`LOW_WATER`], and the channels still alive.
#[derive(Debug)]
struct RoomState {
    token: bool,
    live: usize,
}

struct Shared<'b> {
    queues: Vec<Queue<'b>>,
    depth: usize,
    room: Mutex<RoomState>,
    room_cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|p| p.into_inner())
}

/// The driver's side of the channel queues.
pub(crate) struct Dispatcher<'b> {
    shared: Arc<Shared<'b>>,
    /// The queue to try first (round robin).
    next: usize,
}

/// A channel's side: its queue of jobs, and the way to wake the driver.
pub(crate) struct JobQueue<'b> {
    shared: Arc<Shared<'b>>,
    index: usize,
}

impl<'b> JobQueue<'b> {
    /// The next job, waiting for one; `None` once the driver closed the
    /// queue and it is empty.
    pub(crate) fn next(&self) -> Option<Job<'b>> {
        let q = &self.shared.queues[self.index];
        let mut s = lock(&q.state);
        let job = loop {
            if let Some(job) = s.jobs.pop_front() {
                break job;
            }
            if s.closed {
                return None;
            }
            s.taker_waiting = true;
            s = wait(&q.jobs, s);
            s.taker_waiting = false;
        };
        let low = s.jobs.len() <= LOW_WATER;
        if s.pusher_waiting {
            q.space.notify_one();
        }
        drop(s);
        if low {
            // Already set: the driver has a wake-up pending.
            let mut room = lock(&self.shared.room);
            if !room.token {
                room.token = true;
                self.shared.room_cv.notify_one();
            }
        }
        Some(job)
    }
}

impl Drop for JobQueue<'_> {
    fn drop(&mut self) {
        let q = &self.shared.queues[self.index];
        {
            let mut s = lock(&q.state);
            s.gone = true;
            q.space.notify_all();
        }
        let mut room = lock(&self.shared.room);
        room.live -= 1;
        self.shared.room_cv.notify_all();
    }
}

impl Drop for Dispatcher<'_> {
    fn drop(&mut self) {
        for q in &self.shared.queues {
            let mut s = lock(&q.state);
            s.closed = true;
            q.jobs.notify_all();
        }
    }
}

/// Queues of `depth` jobs (more than [`LOW_WATER`]) for `channels` channels.
pub(crate) fn queues<'b>(channels: usize, depth: usize) -> (Dispatcher<'b>, Vec<JobQueue<'b>>) {
    assert!(depth > LOW_WATER, "queue depth {depth} <= LOW_WATER");
    let shared = Arc::new(Shared {
        queues: (0..channels)
            .map(|_| Queue {
                state: Mutex::new(QueueState {
                    jobs: VecDeque::with_capacity(depth),
                    closed: false,
                    gone: false,
                    taker_waiting: false,
                    pusher_waiting: false,
                }),
                jobs: Condvar::new(),
                space: Condvar::new(),
            })
            .collect(),
        depth,
        room: Mutex::new(RoomState {
            token: false,
            live: channels,
        }),
        room_cv: Condvar::new(),
    });
    let ends = (0..channels)
        .map(|index| JobQueue {
            shared: Arc::clone(&shared),
            index,
        })
        .collect();
    (Dispatcher { shared, next: 0 }, ends)
}

/// What a push without waiting did.
enum Pushed<'b> {
    Done,
    Full(Job<'b>),
}

impl<'b> Dispatcher<'b> {
    /// Pushes `job` on queue `k` if it has room; fails when its channel is
    /// gone.
    fn try_push(&self, k: usize, job: Job<'b>) -> Result<Pushed<'b>> {
        let q = &self.shared.queues[k];
        let mut s = lock(&q.state);
        if s.gone {
            return Err(Error::Aborted);
        }
        if s.jobs.len() >= self.shared.depth {
            return Ok(Pushed::Full(job));
        }
        s.jobs.push_back(job);
        if s.taker_waiting {
            q.jobs.notify_one();
        }
        Ok(Pushed::Done)
    }

    /// Gives `job` to the next channel with room, sleeping while none has.
    /// Fails when a channel is gone (it failed, and the migration is ending).
    pub(super) fn dispatch(&mut self, job: Job<'b>) -> Result<()> {
        let n = self.shared.queues.len();
        let mut job = job;
        loop {
            for i in 0..n {
                let k = (self.next + i) % n;
                match self.try_push(k, job)? {
                    Pushed::Done => {
                        self.next = (k + 1) % n;
                        return Ok(());
                    }
                    Pushed::Full(j) => job = j,
                }
            }
            // Every queue is full, so every live channel will take jobs
            // until its queue is at LOW_WATER and then set the token. A
            // channel that ended wakes us too: its queue then fails the
            // next pass.
            let mut room = lock(&self.shared.room);
            while !room.token && room.live == n {
                room = wait(&self.shared.room_cv, room);
            }
            room.token = false;
        }
    }

    /// Queues a SYNC on every channel (QEMU's `multifd_send_sync_main()`),
    /// waiting for room where a queue is full.
    pub(super) fn sync_all(&self) -> Result<()> {
        for q in &self.shared.queues {
            let mut s = lock(&q.state);
            while s.jobs.len() >= self.shared.depth && !s.gone {
                s.pusher_waiting = true;
                s = wait(&q.space, s);
                s.pusher_waiting = false;
            }
            if s.gone {
                return Err(Error::Aborted);
            }
            s.jobs.push_back(Job::Sync);
            if s.taker_waiting {
                q.jobs.notify_one();
            }
        }
        Ok(())
    }

    /// Whether a wake-up token is pending (tests).
    #[cfg(test)]
    fn take_token(&self) -> bool {
        std::mem::replace(&mut lock(&self.shared.room).token, false)
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
        assert!(!d.take_token(), "a wake-up above LOW_WATER");
        assert_eq!(offset(ends[0].next().unwrap()), 2 * 4096);
        assert!(d.take_token(), "no wake-up at LOW_WATER");
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

/// Model checking of the hand-off (`RUSTFLAGS="--cfg loom" cargo test -p
/// multifd --release --lib loom`): every interleaving of the driver and two
/// channels, within a preemption bound.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::model;
    use loom::thread;

    /// Takes jobs until the queue closes; returns (pages, syncs, whether a
    /// SYNC came last).
    fn drain(q: JobQueue<'static>) -> (usize, usize, bool) {
        let (mut pages, mut syncs, mut last_sync) = (0, 0, false);
        while let Some(job) = q.next() {
            match job {
                Job::Pages(_) => pages += 1,
                Job::Sync => syncs += 1,
            }
            last_sync = matches!(job, Job::Sync);
        }
        (pages, syncs, last_sync)
    }

    /// No lost wake-up, no deadlock: the driver fills both queues past full
    /// (so it sleeps until a channel is down to LOW_WATER), queues a SYNC
    /// on each, and closes; every job reaches a channel, each channel's
    /// SYNC after its jobs.
    #[test]
    fn loom_every_job_is_delivered_and_nobody_sleeps_forever() {
        model(|| {
            let (mut d, ends) = queues(2, LOW_WATER + 1);
            let mut ends = ends.into_iter();
            let (a, b) = (ends.next().unwrap(), ends.next().unwrap());
            let ta = thread::spawn(move || drain(a));
            let tb = thread::spawn(move || drain(b));
            // Sync jobs stand in for batches: the protocol does not look
            // inside a job. Five fill both queues of 2 and one more.
            for _ in 0..5 {
                d.dispatch(Job::Sync).unwrap();
            }
            d.sync_all().unwrap();
            drop(d);
            let (pa, sa, la) = ta.join().unwrap();
            let (pb, sb, lb) = tb.join().unwrap();
            assert_eq!(pa + pb, 0);
            assert_eq!(sa + sb, 5 + 2);
            assert!(la && lb, "a channel's last job is its SYNC");
        });
    }

    /// Disconnect: channels that end (fail) while the driver sleeps on
    /// full queues, or while it pushes a SYNC, make it fail instead of
    /// waiting for a wake-up that will not come.
    #[test]
    fn loom_the_driver_fails_once_every_channel_has_ended() {
        model(|| {
            let (mut d, ends) = queues(2, LOW_WATER + 1);
            let quitters: Vec<_> = ends
                .into_iter()
                .map(|q| {
                    thread::spawn(move || {
                        // Takes one job, then fails.
                        let _ = q.next();
                    })
                })
                .collect();
            let mut failed = false;
            for _ in 0..8 {
                if d.dispatch(Job::Sync).is_err() {
                    failed = true;
                    break;
                }
            }
            if !failed {
                failed = d.sync_all().is_err();
            }
            assert!(failed, "8 jobs and a SYNC fit queues of 2 and two takes");
            for q in quitters {
                q.join().unwrap();
            }
        });
    }
}
