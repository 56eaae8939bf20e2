//! Live migration of the running guest through the library, in one test
//! process (source and destination machines, loopback TCP):
//! * a plain migration converges, the guest goes on from where it was
//!   (markers, counters consistent with them), the downtime from the
//!   source's pause to the destination's resume is within the limit +
//!   50 ms, and `query-migrate` figures are readable while it runs;
//! * a guest that dirties faster than the link carries does not converge
//!   without controls (a typed error, the source keeps running, the
//!   destination fails) and converges with auto-converge;
//! * the binary forced onto the workload guest by MULTIFD_VMM_NO_KVM
//!   migrates with write-protect dirty tracking, no KVM involved.
//!
//! KVM guests need /dev/kvm and nasm; without them (and without CI) the
//! workload guest runs the same tests.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::live::{migrate, running_source, source_options};
use common::{END, START};
use multifd::{AutoConverge, Error, MigrationStatus, Progress, SourceOptions};
use multifd_example_vmm::migration::{check_running, expect_progress, resume_incoming};
use multifd_example_vmm::{Machine, RunState};

/// One guest at a time (a second busy guest starves the first on 2 cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // RUST_LOG=multifd=debug shows the driver's rounds.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn live_migration_converges_and_the_guest_goes_on() {
    let _s = serial();
    let mut src = running_source();
    let mut log = src.take_dirty_log().expect("dirty log");
    let opts = source_options(4);
    let progress = Progress::default();
    // query-migrate while it runs, from another thread.
    let seen = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let (sent, paused, received) = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                seen.lock().unwrap().push(progress.query());
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let r = migrate(&src, log.as_mut(), &opts, &progress);
        done.store(true, Ordering::Release);
        r
    });
    let stats = sent.expect("migration");
    let (mut dst, incoming) = received.expect("destination");
    // Counters are checked once it runs (a check before would be downtime).
    let resumed = resume_incoming(&mut dst, &incoming, None).expect("resume");
    let downtime = resumed
        .at
        .duration_since(paused.expect("paused"))
        .expect("clock");
    let info = progress.query();
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(info.downtime.is_some() && info.dirty_sync_count >= 1);
    assert_eq!(info.transferred, stats.bytes);
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|i| i.status == MigrationStatus::Active),
        "never saw the migration active"
    );
    assert!(
        downtime <= opts.downtime_limit + Duration::from_millis(50),
        "downtime {downtime:?}"
    );
    // The guest goes on from where it was, consistently.
    let before = dst.markers();
    expect_progress(&dst, 3, Duration::from_secs(10)).expect("markers continue");
    let c = check_running(&dst, START, END).expect("counters");
    assert!(dst.markers() > before);
    assert_eq!(src.run_state(), RunState::Paused, "the source stays paused");
    eprintln!(
        "{}: {} rounds, {} bytes, pause -> resume {:.1} ms (source downtime {} ms, expected \
         {} ms), counters {c:?}",
        src.kind(),
        stats.rounds,
        stats.bytes,
        downtime.as_secs_f64() * 1e3,
        info.downtime.unwrap_or_default(),
        info.expected_downtime,
    );
    src.shutdown().unwrap();
    dst.shutdown().unwrap();
}

/// 100 MB/s carries one pass of the guest (32 MiB) in ~340 ms; the guest
/// makes a pass every ~11 ms (KVM) or less (workload): every round finds
/// all 8192 pages dirty again, above what 200 ms of downtime can send.
fn slow_link() -> SourceOptions {
    SourceOptions {
        downtime_limit: Duration::from_millis(200),
        max_bandwidth: Some(100_000_000),
        ..source_options(4)
    }
}

#[test]
fn a_guest_faster_than_the_link_needs_auto_converge() {
    let _s = serial();
    let mut src = running_source();
    let mut log = src.take_dirty_log().expect("dirty log");

    // Without controls: "not converging" after 5 rounds.
    let opts = SourceOptions {
        max_rounds: 5,
        ..slow_link()
    };
    let t = Instant::now();
    let (sent, paused, received) = migrate(&src, log.as_mut(), &opts, &Progress::default());
    match sent {
        Err(Error::NotConverging {
            rounds,
            remaining_pages,
            ..
        }) => {
            assert_eq!(rounds, 5);
            assert!(remaining_pages > 0);
        }
        other => panic!("expected NotConverging, got {other:?}"),
    }
    assert!(paused.is_none(), "the source was paused");
    assert!(received.is_err(), "the destination succeeded");
    assert_eq!(src.run_state(), RunState::Running);
    expect_progress(&src, 3, Duration::from_secs(10)).expect("the source runs on");
    check_running(&src, START, END).expect("source counters");
    eprintln!(
        "without controls: not converging after {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        received.err().map(|e| format!("{e:#}")).unwrap_or_default()
    );

    // With auto-converge (QEMU's defaults: 20%, +10%, at most 99%).
    let opts = SourceOptions {
        max_rounds: 80,
        max_time: Some(Duration::from_secs(60)),
        auto_converge: Some(AutoConverge::default()),
        ..slow_link()
    };
    let progress = Progress::default();
    let t = Instant::now();
    let (sent, _, received) = migrate(&src, log.as_mut(), &opts, &progress);
    let stats = sent.expect("auto-converge converges");
    let (mut dst, incoming) = received.expect("destination");
    resume_incoming(&mut dst, &incoming, Some((START, END))).expect("resume");
    expect_progress(&dst, 2, Duration::from_secs(10)).expect("markers continue");
    let info = progress.query();
    eprintln!(
        "auto-converge: converged in {:.1} s, {} rounds, throttle reached {}%, source downtime \
         {:?} ms",
        t.elapsed().as_secs_f64(),
        stats.rounds,
        max_throttle(&src),
        info.downtime
    );
    assert!(max_throttle(&src) > 0, "never throttled");
    assert_eq!(
        info.cpu_throttle_percentage, 0,
        "the throttle was not ended"
    );
    src.shutdown().unwrap();
    dst.shutdown().unwrap();
}

/// The throttle is set back to 0 after the migration: the highest one the
/// machine was given.
fn max_throttle(m: &Machine) -> u8 {
    m.max_throttle()
}

#[test]
fn the_binary_without_kvm_uses_write_protect() {
    let _s = serial();
    let vmm = env!("CARGO_BIN_EXE_multifd-vmm");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let uri = format!("tcp:127.0.0.1:{port}");
    let spawn = |args: &[&str]| {
        std::process::Command::new(vmm)
            .args(args)
            .env("MULTIFD_VMM_NO_KVM", "1")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning the VMM")
    };
    let dst = spawn(&["--incoming", &uri, "--run-secs", "0.2"]);
    std::thread::sleep(Duration::from_millis(300));
    let src = spawn(&["--migrate-to", &uri, "--migrate-after", "0.3"]);
    let src = src.wait_with_output().unwrap();
    let dst = dst.wait_with_output().unwrap();
    let out =
        String::from_utf8_lossy(&src.stdout).into_owned() + &String::from_utf8_lossy(&dst.stdout);
    assert!(
        src.status.success() && dst.status.success(),
        "{out}\n{}\n{}",
        String::from_utf8_lossy(&src.stderr),
        String::from_utf8_lossy(&dst.stderr)
    );
    assert!(out.contains(r#""event":"migrated""#), "{out}");
    assert!(out.contains(r#""dirty":"write-protect""#), "{out}");
    assert!(out.contains(r#""machine":"workload""#), "{out}");
    assert!(out.contains(r#""event":"running""#), "{out}");
    eprintln!("{out}");
}
