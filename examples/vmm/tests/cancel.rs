//! Cancelling a live migration of the running guest during round 1,
//! during a later round and during the switchover (after the pause): each
//! time the source guest runs on (resumed if it was paused), the
//! destination fails, and afterwards the process has exactly the threads
//! and file descriptors it had before the first migration.
//!
//! One test in its own binary, so that no other test's threads or fds move
//! the counts.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::live::{listen, receive_options, running_source, source_options, spawn_destination};
use common::{END, START};
use multifd::{Cancel, Error, GuestRam, MigrationStatus, Progress, SourceOptions, SourceVm};
use multifd_example_vmm::migration::{LiveSource, check_running, expect_progress, source_ram};
use multifd_example_vmm::{Machine, RunState};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn fds() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let t = std::fs::read_link(e.path()).ok()?.display().to_string();
            // The directory handle of this very listing.
            (!t.ends_with("/fd")).then(|| format!("{} {t}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// The live source, and it cancels right after the pause when asked.
struct CancelAtPause<'a> {
    inner: LiveSource<'a>,
    cancel: Option<Arc<Cancel>>,
}

impl SourceVm for CancelAtPause<'_> {
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        self.inner.collect_dirty(ram, dirty)
    }
    fn pause(&mut self) -> multifd::Result<()> {
        self.inner.pause()?;
        if let Some(c) = &self.cancel {
            c.cancel();
        }
        Ok(())
    }
    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        self.inner.device_state()
    }
    fn resume(&mut self) -> multifd::Result<()> {
        self.inner.resume()
    }
    fn throttle(&mut self, percent: u8) -> multifd::Result<()> {
        self.inner.throttle(percent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    Round1,
    RoundN,
    Switchover,
}

fn cancelled_migration(src: &Machine, log: &mut dyn multifd_example_vmm::DirtyLog, when: When) {
    let cancel = Arc::new(Cancel::new());
    let opts = SourceOptions {
        cancel: Some(cancel.clone()),
        max_rounds: 1000,
        ..match when {
            // Round 1 (33 MB of data) takes ~1.6 s at 20 MB/s.
            When::Round1 => SourceOptions {
                max_bandwidth: Some(20_000_000),
                ..source_options(4)
            },
            // Never converges: every round finds the whole pass dirty.
            When::RoundN => SourceOptions {
                max_bandwidth: Some(100_000_000),
                downtime_limit: Duration::from_millis(50),
                ..source_options(4)
            },
            When::Switchover => source_options(4),
        }
    };
    let (listener, uri) = listen();
    let ropts = receive_options(4);
    let progress = Progress::default();
    let ram = source_ram(src).unwrap();
    let (sent, received, paused) = std::thread::scope(|s| {
        let dest = spawn_destination(s, &listener, &ropts);
        let watcher = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let info = progress.query();
                let now = match when {
                    When::Round1 => {
                        info.status == MigrationStatus::Active && info.transferred > 4 << 20
                    }
                    When::RoundN => info.dirty_sync_count >= 2,
                    When::Switchover => return None,
                };
                if now {
                    cancel.cancel();
                    return Some(info);
                }
                assert!(
                    Instant::now() < deadline,
                    "never reached {when:?}: {info:?}"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let mut vm = CancelAtPause {
            inner: LiveSource::new(src, log, &opts),
            cancel: (when == When::Switchover).then(|| cancel.clone()),
        };
        let sent = multifd::migrate(&uri, &ram, &mut vm, &opts, &progress);
        let at = watcher.join().unwrap();
        if let Some(info) = &at {
            eprintln!("{when:?}: cancelled at {info:?}");
        }
        if when == When::Round1 {
            assert_eq!(at.unwrap().dirty_sync_count, 0, "round 1 was over");
        }
        (
            sent,
            dest.join().unwrap(),
            (vm.inner.paused_at, vm.inner.resumed_at),
        )
    });
    assert!(
        matches!(sent, Err(Error::Cancelled)),
        "{when:?}: source {sent:?}"
    );
    assert_eq!(progress.query().status, MigrationStatus::Cancelled);
    let Err(e) = received else {
        panic!("{when:?}: the destination completed");
    };
    eprintln!("{when:?}: destination failed: {e:#}");
    match when {
        When::Switchover => assert!(
            paused.0.is_some() && paused.1.is_some(),
            "switchover: paused {:?}, resumed {:?}",
            paused.0,
            paused.1
        ),
        _ => assert!(paused.0.is_none(), "{when:?}: paused"),
    }
    // The source guest runs on, consistently.
    assert_eq!(src.run_state(), RunState::Running, "{when:?}");
    expect_progress(src, 3, Duration::from_secs(10)).expect("the source runs on");
    check_running(src, START, END).expect("source counters");
}

#[test]
fn cancel_in_round_1_round_n_and_switchover_leaves_the_source_running_and_nothing_behind() {
    let mut src = running_source();
    let mut log = src.take_dirty_log().expect("dirty log");
    // Let the process settle (lazy statics, the kick handler) first.
    let (t0, f0) = (threads(), fds());
    for when in [When::Round1, When::RoundN, When::Switchover] {
        let t = Instant::now();
        cancelled_migration(&src, log.as_mut(), when);
        eprintln!("{when:?}: done in {:.2} s", t.elapsed().as_secs_f64());
        let deadline = Instant::now() + Duration::from_secs(2);
        while (threads() != t0 || fds() != f0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(threads(), t0, "{when:?}: threads left behind");
        let f = fds();
        assert_eq!(
            f,
            f0,
            "{when:?}: fds left behind: {:?}",
            f.symmetric_difference(&f0).collect::<Vec<_>>()
        );
    }
    drop(log);
    src.shutdown().unwrap();
}
