//! The model of one direction of a link, as a pure function of time: a
//! drop-tail queue in front of a serialiser at the link rate, then a fixed
//! propagation delay.

/// The smallest queue a link gets, in bytes. Twice the bandwidth-delay
/// product alone is tiny on a short link (250 KB at 10 Gbit/s, 0.1 ms) and
/// holds only a few of the 64 KiB packets a TUN device without segmentation
/// offload carries; 1 MiB (about 700 full-size Ethernet frames, 16 of the
/// largest TUN packets) absorbs TCP's initial window and the bursts of several
/// connections starting together without drops, yet keeps the queueing delay
/// at 100 Mbit/s to about 84 ms.
pub const QUEUE_FLOOR_BYTES: u64 = 1 << 20;

const NS_PER_S: u128 = 1_000_000_000;

/// Rate and one-way delay of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    /// Serialisation rate in bits per second (more than zero).
    pub rate_bps: u64,
    /// Propagation delay, in nanoseconds: half the round-trip time.
    pub one_way_ns: u64,
}

impl LinkParams {
    /// The drop-tail bound, in bytes waiting for the serialiser: twice the
    /// bandwidth-delay product (round trip), at least [`QUEUE_FLOOR_BYTES`].
    pub fn queue_limit_bytes(&self) -> u64 {
        let bdp = u128::from(self.rate_bps) * u128::from(2 * self.one_way_ns) / 8 / NS_PER_S;
        u64::try_from(2 * bdp)
            .unwrap_or(u64::MAX)
            .max(QUEUE_FLOOR_BYTES)
    }

    /// Nanoseconds to put `size` bytes on the wire at the rate, rounded up.
    pub fn serialisation_ns(&self, size: usize) -> u64 {
        let bits = size as u128 * 8 * NS_PER_S;
        u64::try_from(bits.div_ceil(u128::from(self.rate_bps.max(1)))).unwrap_or(u64::MAX)
    }
}

/// What the link does with a packet offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The packet is queued: its last bit leaves the sender at `departure_ns`
    /// and reaches the other end at `arrival_ns`.
    Deliver {
        /// When serialisation ends.
        departure_ns: u64,
        /// When the packet comes out at the far end.
        arrival_ns: u64,
    },
    /// The queue is full: the packet is lost.
    Drop,
}

/// One direction of a link, with the state of its serialiser.
#[derive(Debug, Clone)]
pub struct Link {
    params: LinkParams,
    limit_bytes: u64,
    last_departure_ns: u64,
}

impl Link {
    /// An idle link.
    pub fn new(params: LinkParams) -> Self {
        Self {
            params,
            limit_bytes: params.queue_limit_bytes(),
            last_departure_ns: 0,
        }
    }

    /// The parameters of the link.
    pub fn params(&self) -> LinkParams {
        self.params
    }

    /// Bytes still ahead of a packet offered at `now_ns`: the time the
    /// serialiser stays busy, at the link rate.
    pub fn backlog_bytes(&self, now_ns: u64) -> u64 {
        let busy = u128::from(self.last_departure_ns.saturating_sub(now_ns));
        u64::try_from(busy * u128::from(self.params.rate_bps) / 8 / NS_PER_S).unwrap_or(u64::MAX)
    }

    /// Offers a packet of `size` bytes at `now_ns` (times must not go
    /// backwards). It departs at max(now, previous departure) plus its
    /// serialisation time and arrives one delay later, or is dropped when the
    /// backlog plus the packet exceed the queue bound.
    pub fn admit(&mut self, now_ns: u64, size: usize) -> Verdict {
        let backlog = self.backlog_bytes(now_ns);
        if backlog > 0 && backlog.saturating_add(size as u64) > self.limit_bytes {
            return Verdict::Drop;
        }
        let start = now_ns.max(self.last_departure_ns);
        let departure_ns = start.saturating_add(self.params.serialisation_ns(size));
        self.last_departure_ns = departure_ns;
        Verdict::Deliver {
            departure_ns,
            arrival_ns: departure_ns.saturating_add(self.params.one_way_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MBIT100: LinkParams = LinkParams {
        rate_bps: 100_000_000,
        one_way_ns: 5_000_000,
    };

    fn times(v: Verdict) -> (u64, u64) {
        match v {
            Verdict::Deliver {
                departure_ns,
                arrival_ns,
            } => (departure_ns, arrival_ns),
            Verdict::Drop => panic!("dropped"),
        }
    }

    #[test]
    fn serialisation_at_the_rate() {
        // 1250 bytes = 10 000 bits = 100 us at 100 Mbit/s.
        assert_eq!(MBIT100.serialisation_ns(1250), 100_000);
        // 1 byte at 3 bit/s: 8/3 s, rounded up.
        let slow = LinkParams {
            rate_bps: 3,
            one_way_ns: 0,
        };
        assert_eq!(slow.serialisation_ns(1), 2_666_666_667);
    }

    #[test]
    fn idle_link_departs_after_serialisation_and_arrives_after_the_delay() {
        let mut l = Link::new(MBIT100);
        assert_eq!(times(l.admit(1_000_000, 1250)), (1_100_000, 6_100_000));
        // Long after: idle again, the previous departure does not matter.
        assert_eq!(times(l.admit(50_000_000, 1250)), (50_100_000, 55_100_000));
    }

    #[test]
    fn back_to_back_packets_queue_behind_each_other() {
        let mut l = Link::new(MBIT100);
        let a = times(l.admit(0, 1250));
        let b = times(l.admit(0, 1250));
        let c = times(l.admit(150_000, 1250));
        assert_eq!(a, (100_000, 5_100_000));
        assert_eq!(b, (200_000, 5_200_000));
        // Arrives while b is on the wire: starts when b is done.
        assert_eq!(c, (300_000, 5_300_000));
        assert_eq!(l.backlog_bytes(150_000), 1250 + 625);
    }

    #[test]
    fn queue_limit_is_twice_the_bdp_with_a_floor() {
        // 1 Gbit/s, 10 ms RTT: BDP 1.25 MB, bound 2.5 MB.
        let p = LinkParams {
            rate_bps: 1_000_000_000,
            one_way_ns: 5_000_000,
        };
        assert_eq!(p.queue_limit_bytes(), 2_500_000);
        // 100 Mbit/s, 10 ms: 2 x 125 KB is under the floor.
        assert_eq!(MBIT100.queue_limit_bytes(), QUEUE_FLOOR_BYTES);
    }

    #[test]
    fn full_queue_drops_the_tail_and_recovers_as_it_drains() {
        let mut l = Link::new(MBIT100);
        let size = 65_000;
        let limit = MBIT100.queue_limit_bytes();
        let mut admitted = 0u64;
        let mut last = 0;
        while let Verdict::Deliver { departure_ns, .. } = l.admit(0, size) {
            admitted += 1;
            last = departure_ns;
        }
        // Everything admitted fits the bound (the first packet goes straight
        // onto an idle wire), and one more packet would not.
        assert!(
            admitted * size as u64 <= limit + size as u64,
            "{admitted} admitted"
        );
        assert!((admitted + 1) * size as u64 > limit, "{admitted} admitted");
        // A drop leaves the serialiser alone.
        assert_eq!(l.admit(0, size), Verdict::Drop);
        assert_eq!(l.backlog_bytes(0), admitted * size as u64);
        // Once a packet's worth has drained, the next one queues at the end.
        let later = MBIT100.serialisation_ns(size);
        assert_eq!(times(l.admit(later, size)).0, last + later);
    }

    #[test]
    fn a_lone_packet_larger_than_the_bound_still_passes_an_idle_link() {
        let tiny = LinkParams {
            rate_bps: 8,
            one_way_ns: 0,
        };
        let mut l = Link {
            params: tiny,
            limit_bytes: 10,
            last_departure_ns: 0,
        };
        assert!(matches!(l.admit(0, 100), Verdict::Deliver { .. }));
        assert_eq!(l.admit(0, 1), Verdict::Drop);
    }
}
