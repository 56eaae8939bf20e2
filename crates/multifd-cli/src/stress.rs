//! `multifd stress`: the lifecycle proven by repetition. A scenario is run
//! many times in this process (the engine library, real loopback sockets,
//! real TLS with a PKI made for the run); after every batch the process's
//! threads (`/proc/self/task`) and open descriptors (`/proc/self/fd`) must
//! be back at their baseline.
//!
//! Scenarios:
//! * `reject-anon-client`: a TLS receiver verifying its peers, a sender
//!   without a client certificate; both fail with typed errors in bounded
//!   time (QEMU's "TLS x509 reject anonymous client" test, which crashed its
//!   multifd teardown after thousands of runs).
//! * `faults`: a fault at every transition ([`run::Fault`]), with and
//!   without TLS: both sides end with a typed error within the bound, no
//!   connection is left half-open, the source's RAM is untouched.
//! * `clean`: back-to-back migrations that must succeed byte-identical.
//! * `qemu-reject-anon-client`: a QEMU source without a client certificate
//!   against our verifying receiver.
//!
//! Every run has a seed derived from `--seed` and its number; a failure
//! prints it with the run's parameters, and `--replay SEED` runs exactly
//! that run again.

mod proxy;
mod qemu;
mod run;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use multifd::{TlsClient, TlsServer};

use crate::pki::Pki;
use proxy::Transport;
use run::{End, Env, Fault, Kind, Rng, Spec};

/// The scenario to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// A verifying TLS receiver against a sender without a certificate.
    RejectAnonClient,
    /// A fault at every transition of a migration.
    Faults,
    /// Successful migrations, byte-identical.
    Clean,
    /// A QEMU source without a client certificate against our receiver.
    QemuRejectAnonClient,
}

/// TLS in the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
    Both,
}

/// Transports in the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    Tcp,
    Unix,
    /// Alternate run by run.
    Both,
}

/// Options of `multifd stress`.
#[derive(Args, Debug)]
pub struct StressArgs {
    /// The scenario to repeat.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Runs of each case (a case: one fault point, TLS mode and channel
    /// count), 1-10000000.
    #[arg(long, default_value_t = 100,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..=10_000_000))]
    runs: u64,
    /// TLS on, off, or both (half the cases each).
    #[arg(long, value_enum, default_value = "both")]
    tls: OnOff,
    /// Channel counts, comma-separated (each a case of its own).
    #[arg(long, value_delimiter = ',', default_value = "4",
          value_parser = clap::value_parser!(u8).range(1..))]
    channels: Vec<u8>,
    /// Check threads and descriptors against the baseline after this many
    /// runs.
    #[arg(long, default_value_t = 100,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    check_every: u64,
    /// Seed of the run sequence (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Run only the run with this run seed (printed with a failure), in
    /// each selected case.
    #[arg(long)]
    replay: Option<u64>,
    /// Only these fault points (faults scenario), comma-separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    fault: Vec<Fault>,
    /// Loopback transport.
    #[arg(long, value_enum, default_value = "both")]
    transport: TransportArg,
    /// Source RAM per run, in MiB (plus a 256 KiB second block).
    #[arg(long, default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..=4096))]
    ram_mib: u64,
    /// Longest a side may take to end, in seconds.
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..=600))]
    bound_secs: u64,
    /// Stop at the first failing run.
    #[arg(long)]
    fail_fast: bool,
    /// The QEMU binary (qemu-reject-anon-client).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Threads and descriptors of this process.
struct Census {
    threads: usize,
    fds: BTreeMap<i32, String>,
}

impl Census {
    fn take() -> Self {
        let threads = std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(0);
        let mut fds = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            for e in dir.flatten() {
                let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let target = std::fs::read_link(e.path())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                // The handle of this very listing.
                if target.starts_with("/proc/") && target.ends_with("/fd") {
                    continue;
                }
                fds.insert(n, target);
            }
        }
        Self { threads, fds }
    }

    /// What is above `base` now (after a short grace for threads that are
    /// exiting after their join), or `None`.
    fn leaks_above(base: &Census) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Census::take();
            let extra: Vec<String> = now
                .fds
                .iter()
                .filter(|(n, t)| base.fds.get(n) != Some(t))
                .map(|(n, t)| format!("{n} -> {t}"))
                .collect();
            if now.threads <= base.threads && extra.is_empty() {
                return None;
            }
            if Instant::now() >= deadline {
                return Some(format!(
                    "threads {} (baseline {}), descriptors {} (baseline {}), new: {extra:?}",
                    now.threads,
                    base.threads,
                    now.fds.len(),
                    base.fds.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One case: what is repeated `--runs` times.
#[derive(Debug, Clone, Copy)]
struct Case {
    kind: Kind,
    tls: bool,
    channels: u8,
}

impl Case {
    fn name(&self) -> String {
        let what = match self.kind {
            Kind::RejectAnon => "reject-anon-client".to_owned(),
            Kind::Clean => "clean".to_owned(),
            Kind::Fault(f) => f.name(),
        };
        format!(
            "{what} tls={} channels={}",
            if self.tls { "on" } else { "off" },
            self.channels
        )
    }
}

/// Figures of one case.
#[derive(Default)]
struct Figures {
    runs: u64,
    failed: u64,
    /// Run times in microseconds.
    times: Vec<u64>,
    /// "sender=X receiver=Y" -> count.
    outcomes: BTreeMap<String, u64>,
}

impl Figures {
    fn max_ms(&self) -> f64 {
        self.times.iter().copied().max().unwrap_or(0) as f64 / 1000.0
    }
    fn median_ms(&mut self) -> f64 {
        self.times.sort_unstable();
        self.times.get(self.times.len() / 2).copied().unwrap_or(0) as f64 / 1000.0
    }
}

/// A failing run, as reported.
struct Failure {
    case: String,
    spec: String,
    problems: Vec<String>,
    sender: String,
    receiver: String,
}

/// Ends the process: a run could not be brought to an end (a side still
/// blocked after being cancelled), so its threads cannot be joined.
pub(crate) fn fatal(what: &str) -> ! {
    eprintln!("multifd stress: FATAL: {what}; stopping");
    std::process::exit(3)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

fn cases(a: &StressArgs) -> Vec<Case> {
    let tls_modes: &[bool] = match (a.scenario, a.tls) {
        (Scenario::RejectAnonClient | Scenario::QemuRejectAnonClient, _) => &[true],
        (_, OnOff::On) => &[true],
        (_, OnOff::Off) => &[false],
        (_, OnOff::Both) => &[false, true],
    };
    let kinds: Vec<Kind> = match a.scenario {
        Scenario::RejectAnonClient | Scenario::QemuRejectAnonClient => vec![Kind::RejectAnon],
        Scenario::Clean => vec![Kind::Clean],
        Scenario::Faults => {
            let chosen = if a.fault.is_empty() {
                Fault::all()
            } else {
                a.fault.clone()
            };
            chosen.into_iter().map(Kind::Fault).collect()
        }
    };
    let mut out = Vec::new();
    for &kind in &kinds {
        for &tls in tls_modes {
            if let Kind::Fault(f) = kind
                && !f.applies(tls)
            {
                continue;
            }
            for &channels in &a.channels {
                out.push(Case {
                    kind,
                    tls,
                    channels,
                });
            }
        }
    }
    out
}

/// Runs `multifd stress`.
pub fn run(a: StressArgs) -> Result<()> {
    let seed = a.seed.unwrap_or_else(clock_seed);
    let cases = cases(&a);
    if cases.is_empty() {
        bail!("no case to run (a TLS-only fault with --tls off?)");
    }
    let bound = Duration::from_secs(a.bound_secs);
    let pki = Pki::new()?;
    let env = Env {
        server: TlsServer::x509(&pki.server, true, None)?,
        client: TlsClient::x509(&pki.client, None)?,
        anon: TlsClient::x509(&pki.anon_client, None)?,
        source: run::source_ram(a.ram_mib, seed)?,
        checksum: 0,
        bound,
    };
    let env = Env {
        checksum: run::checksum(&env.source)?,
        ..env
    };
    let runs = if a.replay.is_some() { 1 } else { a.runs };
    let total = runs * cases.len() as u64;
    eprintln!(
        "multifd stress: {:?}, {} case(s) x {runs} run(s) = {total} runs, seed {seed}, checks every {}",
        a.scenario,
        cases.len(),
        a.check_every
    );
    let base = Census::take();
    let started = Instant::now();
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut failed_runs = 0u64;
    let mut leaks: Vec<String> = Vec::new();
    let mut checks = 0u64;
    let mut done = 0u64;
    let mut seeds = Rng::new(seed);
    let mut stop = false;
    'cases: for case in &cases {
        let name = case.name();
        let fig = figures.entry(name.clone()).or_default();
        for i in 0..runs {
            let run_seed = a.replay.unwrap_or_else(|| seeds.next());
            let transport = match a.transport {
                TransportArg::Tcp => Transport::Tcp,
                TransportArg::Unix => Transport::Unix,
                TransportArg::Both if i % 2 == 0 => Transport::Tcp,
                TransportArg::Both => Transport::Unix,
            };
            let spec = Spec {
                kind: case.kind,
                tls: case.tls,
                channels: case.channels,
                transport,
                seed: run_seed,
            };
            let outcome = if a.scenario == Scenario::QemuRejectAnonClient {
                qemu::reject_anon(&env, &pki, &a.qemu, spec)?
            } else {
                run::run(&env, spec)?
            };
            fig.runs += 1;
            fig.times.push(outcome.took.as_micros() as u64);
            *fig.outcomes
                .entry(format!(
                    "sender={} receiver={}",
                    outcome.sender.label(),
                    outcome.receiver.label()
                ))
                .or_default() += 1;
            if !outcome.problems.is_empty() {
                fig.failed += 1;
                failed_runs += 1;
                let detail = |e: &End| match e {
                    End::Err { message, .. } => message.clone(),
                    other => other.label(),
                };
                let f = Failure {
                    case: name.clone(),
                    spec: run::describe(&spec),
                    problems: outcome.problems.clone(),
                    sender: detail(&outcome.sender),
                    receiver: detail(&outcome.receiver),
                };
                eprintln!(
                    "FAILED run {i} of {}: {}\n  {}\n  sender: {}\n  receiver: {}",
                    f.case,
                    f.spec,
                    f.problems.join("; "),
                    f.sender,
                    f.receiver
                );
                if failures.len() < 50 {
                    failures.push(f);
                }
                if a.fail_fast {
                    stop = true;
                }
            }
            if outcome.fatal {
                eprintln!("multifd stress: a run could not be ended; stopping");
                stop = true;
            }
            done += 1;
            if done.is_multiple_of(a.check_every) || done == total || stop {
                checks += 1;
                if let Some(l) = Census::leaks_above(&base) {
                    eprintln!("LEAK after {done} runs: {l}");
                    leaks.push(format!("after {done} runs: {l}"));
                    stop |= a.fail_fast;
                }
                eprintln!(
                    "  {done}/{total} runs, {failed_runs} failed, {} leak(s), {:.0} s",
                    leaks.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            if stop {
                break 'cases;
            }
        }
    }
    let elapsed = started.elapsed();
    report(
        &a,
        seed,
        done,
        elapsed,
        &mut figures,
        &failures,
        failed_runs,
        &leaks,
        checks,
    )?;
    if failed_runs > 0 || !leaks.is_empty() || done < total {
        bail!(
            "{failed_runs} failed run(s), {} leak(s), {done} of {total} runs done (seed {seed})",
            leaks.len()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &StressArgs,
    seed: u64,
    done: u64,
    elapsed: Duration,
    figures: &mut BTreeMap<String, Figures>,
    failures: &[Failure],
    failed_runs: u64,
    leaks: &[String],
    checks: u64,
) -> Result<()> {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    if a.json {
        let cases: Vec<serde_json::Value> = figures
            .iter_mut()
            .map(|(name, f)| {
                serde_json::json!({
                    "case": name,
                    "runs": f.runs,
                    "failed": f.failed,
                    "median_ms": f.median_ms(),
                    "max_ms": f.max_ms(),
                    "outcomes": f.outcomes,
                })
            })
            .collect();
        let failures: Vec<serde_json::Value> = failures
            .iter()
            .map(|f| {
                serde_json::json!({
                    "case": f.case, "run": f.spec, "problems": f.problems,
                    "sender": f.sender, "receiver": f.receiver,
                })
            })
            .collect();
        let v = serde_json::json!({
            "scenario": format!("{:?}", a.scenario),
            "seed": seed,
            "runs": done,
            "failed": failed_runs,
            "seconds": elapsed.as_secs_f64(),
            "runs_per_second": rate,
            "leak_checks": checks,
            "leaks": leaks,
            "cases": cases,
            "failures": failures,
        });
        println!("{}", serde_json::to_string(&v).context("summary as JSON")?);
        return Ok(());
    }
    println!(
        "{done} runs in {:.1} s ({rate:.1} runs/s), seed {seed}: {failed_runs} failed, \
         {} leak(s) in {checks} checks of threads and descriptors",
        elapsed.as_secs_f64(),
        leaks.len()
    );
    for (name, f) in figures.iter_mut() {
        let median = f.median_ms();
        println!(
            "{name}: {} runs, {} failed, median {median:.1} ms, max {:.1} ms",
            f.runs,
            f.failed,
            f.max_ms()
        );
        for (outcome, n) in &f.outcomes {
            println!("    {n:>7}  {outcome}");
        }
    }
    for l in leaks {
        println!("LEAK {l}");
    }
    for f in failures {
        println!("FAILED {}: {} ({})", f.case, f.spec, f.problems.join("; "));
    }
    Ok(())
}
