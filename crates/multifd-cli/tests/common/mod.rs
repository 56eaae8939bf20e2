//! Test harness shared by the QEMU interop tests (std + serde_json + libc).
//!
//! * [`TestCtx`]: one per test: a temp dir under /dev/shm (removed in Drop),
//!   a time budget enforced by a watchdog thread (which SIGKILLs, by PID,
//!   every child of the test still running when the budget runs out, so every
//!   blocked wait returns and the test fails instead of hanging), and a
//!   registry of the children.
//! * [`Proc`]: a child process (QEMU or our `multifd` binary), stdout/stderr
//!   in files, killed (SIGKILL) and reaped by PID in Drop, and also when the
//!   test thread dies (`PR_SET_PDEATHSIG`).
//! * [`qemu`]: QEMU processes and a QMP client with I/O timeouts.
//! * [`checker`]: the live-guest RAM checker.
//! * helpers: [`require`] (tools present, or SKIPPED / a failure under
//!   `CI`), [`accel`], [`free_port`], [`wait_tcp_listening`],
//!   [`gen_image`], [`compare_files`], [`Params`].
#![allow(dead_code)] // every test crate uses a different part of the harness

pub mod checker;
pub mod guest;
pub mod qemu;

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// Guest page size.
pub const PAGE: u64 = 4096;

/// Our CLI binary: the one cargo built for these tests, or `MULTIFD_BIN`
/// (e.g. a release build, for timing-sensitive runs of a debug test binary).
pub fn multifd_bin() -> PathBuf {
    std::env::var_os("MULTIFD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_multifd")))
}

/// The repository root (two levels above this crate's manifest).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The QEMU accelerator to use: `MULTIFD_TEST_ACCEL=kvm|tcg` if set, else
/// `kvm` when /dev/kvm opens read-write, else `tcg`.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| match std::env::var("MULTIFD_TEST_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok("tcg") => "tcg",
        Ok(other) => panic!("MULTIFD_TEST_ACCEL={other:?}: expected kvm or tcg"),
        Err(_) => {
            let kvm = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if kvm { "kvm" } else { "tcg" }
        }
    })
}

/// The QEMU binary (`QEMU` env override).
pub fn qemu_binary() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Whether a program can be started at all (`PROG --version`).
pub fn have_program(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the tools a test needs are installed (`PROG --version` works).
///
/// A test must not pass without doing its work: when one is missing and
/// the environment variable `CI` is set (`.ci/run` sets it), this panics,
/// failing the test; otherwise it prints a loud `SKIPPED: ...` line on
/// stderr and returns false, and the test returns at once.
pub fn require(test: &str, progs: &[&str]) -> bool {
    let missing: Vec<&str> = progs.iter().copied().filter(|p| !have_program(p)).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {} not found and CI is set: this test must run \
         (scripts/install-test-deps installs QEMU 10 and nasm)",
        missing.join(", ")
    );
    // Straight to stderr, past the test harness's output capture (which
    // only takes the print macros): a skip must be seen without --nocapture.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: {test}: {} not found; the test did not run \
         (set CI=1 to make this a failure) ***\n",
        missing.join(", ")
    );
    false
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    // Ports handed out by this process are never handed out twice, so two
    // tests of one run cannot race for the same port.
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
    panic!("no free TCP port");
}

/// Whether something listens on TCP `port` (reads /proc/net/tcp{,6}; never
/// connects, as a probe connection would be taken for a migration channel).
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut it = line.split_whitespace();
                let local = it.nth(1).unwrap_or("");
                let state = it.nth(1).unwrap_or("");
                local.ends_with(&want) && state == "0A"
            })
        })
    })
}

/// Waits until `port` listens, or `proc` exits, or `timeout` passes.
pub fn wait_tcp_listening(port: u16, proc: &mut Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !tcp_listening(port) {
        if let Some(st) = proc.try_wait() {
            panic!(
                "{} exited ({st}) before listening on port {port}:\n{}",
                proc.name,
                proc.output_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} does not listen on port {port} after {timeout:?}",
            proc.name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `multifd receive --listen tcp:127.0.0.1:0 ARGS...` and returns it
/// with the port it chose, read from its "multifd: listening on URI" line
/// (no port is picked in advance, so parallel test runs cannot collide).
pub fn start_receiver<S: AsRef<std::ffi::OsStr>>(
    ctx: &TestCtx,
    name: &str,
    args: &[S],
) -> (Proc, u16) {
    let mut all: Vec<std::ffi::OsString> = vec![
        "receive".into(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
    ];
    all.extend(args.iter().map(|a| a.as_ref().to_owned()));
    let mut proc = ctx.multifd(name, &all);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let err = proc.stderr_text();
        let port = err.lines().find_map(|l| {
            l.strip_prefix("multifd: listening on tcp:")
                .and_then(|rest| rest.rsplit_once(':'))
                .and_then(|(_, port)| port.trim().parse::<u16>().ok())
        });
        if let Some(port) = port {
            return (proc, port);
        }
        if let Some(st) = proc.try_wait() {
            panic!(
                "[{}] {name} exited ({st}) before listening:\n{}",
                ctx.name,
                proc.output_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "[{}] {name} does not say where it listens:\n{}",
            ctx.name,
            proc.output_tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every `every` until it returns `Some`, at most `timeout`.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Live children of one test, by PID. A PID is removed (under the lock)
/// before its child is reaped, so the watchdog never signals a reused PID.
#[derive(Default)]
struct Registry {
    live: Mutex<HashSet<u32>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Per-test context: temp dir, time budget, children.
pub struct TestCtx {
    /// Test name (for logs).
    pub name: String,
    dir: PathBuf,
    /// When the watchdog fires.
    pub deadline: Instant,
    registry: Arc<Registry>,
    done: Arc<(Mutex<bool>, Condvar)>,
    timed_out: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
    keep: bool,
}

impl TestCtx {
    /// A context with a fresh temp dir and a watchdog that kills the test's
    /// children after `budget`.
    pub fn new(name: &str, budget: Duration) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = base.join(format!(
            "multifd-test-{}-{}-{nanos:08x}-{safe}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let registry = Arc::new(Registry::default());
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let timed_out = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + budget;
        let watchdog = {
            let (registry, done, timed_out) = (registry.clone(), done.clone(), timed_out.clone());
            let name = name.to_owned();
            std::thread::Builder::new()
                .name(format!("watchdog-{name}"))
                .spawn(move || {
                    let (lock, cv) = &*done;
                    let mut finished = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !*finished {
                        let now = Instant::now();
                        if now >= deadline {
                            timed_out.store(true, Ordering::SeqCst);
                            let live = registry.lock();
                            eprintln!(
                                "[{name}] time budget of {budget:?} exhausted: killing {} child process(es) {:?}",
                                live.len(),
                                live
                            );
                            for &pid in live.iter() {
                                // SAFETY: kill(2) with a PID of our own un-reaped child
                                // (entries leave the registry before being reaped).
                                unsafe {
                                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                                }
                            }
                            return;
                        }
                        finished = cv
                            .wait_timeout(finished, deadline - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                })
                .expect("spawning the watchdog")
        };
        let keep = std::env::var_os("MULTIFD_TEST_KEEP").is_some();
        eprintln!("[{name}] accel={} dir={}", accel(), dir.display());
        Self {
            name: name.to_owned(),
            dir,
            deadline,
            registry,
            done,
            timed_out,
            watchdog: Some(watchdog),
            keep,
        }
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether the watchdog fired.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// Time left in the budget.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Starts `cmd` as a child named `name` (output in `DIR/name.out`/`.err`).
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Proc {
        let out = self.path(&format!("{name}.out"));
        let err = self.path(&format!("{name}.err"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out).expect("creating stdout file"))
            .stderr(File::create(&err).expect("creating stderr file"));
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the test thread that started us, even if the test
                // binary is killed before any Drop runs.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let desc = format!("{cmd:?}");
        let mut live = self.registry.lock();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("[{}] starting {name}: {e}: {desc}", self.name));
        live.insert(child.id());
        drop(live);
        Proc {
            name: name.to_owned(),
            child,
            status: None,
            registry: self.registry.clone(),
            stdout: out,
            stderr: err,
            cmdline: desc,
        }
    }

    /// Starts our `multifd` binary with `args`.
    pub fn multifd<S: AsRef<std::ffi::OsStr>>(&self, name: &str, args: &[S]) -> Proc {
        let mut cmd = Command::new(multifd_bin());
        cmd.args(args);
        self.spawn(name, cmd)
    }

    /// Runs our binary to completion (bounded) and expects success.
    pub fn run_multifd<S: AsRef<std::ffi::OsStr>>(
        &self,
        name: &str,
        args: &[S],
        timeout: Duration,
    ) -> String {
        let mut p = self.multifd(name, args);
        let st = p.wait_timeout(timeout);
        match st {
            Some(s) if s.success() => p.stdout_text(),
            other => panic!(
                "[{}] {} ended {:?}:\n{}",
                self.name,
                p.cmdline,
                other.map(|s| s.to_string()),
                p.output_tail()
            ),
        }
    }
}

impl Drop for TestCtx {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.done;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        // Children normally died with their Proc guards; kill stragglers.
        for &pid in self.registry.lock().iter() {
            // SAFETY: kill(2) on our own un-reaped child (see Registry).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        if self.keep
            || (std::thread::panicking() && std::env::var_os("MULTIFD_TEST_KEEP_FAILED").is_some())
        {
            eprintln!("[{}] keeping {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A child process of a test.
pub struct Proc {
    /// Name used in messages and output file names.
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
    registry: Arc<Registry>,
    /// File with the child's stdout.
    pub stdout: PathBuf,
    /// File with the child's stderr.
    pub stderr: PathBuf,
    /// How it was started.
    pub cmdline: String,
}

impl Proc {
    /// PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut live = self.registry.lock();
            if let Ok(Some(st)) = self.child.try_wait() {
                live.remove(&self.child.id());
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll(timeout, Duration::from_millis(10), || self.try_wait())
    }

    /// Waits at most `timeout`; SIGKILLs it if it is still running then.
    /// Returns the status and whether it had to be killed.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> (ExitStatus, bool) {
        if let Some(st) = self.wait_timeout(timeout) {
            return (st, false);
        }
        (self.kill(), true)
    }

    /// SIGKILLs (by PID) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        let mut live = self.registry.lock();
        let _ = self.child.kill();
        live.remove(&self.child.id());
        drop(live);
        let st = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
        self.status = Some(st);
        st
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        self.try_wait().is_some()
    }

    /// Its stdout so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The command line and the last lines of its output, for failure messages.
    pub fn output_tail(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- {} ({})\n--- stdout:\n{}\n--- stderr:\n{}",
            self.name,
            self.cmdline,
            tail(self.stdout_text()),
            tail(self.stderr_text())
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parameters both peers of a migration must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// `multifd-channels`.
    pub channels: u8,
    /// `multifd-compression`: none, zlib or zstd.
    pub compression: &'static str,
    /// `zero-page-detection`: multifd, legacy or none.
    pub zero_page: &'static str,
    /// `multifd-flush-after-each-section=on`.
    pub flush_each_section: bool,
}

impl Params {
    /// Default flushing.
    pub const fn new(channels: u8, compression: &'static str, zero_page: &'static str) -> Self {
        Self {
            channels,
            compression,
            zero_page,
            flush_each_section: false,
        }
    }

    /// Our CLI's flags for these parameters.
    pub fn cli_args(&self) -> Vec<String> {
        let mut v = vec![
            "--channels".into(),
            self.channels.to_string(),
            "--compression".into(),
            self.compression.into(),
            "--zero-page-detection".into(),
            self.zero_page.into(),
        ];
        if self.flush_each_section {
            v.push("--flush-after-each-section".into());
        }
        v
    }

    /// A short label like `4ch-zstd-zp_multifd`.
    pub fn label(&self) -> String {
        format!(
            "{}ch-{}-zp_{}{}",
            self.channels,
            self.compression,
            self.zero_page,
            if self.flush_each_section {
                "-flushsec"
            } else {
                ""
            }
        )
    }
}

/// Writes a deterministic test image (`multifd gen-image`).
pub fn gen_image(ctx: &TestCtx, path: &Path, mib: u64, seed: u64) {
    ctx.run_multifd(
        "gen-image",
        &[
            "gen-image".to_owned(),
            path.display().to_string(),
            "--size".into(),
            format!("{mib}MiB"),
            "--seed".into(),
            seed.to_string(),
        ],
        Duration::from_secs(60),
    );
}

/// Compares two files page by page, ignoring the pages at `skip` offsets.
/// Errors describe the size difference or the differing pages.
pub fn compare_files(a: &Path, b: &Path, skip: &[u64]) -> Result<(), String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("opening {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let la = fa.metadata().map_err(|e| e.to_string())?.len();
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if la != lb {
        return Err(format!(
            "{} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    let chunk = MIB as usize;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut diffs = Vec::new();
    let mut ndiff = 0u64;
    let mut off = 0u64;
    while off < la {
        let n = chunk.min((la - off) as usize);
        fa.read_exact(&mut ba[..n]).map_err(|e| e.to_string())?;
        fb.read_exact(&mut bb[..n]).map_err(|e| e.to_string())?;
        if ba[..n] != bb[..n] {
            for (i, (pa, pb)) in ba[..n]
                .chunks(PAGE as usize)
                .zip(bb[..n].chunks(PAGE as usize))
                .enumerate()
            {
                let page = off + i as u64 * PAGE;
                if pa != pb && !skip.contains(&page) {
                    ndiff += 1;
                    if diffs.len() < 8 {
                        diffs.push(format!("{page:#x}"));
                    }
                }
            }
        }
        off += n as u64;
    }
    if ndiff > 0 {
        return Err(format!(
            "{} and {} differ in {ndiff} page(s), first at {}",
            a.display(),
            b.display(),
            diffs.join(", ")
        ));
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap_or_else(|e| {
        panic!(
            "reading {len} bytes at {offset:#x} of {}: {e}",
            path.display()
        )
    });
    buf
}

/// Size of a file (0 if missing).
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
