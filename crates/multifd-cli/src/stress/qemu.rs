//! QEMU as the sender: a QEMU source with `tls-creds-x509` and no client
//! certificate migrates (multifd) to our receiver, which verifies its
//! peers. QEMU must report a failed migration, our receiver a TLS error,
//! both within the bound; QEMU is then told to quit (and killed, by its
//! PID, if it does not).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use multifd::{Error, GuestRam, Listener, MigrationConfig, Progress, RamBlock, RamProvider};
use multifd::{RamBlockInfo, ReceiveOptions};
use serde_json::{Value, json};

use super::run::{End, Env, Outcome, Spec, message, variant};
use crate::pki::Pki;

struct AnonRam;

impl RamProvider for AnonRam {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
        }
        Ok(ram)
    }
}

/// QMP over a QEMU's standard input and output.
struct Qmp<'a> {
    stdin: &'a mut ChildStdin,
    lines: &'a mpsc::Receiver<String>,
    next_id: u64,
}

impl Qmp<'_> {
    /// Runs `cmd`; waits at most `limit` for its answer.
    fn execute(&mut self, cmd: &str, args: Value, limit: Duration) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": cmd, "id": id});
        if !args.is_null() {
            msg["arguments"] = args;
        }
        writeln!(self.stdin, "{msg}").with_context(|| format!("QMP {cmd}: writing"))?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("QMP {cmd}: no answer"))?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// Waits for `child` to exit, at most `limit`; kills it (by its PID) if
/// it does not.
fn reap(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A short label of QEMU's error description for the tally.
fn qemu_label(desc: &str) -> String {
    let d = desc.to_lowercase();
    let what = if d.contains("broken pipe") {
        "BrokenPipe"
    } else if d.contains("reset") {
        "ConnectionReset"
    } else if d.contains("tls") || d.contains("certificate") || d.contains("handshake") {
        "TLS"
    } else {
        "other"
    };
    format!("QemuFailed({what})")
}

/// One QEMU → us run.
pub fn reject_anon(env: &Env, pki: &Pki, qemu: &Path, spec: Spec) -> Result<Outcome> {
    let started = Instant::now();
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
    let port = match listener.local_uri()? {
        multifd::Uri::Tcp { port, .. } => port,
        multifd::Uri::Unix(_) => bail!("a TCP listener has a port"),
    };
    let ropts = ReceiveOptions {
        config: MigrationConfig {
            channels: spec.channels,
            ..MigrationConfig::default()
        },
        accept_timeout: Some(Duration::from_secs(20)),
        tls: Some(env.server.clone()),
        ..ReceiveOptions::default()
    };
    let mut child = Command::new(qemu)
        .args([
            "-machine",
            "none,memory-backend=m0",
            "-m",
            "32M",
            "-object",
            "memory-backend-ram,id=m0,size=32M",
            "-display",
            "none",
            "-nodefaults",
            "-S",
            "-qmp",
            "stdio",
            "-object",
        ])
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.anon_client.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        reap(&mut child, Duration::ZERO);
        bail!("QEMU's standard streams");
    };
    let (ltx, lrx) = mpsc::channel::<String>();
    let (rtx, rrx) = mpsc::channel();
    let result = std::thread::scope(|s| -> Result<Outcome> {
        let reader = std::thread::Builder::new()
            .name("stress-qmp".into())
            .spawn_scoped(s, move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if ltx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let recv = std::thread::Builder::new()
            .name("stress-recv".into())
            .spawn_scoped(s, || {
                let t = Instant::now();
                let r = multifd::receive(&listener, &ropts, &mut AnonRam, &Progress::default());
                let _ = rtx.send((r.map(|_| ()), t.elapsed()));
            })?;
        let mut qmp = Qmp {
            stdin: &mut stdin,
            lines: &lrx,
            next_id: 1,
        };
        let io = Duration::from_secs(10);
        let mut problems = Vec::new();
        // The greeting comes first; commands are matched by id anyway.
        let driven = (|| -> Result<(String, Duration)> {
            qmp.execute("qmp_capabilities", Value::Null, io)?;
            qmp.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": true}]}),
                io,
            )?;
            qmp.execute(
                "migrate-set-parameters",
                json!({"multifd-channels": spec.channels, "tls-creds": "tls0"}),
                io,
            )?;
            let t = Instant::now();
            qmp.execute(
                "migrate",
                json!({"uri": format!("tcp:127.0.0.1:{port}")}),
                io,
            )?;
            let deadline = t + env.bound;
            loop {
                let v = qmp.execute("query-migrate", Value::Null, io)?;
                let status = v["status"].as_str().unwrap_or("").to_owned();
                match status.as_str() {
                    "failed" | "cancelled" | "completed" => {
                        let desc = v["error-desc"].as_str().unwrap_or("").to_owned();
                        return Ok((format!("{status}: {desc}"), t.elapsed()));
                    }
                    _ if Instant::now() >= deadline => {
                        return Ok((format!("still {status}"), t.elapsed()));
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })();
        let sender = match &driven {
            Ok((status, took)) if status.starts_with("failed") => {
                if *took > env.bound {
                    problems.push(format!("QEMU failed only after {took:?}"));
                }
                End::Err {
                    variant: qemu_label(status),
                    message: status.clone(),
                }
            }
            Ok((status, _)) => {
                problems.push(format!("QEMU: {status}"));
                End::Err {
                    variant: "QemuNotFailed".into(),
                    message: status.clone(),
                }
            }
            Err(e) => {
                problems.push(format!("driving QEMU: {e:#}"));
                End::Hung
            }
        };
        let _ = qmp.execute("quit", Value::Null, Duration::from_secs(2));
        drop(stdin);
        if !reap(&mut child, Duration::from_secs(5)) {
            problems.push("QEMU did not quit; killed".into());
        }
        let receiver = match rrx.recv_timeout(env.bound) {
            Ok((Ok(()), _)) => {
                problems.push("our receiver accepted an anonymous QEMU client".into());
                End::Ok
            }
            Ok((Err(e), took)) => {
                if !matches!(e, Error::Tls { .. }) {
                    problems.push(format!("receiver: not a TLS error: {}", message(&e)));
                }
                if took > env.bound + Duration::from_secs(2) {
                    problems.push(format!("receiver took {took:?}"));
                }
                End::Err {
                    variant: variant(&e),
                    message: message(&e),
                }
            }
            Err(_) => {
                // Unblock it: nothing else would.
                problems.push("our receiver did not return".into());
                End::Hung
            }
        };
        let hung = matches!(receiver, End::Hung);
        if hung && rrx.recv_timeout(Duration::from_secs(30)).is_err() {
            super::fatal(&format!(
                "QEMU run {}: our receiver still runs 30 s after the bound",
                spec.seed
            ));
        }
        let _ = recv.join();
        let _ = reader.join();
        Ok(Outcome {
            sender,
            receiver,
            took: Duration::ZERO,
            problems,
            fatal: false,
        })
    });
    let mut outcome = result?;
    if let Some(mut e) = child.stderr.take() {
        let mut text = String::new();
        let _ = e.read_to_string(&mut text);
        if !outcome.problems.is_empty() && !text.is_empty() {
            outcome
                .problems
                .push(format!("QEMU stderr: {}", text.trim()));
        }
    }
    outcome.took = started.elapsed();
    Ok(outcome)
}
