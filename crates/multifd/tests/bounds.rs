//! The bounds no peer can break: after a complete stream, channels left
//! open are drained and cut; a SYNC the main stream has no flush point for
//! is a mismatch, not a wait; nothing moving for the idle timeout ends the
//! migration, on either side, whatever the threads are blocked in; a host
//! that does not answer a connect times out, and the wait can be
//! cancelled; a panic anywhere becomes a typed error; connections that
//! arrive after the migration's own are closed, unless they are migration
//! channels that would lose pages. Each case over TCP and Unix sockets,
//! with threads and descriptors back at their baseline.

mod util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use multifd::{
    Cancel, Endpoint, Error, GuestRam, Progress, RamBlockInfo, RamProvider, SourceOptions,
    SourceVm, StaticRam, migrate,
};
use util::*;

const IDLE: Duration = Duration::from_millis(400);

/// Channel 0's body of a complete two-channel migration: a page of 0x77 at
/// 4096, and its SYNC for each of the three flush points.
fn ch0_complete() -> Vec<u8> {
    [
        sync_packet(0),
        nocomp_packet(BLOCK, &[4096], 1, 0x77, 2),
        sync_packet(4),
        sync_packet(6),
    ]
    .concat()
}

fn ch1_complete() -> Vec<u8> {
    [sync_packet(1), sync_packet(3), sync_packet(5)].concat()
}

fn assert_page(inc: &multifd::Incoming, offset: u64, fill: u8) {
    let mut page = [0u8; 4096];
    inc.ram.blocks()[0].read_page(offset, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == fill), "page {offset:#x}");
}

// ---------------------------------------------------------------------------
// The end of a migration

/// The source's main stream ends (EOF, every flush point's SYNC in) but
/// both channels stay open and silent: a short drain, then the receiver
/// cuts them and succeeds, with every page there.
#[test]
fn channels_left_open_after_a_complete_stream_are_cut_and_it_completes() {
    let _g = serial();
    for t in TRANSPORTS {
        let run = Scenario::new(t)
            .channels(2)
            .main_complete()
            .channel(0, &ch0_complete(), End::Hold)
            .channel(1, &ch1_complete(), End::Hold)
            .ends_within(FAST);
        let inc = run.completed();
        assert!(run.took < Duration::from_secs(2), "{t:?}: {:?}", run.took);
        assert_eq!(inc.flushes, 3);
        assert_page(inc, 4096, 0x77);
        assert!(
            run.peer.all_closed_by_receiver,
            "{t:?}: a channel left open was never closed"
        );
        run.finish("channels left open");
    }
}

/// A channel that stops inside a packet after its last SYNC: what it was
/// sending cannot be complete, so cutting it is an error, not a success.
#[test]
fn a_channel_cut_inside_a_packet_after_the_end_is_an_error() {
    let _g = serial();
    let half = nocomp_packet(BLOCK, &[0], 1, 0x55, 7)[..200].to_vec();
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .main_complete()
            .channel(
                0,
                &[sync_packet(0), sync_packet(1), sync_packet(2), half.clone()].concat(),
                End::Hold,
            )
            .fails();
        assert_err!(
            o.err,
            Error::PeerClosed {
                endpoint: Endpoint::Channel(0),
                when: "inside a packet header",
            },
            "{t:?}"
        );
    }
}

/// One SYNC more than the main stream has flush points, the channel then
/// held open or closed: a typed mismatch, never a channel waiting at the
/// barrier for a release that will not come.
#[test]
fn an_extra_sync_is_a_mismatch_not_a_wait() {
    let _g = serial();
    let four = [
        sync_packet(0),
        sync_packet(1),
        sync_packet(2),
        sync_packet(3),
    ]
    .concat();
    for t in TRANSPORTS {
        for end in [End::Hold, End::Close] {
            let o = Scenario::new(t)
                .main_complete()
                .channel(0, &four, end)
                .fails();
            assert_err!(
                o.err,
                Error::Mismatch(m) if m.contains("more SYNC packets"),
                "{t:?} {end:?}"
            );
        }
    }
}

/// Pages after the channel's last SYNC (nothing orders them any more): the
/// migration fails, whether they were applied before the main stream's last
/// flush point was passed or after (a failed migration's RAM is not used).
#[test]
fn pages_after_the_last_sync_are_a_mismatch() {
    let _g = serial();
    let ch0 = [
        sync_packet(0),
        sync_packet(1),
        sync_packet(2),
        nocomp_packet(BLOCK, &[0], 1, 0x55, 3),
    ]
    .concat();
    for t in TRANSPORTS {
        for _ in 0..5 {
            let o = Scenario::new(t)
                .main_complete()
                .channel(0, &ch0, End::Hold)
                .fails();
            assert_err!(
                o.err,
                Error::Mismatch(m) if m.contains("after its last SYNC"),
                "{t:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Idle timeout

/// The main stream waits at a flush point for channel 0's SYNC; channel 0
/// identified itself and went silent. With no deadline of its own on that
/// read, the idle timeout ends it, naming the channel.
#[test]
fn a_silent_channel_mid_migration_hits_the_idle_timeout() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t).idle(IDLE).main_setup().silent(0).fails();
        assert_err!(
            o.err,
            Error::Stalled {
                endpoint: Endpoint::Channel(0),
                after_ms,
                ..
            } if *after_ms >= 400,
            "{t:?}"
        );
        assert!(o.took >= IDLE, "{t:?}: {:?}", o.took);
    }
}

/// A source that stops inside a data packet, mid-migration.
#[test]
fn a_source_that_stops_inside_a_packet_hits_the_idle_timeout() {
    let _g = serial();
    let half = nocomp_packet(BLOCK, &[0, 4096], 2, 0xAB, 1)[..3000].to_vec();
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .idle(IDLE)
            .connect(
                &[main_setup(&[(BLOCK, LEN)]), main_part()].concat(),
                End::Hold,
            )
            .channel(0, &[sync_packet(0), half.clone()].concat(), End::Hold)
            .fails();
        assert_err!(
            o.err,
            Error::Stalled {
                endpoint: Endpoint::Channel(0) | Endpoint::Main,
                ..
            },
            "{t:?}"
        );
        assert!(o.took >= IDLE, "{t:?}: {:?}", o.took);
    }
}

/// A sender whose receiver accepted and identified every connection, then
/// stopped reading: its writes block (socket buffers full) and the idle
/// timeout ends them.
#[test]
fn a_sender_blocked_on_a_receiver_that_stopped_reading_hits_the_idle_timeout() {
    let _g = serial();
    let ram = dense_ram(16384);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let fake = spawn("stopped-reader", move || {
            let conns = fake_accept(&listener, 2);
            // Hold them, reading nothing, until the sender gave up.
            let _ = hold_rx.recv_timeout(Duration::from_secs(10));
            conns.len()
        });
        let mut opts = send_opts(2);
        opts.config.idle_timeout = IDLE;
        let started = Instant::now();
        let r = migrate(&uri, &ram, &mut StaticRam, &opts, &Progress::default());
        let took = started.elapsed();
        hold_tx.send(()).unwrap();
        assert_eq!(fake.join().unwrap(), 3);
        drop(dir);
        assert_err!(
            r.as_ref().map(|_| ()).unwrap_err(),
            Error::Stalled { .. },
            "{t:?}"
        );
        assert!(took >= IDLE && took < FAST, "{t:?}: {took:?}");
        base.check("sender stalled");
    }
}

// ---------------------------------------------------------------------------
// Connecting

/// A listening socket nobody accepts from, with the smallest backlog, and
/// the connections that fill that backlog: further SYNs are dropped (TCP)
/// or connects would block (Unix), like a host that does not answer.
struct FullListener {
    uri: multifd::Uri,
    _listener: socket2::Socket,
    _fill: Vec<socket2::Socket>,
    _dir: Option<tempfile::TempDir>,
}

fn full_listener(t: Transport) -> FullListener {
    use socket2::{Domain, SockAddr, Socket, Type};
    let (listener, addr, uri, dir) = match t {
        Transport::Tcp => {
            let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            l.bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
            let a = l.local_addr().unwrap();
            let port = a.as_socket().unwrap().port();
            let uri = multifd::Uri::Tcp {
                host: "127.0.0.1".into(),
                port,
            };
            (l, a, uri, None)
        }
        Transport::Unix => {
            let dir = tempdir();
            let path = dir.path().join("full.sock");
            let l = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            let a = SockAddr::unix(&path).unwrap();
            l.bind(&a).unwrap();
            (l, a, multifd::Uri::Unix(path), Some(dir))
        }
    };
    listener.listen(0).unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        let domain = if t == Transport::Tcp {
            Domain::IPV4
        } else {
            Domain::UNIX
        };
        let s = Socket::new(domain, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr);
        fill.push(s);
    }
    FullListener {
        uri,
        _listener: listener,
        _fill: fill,
        _dir: dir,
    }
}

#[test]
fn connecting_to_a_host_that_does_not_answer_times_out_naming_it() {
    let _g = serial();
    let ram = dense_ram(16);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let bound = full_listener(t);
        let mut opts = send_opts(1);
        opts.config.connect_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let r = migrate(
            &bound.uri,
            &ram,
            &mut StaticRam,
            &opts,
            &Progress::default(),
        );
        let took = started.elapsed();
        let err = r.map(|_| ()).unwrap_err();
        assert_err!(
            &err,
            Error::ConnectTimeout { address, timeout_ms: 300 } if *address == bound.uri.to_string(),
            "{t:?}"
        );
        assert!(
            message(&err).contains(&bound.uri.to_string()),
            "{t:?}: {err}"
        );
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{t:?}: {took:?}"
        );
        drop(bound);
        base.check("connect timeout");
    }
}

#[test]
fn a_connect_that_waits_can_be_cancelled() {
    let _g = serial();
    let ram = dense_ram(16);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let bound = full_listener(t);
        let cancel = Arc::new(Cancel::new());
        let mut opts = send_opts(1);
        opts.config.connect_timeout = Duration::from_secs(30);
        opts.cancel = Some(cancel.clone());
        let started = Instant::now();
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                cancel.cancel();
            });
            migrate(
                &bound.uri,
                &ram,
                &mut StaticRam,
                &opts,
                &Progress::default(),
            )
        });
        let took = started.elapsed();
        assert_err!(r.map(|_| ()).unwrap_err(), Error::Cancelled, "{t:?}");
        assert!(took < Duration::from_secs(2), "{t:?}: {took:?}");
        drop(bound);
        base.check("cancelled connect");
    }
}

// ---------------------------------------------------------------------------
// Panics

/// A dirty log that panics: the source ends with `Panicked`, the real
/// receiver with a typed error, neither hangs.
#[test]
fn a_panic_in_the_callers_dirty_log_is_a_typed_error_on_both_sides() {
    struct Panicky;
    impl SourceVm for Panicky {
        fn collect_dirty(&mut self, _: &GuestRam, _: &mut [Vec<u64>]) -> multifd::Result<()> {
            panic!("injected: dirty log");
        }
        fn pause(&mut self) -> multifd::Result<()> {
            Ok(())
        }
        fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
            Ok(Vec::new())
        }
    }
    let _g = serial();
    let ram = dense_ram(256);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let receiving = start_receiver(listener, recv_opts(2, HS), Box::new(AnonRam));
        let started = Instant::now();
        let sent = migrate(
            &uri,
            &ram,
            &mut Panicky,
            &send_opts(2),
            &Progress::default(),
        );
        assert_err!(
            sent.map(|_| ()).unwrap_err(),
            Error::Panicked(name) if name == "multifd-driver",
            "{t:?}"
        );
        let (got, _) = receiving.wait(FAST).expect("receiver hangs");
        receiving.handle.join().unwrap();
        let err = got.map(|_| ()).unwrap_err();
        assert!(
            !matches!(err, Error::Aborted | Error::Panicked(_)),
            "{t:?}: receiver: {err:?}"
        );
        assert!(started.elapsed() < FAST);
        drop(dir);
        base.check("panicking dirty log");
    }
}

/// A RAM provider that panics: the receiver ends with `Panicked`, the real
/// source with a typed error.
#[test]
fn a_panic_in_the_ram_provider_is_a_typed_error_on_both_sides() {
    struct Panicky;
    impl RamProvider for Panicky {
        fn provide(&mut self, _: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
            panic!("injected: RAM provider");
        }
    }
    let _g = serial();
    // More than socket buffers hold, so the source is still sending when
    // the receiver fails (with no return path, a source that wrote
    // everything into the buffers cannot tell).
    let ram = dense_ram(16384);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let Bound { listener, uri, dir } = bind(t);
        let receiving = start_receiver(listener, recv_opts(2, HS), Box::new(Panicky));
        let sent = migrate(
            &uri,
            &ram,
            &mut StaticRam,
            &send_opts(2),
            &Progress::default(),
        );
        let (got, took) = receiving.wait(FAST).expect("receiver hangs");
        receiving.handle.join().unwrap();
        assert_err!(
            got.map(|_| ()).unwrap_err(),
            Error::Panicked(name) if name == "multifd-recv-main",
            "{t:?}"
        );
        let err = sent.map(|_| ()).unwrap_err();
        assert!(
            !matches!(err, Error::Aborted | Error::Panicked(_)),
            "{t:?}: sender: {err:?}"
        );
        assert!(took < FAST);
        drop(dir);
        base.check("panicking RAM provider");
    }
}

// ---------------------------------------------------------------------------
// Stray connections

/// Once every channel is connected, strangers (garbage, a half handshake,
/// silence, an immediate close) are closed and logged; the migration
/// completes with every page.
#[test]
fn strays_after_the_handshake_do_not_disturb_a_migration() {
    let _g = serial();
    for t in TRANSPORTS {
        let run = Scenario::new(t)
            .channels(2)
            .main_complete()
            .channel(0, &ch0_complete(), End::Close)
            .channel(1, &ch1_complete(), End::Close)
            .connect(b"GET / HTTP/1.0\r\n\r\n", End::Hold)
            .connect(&[0x11, 0x22], End::Hold)
            .connect(&[], End::Hold)
            .connect(&[0xde, 0xad, 0xbe, 0xef, 0, 0], End::Close)
            .connect(&[], End::Close)
            .ends_within(FAST);
        let inc = run.completed();
        assert_page(inc, 4096, 0x77);
        assert!(
            run.peer.all_closed_by_receiver,
            "{t:?}: a stray connection was left open"
        );
        run.finish("strays");
    }
}

/// A multifd channel beyond the configured count, queued before the
/// migration could complete: its pages would be lost, so the migration
/// fails, every time (the guard sweeps the queue before success).
#[test]
fn an_extra_channel_queued_before_the_end_fails_the_migration() {
    let _g = serial();
    let three = [sync_packet(0), sync_packet(1), sync_packet(2)].concat();
    for t in TRANSPORTS {
        for _ in 0..5 {
            let o = Scenario::new(t)
                .main_complete()
                .channel(0, &three, End::Close)
                .connect(&init_packet(UUID, 1), End::Hold)
                .fails();
            assert_err!(
                o.err,
                Error::Mismatch(m) if m.contains("more multifd channels"),
                "{t:?}"
            );
        }
    }
}

/// A flood of strangers during a migration: the receiver holds at most a
/// bounded number at once, so its descriptors stay bounded.
#[test]
fn a_flood_of_connections_keeps_descriptors_bounded() {
    let _g = serial();
    let t = Transport::Unix;
    let base = Baseline::take();
    let Bound { listener, uri, dir } = bind(t);
    let receiving = start_receiver(listener, recv_opts(1, HS), Box::new(AnonRam));
    // Main and channel 0 identify themselves; the main stream stops after
    // its setup, so the migration stays open while the flood comes.
    let main = Sock::connect(&uri).unwrap();
    main.write_all(&main_setup(&[(BLOCK, LEN)])).unwrap();
    let ch0 = Sock::connect(&uri).unwrap();
    ch0.write_all(&[init_packet(UUID, 0), sync_packet(0)].concat())
        .unwrap();
    let mut peak = 0;
    for i in 0..2000 {
        // Each dropped at once: the receiver must not keep them for long.
        if let Ok(s) = Sock::connect(&uri)
            && i % 3 == 0
        {
            let _ = s.write_all(b"garbage!");
        }
        if i % 200 == 0 {
            peak = peak.max(fds().len());
        }
    }
    // Ours: main, channel 0, a socket being connected; the receiver's: its
    // listener, two connections and their handles, at most 64 newcomers.
    assert!(
        peak < base.fd_count() + 64 + 32,
        "descriptors grew to {peak} (baseline {})",
        base.fd_count()
    );
    // The migration goes on: the rest of the stream completes it.
    main.write_all(&[main_part(), main_end()].concat()).unwrap();
    ch0.write_all(&[sync_packet(1), sync_packet(2)].concat())
        .unwrap();
    drop((main, ch0));
    let (got, _) = receiving.wait(FAST).expect("receiver hangs");
    receiving.handle.join().unwrap();
    got.unwrap_or_else(|e| panic!("flood: {e}"));
    drop(dir);
    base.check("flood");
}

// ---------------------------------------------------------------------------
// The RAM limit

/// A source announcing more RAM than allowed is refused before anything
/// is mapped.
#[test]
fn announced_ram_over_the_limit_is_refused_before_mapping() {
    let _g = serial();
    for t in TRANSPORTS {
        let o = Scenario::new(t)
            .max_ram(LEN - 4096)
            .main_setup()
            .silent(0)
            .fails();
        assert_err!(
            o.err,
            Error::RamLimit { announced, limit } if *announced == LEN && *limit == LEN - 4096,
            "{t:?}"
        );
    }
}

fn send_opts(channels: u8) -> SourceOptions {
    SourceOptions {
        config: multifd::MigrationConfig {
            channels,
            handshake_timeout: HS,
            connect_timeout: Duration::from_secs(2),
            ..multifd::MigrationConfig::default()
        },
        ..SourceOptions::default()
    }
}

fn dense_ram(pages: u64) -> GuestRam {
    let mut ram = GuestRam::new();
    ram.push(dense_block("m0", pages)).unwrap();
    ram
}

/// Accepts the main channel and `n` multifd channels and reads their
/// identification, like a receiver that then does nothing.
fn fake_accept(listener: &multifd::Listener, n: usize) -> Vec<multifd::Connection> {
    let mut conns = Vec::new();
    while conns.len() < n + 1 {
        let Some(mut c) = listener.accept(Some(FAST)).unwrap() else {
            break;
        };
        let mut head = [0u8; 4];
        if !c.read_exact_or_eof(&mut head).unwrap() {
            continue;
        }
        if u32::from_be_bytes(head) == multifd_wire::packet::MULTIFD_MAGIC {
            let mut rest = [0u8; 60];
            c.read_exact_or_eof(&mut rest).unwrap();
        }
        conns.push(c);
    }
    conns
}
