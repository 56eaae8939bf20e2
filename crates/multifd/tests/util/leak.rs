//! Leak checks: the tests of a binary run one at a time, and each case
//! asserts that the process's threads and file descriptors are back where
//! they were before it (so a case that leaves an engine thread or a socket
//! behind fails, not a later one).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary, so that thread and fd counts of the
/// process only move because of the test holding the guard. Declare the
/// guard first in a test so it is dropped last.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names (`comm`) of the threads of this process.
pub fn thread_names() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push(comm.trim_end().to_owned());
        }
    }
    out
}

/// Number of threads of this process (entries of /proc/self/task).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open file descriptors of this process, with what they point at.
pub fn fds() -> BTreeSet<(i32, String)> {
    let mut out = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            // The directory handle of this very listing.
            if target.starts_with("/proc/") && target.ends_with("/fd") {
                continue;
            }
            out.insert((n, target));
        }
    }
    out
}

/// Threads the engine names (`multifd-send-N`, `multifd-recv-N`) or the
/// tests' own helpers (`hp-...`) that are still alive.
pub fn helper_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|n| n.starts_with("multifd-") || n.starts_with("hp-"))
        .collect()
}

/// Thread and fd counts taken before a case.
#[derive(Debug)]
pub struct Baseline {
    threads: usize,
    fds: BTreeSet<(i32, String)>,
}

impl Baseline {
    /// Open descriptors at the baseline.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }

    /// Takes the baseline. Waits a moment first, so the test that held the
    /// serial guard before has finished and the harness has started its
    /// next thread (the harness spawns one only when a test ends).
    pub fn take() -> Self {
        std::thread::sleep(Duration::from_millis(25));
        Self {
            threads: thread_count(),
            fds: fds(),
        }
    }

    /// Asserts no engine or helper thread is alive and the thread and fd
    /// counts are back at the baseline. The engine joins its threads and
    /// closes its sockets before it returns, so nothing should need time;
    /// a short grace period only absorbs the test harness's own threads.
    pub fn check(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let helpers = helper_threads();
            let threads = thread_count();
            let now = fds();
            let extra_fds: Vec<_> = now.difference(&self.fds).cloned().collect();
            let fd_ok = now.len() <= self.fds.len() && extra_fds.is_empty();
            if helpers.is_empty() && threads <= self.threads && fd_ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: resources left behind: helper/engine threads {helpers:?}, \
                     threads {threads} (baseline {}), all threads {:?}, \
                     fds {} (baseline {}), new fds {extra_fds:?}",
                    self.threads,
                    thread_names(),
                    now.len(),
                    self.fds.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Spawns a named helper thread (names start with `hp-`).
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(format!("hp-{name}"))
        .spawn(f)
        .expect("spawning a helper thread")
}
