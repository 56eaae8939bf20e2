//! QEMU processes driven over QMP.
//!
//! Every QMP read and write has a timeout: a QEMU destination blocked in its
//! multifd sync barrier stops answering QMP, and after a channel error it
//! may hang until SIGKILL. Replies are matched by `id`, so a reply that
//! arrives after its command timed out is skipped, not taken for the next.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Params, Proc, TestCtx, accel, qemu_binary};

/// Why a QMP command did not return a value.
#[derive(Debug)]
pub enum QmpError {
    /// QEMU answered with an error.
    Command {
        /// `class`.
        class: String,
        /// `desc`.
        desc: String,
    },
    /// No answer within the I/O timeout (QEMU busy, e.g. in a sync barrier).
    Timeout,
    /// The connection closed or broke (QEMU exited?).
    Closed(String),
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Command { class, desc } => write!(f, "QMP error {class}: {desc}"),
            Self::Timeout => f.write_str("QMP timeout"),
            Self::Closed(why) => write!(f, "QMP connection closed: {why}"),
        }
    }
}

/// A QMP client over a unix socket.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    partial: Vec<u8>,
    next_id: u64,
    /// Asynchronous events seen so far.
    pub events: Vec<Value>,
    /// Default I/O timeout.
    pub io_timeout: Duration,
}

impl Qmp {
    /// Connects (retrying while the socket does not exist yet or refuses,
    /// as long as `alive()` says QEMU still runs), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if !alive() {
                        return Err(format!("QEMU exited before its QMP socket accepted ({e})"));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("connecting to {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let io_timeout = Duration::from_secs(10);
        stream
            .set_write_timeout(Some(io_timeout))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            next_id: 1,
            events: Vec::new(),
            io_timeout,
        };
        let greeting = qmp
            .read_message(io_timeout)
            .map_err(|e| format!("QMP greeting: {e}"))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))
            .map_err(|e| e.to_string())?;
        Ok(qmp)
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| QmpError::Closed(e.to_string()))?;
            // A partial line survives a timeout in `self.partial`.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(QmpError::Closed("EOF".into())),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    return serde_json::from_slice(&line).map_err(|e| {
                        QmpError::Closed(format!(
                            "bad JSON {:?}: {e}",
                            String::from_utf8_lossy(&line)
                        ))
                    });
                }
                Ok(_) => return Err(QmpError::Closed("EOF inside a message".into())),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(QmpError::Closed(e.to_string())),
            }
        }
    }

    /// Runs a command with the default I/O timeout.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_timeout(name, args, self.io_timeout)
    }

    /// Runs a command; waits at most `timeout` for its reply.
    pub fn execute_timeout(
        &mut self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": name, "id": id});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => QmpError::Timeout,
                _ => QmpError::Closed(e.to_string()),
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.read_message(left)?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // the late reply of a command that timed out
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    class: e["class"].as_str().unwrap_or("").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("").to_owned(),
                });
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// How a QEMU is set up.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Name for logs and files.
    pub name: String,
    /// `none` or `q35` (or any machine type); `memory-backend=m0` is added.
    pub machine: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The `memory-backend-file` of block `m0` (shared: readable from outside).
    pub ram_file: PathBuf,
    /// Start with `-incoming defer`.
    pub incoming: bool,
    /// `-uuid`.
    pub uuid: Option<String>,
    /// `-global migration.multifd-flush-after-each-section=on`.
    pub flush_each_section: bool,
    /// Start paused (`-S`); a destination always gets it.
    pub paused: bool,
    /// Anything else (drives, serial ports, ...).
    pub extra: Vec<String>,
}

impl QemuConfig {
    /// A paused `-M none` guest of `mem_mib` MiB in `ram_file`.
    pub fn new(name: &str, machine: &str, mem_mib: u64, ram_file: &Path) -> Self {
        Self {
            name: name.to_owned(),
            machine: machine.to_owned(),
            mem_mib,
            ram_file: ram_file.to_owned(),
            incoming: false,
            uuid: None,
            flush_each_section: false,
            paused: true,
            extra: Vec::new(),
        }
    }

    /// The same guest as a destination with another RAM file.
    pub fn as_destination(&self, name: &str, ram_file: &Path) -> Self {
        Self {
            name: name.to_owned(),
            ram_file: ram_file.to_owned(),
            incoming: true,
            ..self.clone()
        }
    }

    /// The full argument list.
    pub fn args(&self, qmp: &Path) -> Vec<String> {
        let m = self.mem_mib;
        let mut a: Vec<String> = vec![
            "-accel".into(),
            accel().into(),
            "-M".into(),
            format!("{},memory-backend=m0", self.machine),
            "-m".into(),
            format!("{m}M"),
            "-object".into(),
            format!(
                "memory-backend-file,id=m0,size={m}M,mem-path={},share=on",
                self.ram_file.display()
            ),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ];
        if self.paused || self.incoming {
            a.push("-S".into());
        }
        if let Some(u) = &self.uuid {
            a.extend(["-uuid".into(), u.clone()]);
        }
        if self.flush_each_section {
            a.extend([
                "-global".into(),
                "migration.multifd-flush-after-each-section=on".into(),
            ]);
        }
        a.extend(self.extra.iter().cloned());
        if self.incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a
    }
}

/// How a migration ended, as seen by one QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigEnd {
    /// `completed`.
    Completed,
    /// `failed` (with `error-desc`), or `cancelled`.
    Failed(String),
    /// QEMU exited (e.g. a destination with `exit-on-error`).
    Exited(String),
    /// Still not finished at the deadline; last status seen.
    TimedOut(String),
}

/// A running QEMU with its QMP connection.
pub struct Qemu {
    /// The process (killed in Drop).
    pub proc: Proc,
    /// Its QMP monitor.
    pub qmp: Qmp,
    /// How it was started.
    pub config: QemuConfig,
}

impl Qemu {
    /// Starts QEMU and connects to its QMP socket.
    pub fn start(ctx: &TestCtx, config: QemuConfig) -> Self {
        let qmp_path = ctx.path(&format!("{}.qmp", config.name));
        let mut cmd = Command::new(qemu_binary());
        cmd.args(config.args(&qmp_path));
        let mut proc = ctx.spawn(&config.name, cmd);
        let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(30), || !proc.exited()) {
            Ok(q) => q,
            Err(e) => panic!(
                "[{}] QEMU {}: {e}\n{}",
                ctx.name,
                config.name,
                proc.output_tail()
            ),
        };
        Self { proc, qmp, config }
    }

    /// Runs a QMP command that must succeed.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        match self.qmp.execute(name, args.clone()) {
            Ok(v) => v,
            Err(e) => panic!(
                "QEMU {}: {name} {args}: {e}\n{}",
                self.config.name,
                self.proc.output_tail()
            ),
        }
    }

    /// Runs a QMP command.
    pub fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        self.qmp.execute(name, args)
    }

    /// Turns on multifd with `p` (capability, channels, compression,
    /// zero-page detection) and, on a source, unlimited bandwidth.
    pub fn set_multifd(&mut self, p: &Params) {
        self.set_multifd_caps(p, &[]);
    }

    /// [`Self::set_multifd`] plus extra capabilities.
    pub fn set_multifd_caps(&mut self, p: &Params, extra_caps: &[&str]) {
        let mut caps = vec![json!({"capability": "multifd", "state": true})];
        caps.extend(
            extra_caps
                .iter()
                .map(|c| json!({"capability": c, "state": true})),
        );
        self.cmd("migrate-set-capabilities", json!({ "capabilities": caps }));
        let mut params = json!({
            "multifd-channels": p.channels,
            "multifd-compression": p.compression,
            "zero-page-detection": p.zero_page,
        });
        if !self.config.incoming {
            // The default of 128 MiB/s throttles a source.
            params["max-bandwidth"] = json!(100u64 << 30);
        }
        self.cmd("migrate-set-parameters", params);
    }

    /// Migrates over TLS with the credentials in `dir` (QEMU's directory
    /// layout): `tls-creds-x509` (`psk: false`; `verify_peer` on a
    /// destination) or `tls-creds-psk` (username `qemu` on a source); the
    /// endpoint follows the role. `hostname` is a source's `tls-hostname`,
    /// `authz` a destination's accepted client name (`authz-simple`).
    pub fn set_tls(
        &mut self,
        psk: bool,
        dir: &Path,
        verify_peer: bool,
        hostname: Option<&str>,
        authz: Option<&str>,
    ) {
        let server = self.config.incoming;
        let mut creds = json!({
            "qom-type": if psk { "tls-creds-psk" } else { "tls-creds-x509" },
            "id": "tls0",
            "dir": dir.display().to_string(),
            "endpoint": if server { "server" } else { "client" },
        });
        if !psk {
            creds["verify-peer"] = json!(verify_peer);
        } else if !server {
            creds["username"] = json!("qemu");
        }
        self.cmd("object-add", creds);
        let mut params = json!({"tls-creds": "tls0"});
        if let Some(h) = hostname {
            params["tls-hostname"] = json!(h);
        }
        if let Some(identity) = authz {
            self.cmd(
                "object-add",
                json!({"qom-type": "authz-simple", "id": "authz0", "identity": identity}),
            );
            params["tls-authz"] = json!("authz0");
        }
        self.cmd("migrate-set-parameters", params);
    }

    /// `migrate-incoming` on 127.0.0.1, on a port QEMU picks; returns it.
    pub fn migrate_incoming(&mut self) -> u16 {
        self.cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
        let info = self.cmd("query-migrate", json!({}));
        let port = info["socket-address"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|sa| match &sa["port"] {
                Value::String(p) => p.parse::<u16>().ok(),
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                _ => None,
            })
            .filter(|&p| p != 0);
        port.unwrap_or_else(|| panic!("QEMU {}: no listening port in {info}", self.config.name))
    }

    /// `migrate` to 127.0.0.1:port.
    pub fn migrate(&mut self, port: u16) {
        self.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    }

    /// Polls `query-migrate` until a final state, QEMU's exit, or `timeout`.
    /// QMP timeouts (a destination in its sync barrier) count as "busy".
    pub fn wait_migration(&mut self, timeout: Duration) -> MigEnd {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("(no answer)");
        loop {
            if let Some(st) = self.proc.try_wait() {
                return MigEnd::Exited(format!("{st}; last status {last}"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return MigEnd::TimedOut(last);
            }
            match self.qmp.execute_timeout(
                "query-migrate",
                json!({}),
                left.min(Duration::from_secs(2)),
            ) {
                Ok(v) => {
                    let status = v["status"].as_str().unwrap_or("none").to_owned();
                    match status.as_str() {
                        "completed" => return MigEnd::Completed,
                        "failed" | "cancelled" => {
                            let desc = v["error-desc"].as_str().unwrap_or("").to_owned();
                            return MigEnd::Failed(format!("{status}: {desc}"));
                        }
                        _ => last = status,
                    }
                }
                Err(QmpError::Timeout) => last = "(QMP busy)".into(),
                Err(QmpError::Closed(e)) => {
                    // QEMU is exiting: give it a moment to be reaped.
                    let st = self.proc.wait_timeout(Duration::from_secs(5));
                    return MigEnd::Exited(format!(
                        "{}; QMP {e}; last status {last}",
                        st.map_or("still running".into(), |s: ExitStatus| s.to_string())
                    ));
                }
                Err(e @ QmpError::Command { .. }) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Self::wait_migration`] that must end `completed`.
    pub fn expect_completed(&mut self, timeout: Duration) {
        let end = self.wait_migration(timeout);
        assert_eq!(
            end,
            MigEnd::Completed,
            "QEMU {} migration did not complete\n{}",
            self.config.name,
            self.proc.output_tail()
        );
    }

    /// The `-serial`/stderr log and command line, for failure messages.
    pub fn log(&self) -> String {
        self.proc.output_tail()
    }
}
