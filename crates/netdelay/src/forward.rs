//! One direction of the delay line: packets read from one TUN device go
//! through a [`Link`] and are written to the other device when they arrive.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::clock::{self, Clock};
use crate::link::{Link, Verdict};
use crate::tun::MAX_PACKET;

/// The longest a direction sleeps before it looks at the stop flag again.
pub const MAX_WAIT: Duration = Duration::from_millis(100);

/// Packets read in a row before due packets are delivered: bounds how late a
/// delivery can be while the input is busy.
const READ_BATCH: usize = 8;

/// Errors of a direction.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Reading the input device failed (it went away, with its namespace).
    #[error("{dir}: reading: {source}")]
    Read {
        /// The direction.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the output device failed other than by the device being down.
    #[error("{dir}: writing: {source}")]
    Write {
        /// The direction.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a direction did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Packets written to the output.
    pub delivered: u64,
    /// Bytes written to the output.
    pub bytes: u64,
    /// Packets dropped by the full queue.
    pub queue_drops: u64,
    /// Packets the output refused (device down).
    pub output_drops: u64,
    /// Sum of how late packets were written after their arrival time, in
    /// nanoseconds (wake-up and scheduling latency).
    pub late_ns: u64,
}

struct Packet {
    arrival_ns: u64,
    len: usize,
    buf: Box<[u8]>,
}

/// One direction: input device, output device and the link between them.
pub struct Direction<'a> {
    /// A name for logs, such as "src->dst".
    pub name: String,
    /// Where packets enter the link.
    pub input: &'a File,
    /// Where they come out.
    pub output: &'a File,
    /// The link model.
    pub link: Link,
    /// The clock of the link model.
    pub clock: Clock,
    /// How long before a packet is due the direction stops sleeping and
    /// polls instead (zero: it sleeps to the due time). On a virtual machine
    /// a sleeping thread wakes 20-40 us late, most of a 50 us one-way delay;
    /// polling is on time to a microsecond but keeps a CPU busy while
    /// packets are in flight.
    pub spin: Duration,
}

impl Direction<'_> {
    /// Forwards until `stop` is set (looked at least every [`MAX_WAIT`]) or
    /// the input fails; sets `stop` itself on failure, so the other
    /// direction ends too.
    pub fn run(mut self, stop: &AtomicBool) -> Result<Stats, ForwardError> {
        let out = self.forward(stop);
        stop.store(true, Ordering::Relaxed);
        out
    }

    fn forward(&mut self, stop: &AtomicBool) -> Result<Stats, ForwardError> {
        let mut stats = Stats::default();
        let mut queue: VecDeque<Packet> = VecDeque::new();
        let mut pool: Vec<Box<[u8]>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let now = self.clock.now_ns();
            while queue.front().is_some_and(|p| p.arrival_ns <= now) {
                let p = queue.pop_front().expect("front exists");
                self.deliver(&p, &mut stats)?;
                pool.push(p.buf);
            }
            let now = self.clock.now_ns();
            let timeout = queue
                .front()
                .map_or(MAX_WAIT, |p| {
                    Duration::from_nanos(p.arrival_ns.saturating_sub(now)).saturating_sub(self.spin)
                })
                .min(MAX_WAIT);
            let readable =
                clock::wait_readable(self.input, timeout).map_err(|source| ForwardError::Read {
                    dir: self.name.clone(),
                    source,
                })?;
            if !readable {
                continue;
            }
            for _ in 0..READ_BATCH {
                let mut buf = pool
                    .pop()
                    .unwrap_or_else(|| vec![0; MAX_PACKET].into_boxed_slice());
                let len = match (&mut &*self.input).read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        pool.push(buf);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        pool.push(buf);
                        continue;
                    }
                    Err(source) => {
                        return Err(ForwardError::Read {
                            dir: self.name.clone(),
                            source,
                        });
                    }
                };
                let now = self.clock.now_ns();
                match self.link.admit(now, len) {
                    Verdict::Deliver { arrival_ns, .. } => queue.push_back(Packet {
                        arrival_ns,
                        len,
                        buf,
                    }),
                    Verdict::Drop => {
                        stats.queue_drops += 1;
                        pool.push(buf);
                    }
                }
                if queue.front().is_some_and(|p| p.arrival_ns <= now) {
                    break;
                }
            }
        }
        Ok(stats)
    }

    fn deliver(&self, p: &Packet, stats: &mut Stats) -> Result<(), ForwardError> {
        let late = self.clock.now_ns().saturating_sub(p.arrival_ns);
        tracing::trace!(dir = %self.name, late, len = p.len, "deliver");
        match (&mut &*self.output).write(&p.buf[..p.len]) {
            Ok(_) => {
                stats.delivered += 1;
                stats.bytes += p.len as u64;
                stats.late_ns += late;
                Ok(())
            }
            // Down (EIO), or a packet the stack refuses (EINVAL): lost on
            // the wire, as on a real link.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                stats.output_drops += 1;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stats.output_drops += 1;
                Ok(())
            }
            Err(source) => Err(ForwardError::Write {
                dir: self.name.clone(),
                source,
            }),
        }
    }
}
