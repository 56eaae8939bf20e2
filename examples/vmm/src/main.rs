//! `multifd-vmm`: runs a boot sector (the live-migration test guest) under
//! KVM (or the workload guest without KVM), counts its serial markers,
//! optionally reports dirty pages, and migrates it live: `--migrate-to URI`
//! on the source, `--incoming URI` on the destination (both in one
//! process: receive, run, migrate on). Events are JSON lines on stdout.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use multifd::{
    AutoConverge, DowntimeRamp, Listener, MigrationConfig, Progress, ReceiveOptions, SourceOptions,
    StreamPlan, Uri,
};
use multifd_example_vmm::migration::{
    IncomingMachine, check_running, expect_progress, migrate_out, resume_incoming, unix_ns,
};
use multifd_example_vmm::{
    DirtyTracking, EntryMode, Machine, RunState, SoftVm, Vm, VmConfig, no_kvm_forced,
};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Dirty {
    Auto,
    Ring,
    Bitmap,
    Uffd,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EntryArg {
    Auto,
    Real,
    Protected,
}

/// Runs a 512-byte boot sector under KVM without a BIOS.
#[derive(Debug, Clone, Parser)]
#[command(version)]
struct Args {
    /// The boot sector: a 512-byte image, or a .asm file assembled with
    /// `nasm -f bin` (e.g. guest/loop.asm). Not needed with --incoming or
    /// the workload guest.
    #[arg(long)]
    boot: Option<PathBuf>,
    /// Wait for a migration on this URI (tcp:HOST:PORT, unix:PATH) and
    /// resume the guest it brings.
    #[arg(long)]
    incoming: Option<String>,
    /// Migrate the running guest live to this URI (after --migrate-after).
    #[arg(long)]
    migrate_to: Option<String>,
    /// Seconds the guest runs (here) before --migrate-to starts.
    #[arg(long, default_value_t = 1.0)]
    migrate_after: f64,
    /// Multifd channels.
    #[arg(long, default_value_t = 4)]
    channels: u8,
    /// Downtime limit of the switchover, milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit_ms: u64,
    /// Bandwidth limit over all channels, bytes per second.
    #[arg(long)]
    max_bandwidth: Option<u64>,
    /// Throttle the vCPU when rounds stop shrinking (QEMU's auto-converge:
    /// 20% first, then +10%, at most 99%).
    #[arg(long)]
    auto_converge: bool,
    /// Raise the downtime limit by STEP ms each time rounds stop shrinking,
    /// up to MAX ms: `--downtime-ramp STEP,MAX`.
    #[arg(long, value_parser = parse_ramp)]
    downtime_ramp: Option<DowntimeRamp>,
    /// Most rounds before giving up ("not converging").
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Most seconds before giving up ("not converging").
    #[arg(long)]
    max_time_secs: Option<f64>,
    /// With --incoming: check the guest's counters against its markers
    /// before it resumes (inside the downtime; after it resumes they are
    /// checked anyway, with a short pause of their own).
    #[arg(long)]
    verify_before_resume: bool,
    /// Run the workload guest (a thread over guest RAM, write-protect
    /// dirty tracking) instead of KVM; also MULTIFD_VMM_NO_KVM=1.
    #[arg(long)]
    no_kvm: bool,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    mem: u64,
    /// Back guest RAM with this file (MAP_SHARED), like a QEMU
    /// memory-backend-file.
    #[arg(long)]
    mem_file: Option<PathBuf>,
    /// Run this long, then print the marker count and exit (default: until
    /// killed, or until --pause-after-markers).
    #[arg(long)]
    run_secs: Option<f64>,
    /// Pause the vCPU after this many markers, print the marker count and
    /// exit.
    #[arg(long)]
    pause_after_markers: Option<u64>,
    /// Dirty-page tracking.
    #[arg(long, value_enum, default_value = "auto")]
    dirty: Dirty,
    /// Entries of the dirty ring (power of two).
    #[arg(long, default_value_t = 65536)]
    ring_entries: u32,
    /// Collect and print dirty pages every this many milliseconds.
    #[arg(long)]
    dirty_every_ms: Option<u64>,
    /// How the vCPU starts.
    #[arg(long, value_enum, default_value = "auto")]
    entry: EntryArg,
    /// Echo the guest's serial output.
    #[arg(long)]
    echo: bool,
    /// Extra `-D` definitions for nasm (e.g. START=0x1000000).
    #[arg(long = "define", short = 'D')]
    defines: Vec<String>,
}

fn boot_image(args: &Args) -> Result<Vec<u8>> {
    let boot = args
        .boot
        .as_ref()
        .context("--boot is needed to start a guest")?;
    if boot.extension().is_some_and(|e| e == "asm") {
        let out = std::env::temp_dir().join(format!("multifd-vmm-{}.img", std::process::id()));
        let mut cmd = Command::new("nasm");
        cmd.args(["-f", "bin"]);
        for d in &args.defines {
            cmd.arg(format!("-D{d}"));
        }
        let st = cmd
            .arg("-o")
            .arg(&out)
            .arg(boot)
            .status()
            .context("running nasm")?;
        ensure!(st.success(), "nasm failed: {st}");
        let img = std::fs::read(&out)?;
        let _ = std::fs::remove_file(&out);
        Ok(img)
    } else {
        std::fs::read(boot).with_context(|| format!("reading {}", boot.display()))
    }
}

fn parse_ramp(s: &str) -> std::result::Result<DowntimeRamp, String> {
    let (step, max) = s.split_once(',').ok_or("expected STEP_MS,MAX_MS")?;
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("{v:?}: {e}"))
    };
    Ok(DowntimeRamp {
        step: ms(step)?,
        max: ms(max)?,
    })
}

/// A `-D NAME=VALUE` define as a number (decimal or 0x hex).
fn define(args: &Args, name: &str, default: u64) -> Result<u64> {
    for d in &args.defines {
        if let Some(v) = d.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            let v = v.trim();
            return match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            }
            .with_context(|| format!("-D {d}"));
        }
    }
    Ok(default)
}

/// The range the guest increments (guest/loop.asm's START and END).
fn guest_range(args: &Args) -> Result<(u64, u64)> {
    Ok((
        define(args, "START", 0x100_0000)?,
        define(args, "END", 0x300_0000)?,
    ))
}

fn vm_config(args: &Args, mem_size: u64) -> VmConfig {
    VmConfig {
        mem_size,
        mem_file: args.mem_file.clone(),
        dirty: match args.dirty {
            Dirty::Auto => DirtyTracking::Auto,
            Dirty::Ring => DirtyTracking::Ring,
            Dirty::Bitmap => DirtyTracking::Bitmap,
            Dirty::Uffd => DirtyTracking::WriteProtect,
            Dirty::None => DirtyTracking::None,
        },
        ring_entries: args.ring_entries,
        echo_serial: args.echo,
        pause_after_markers: args.pause_after_markers,
    }
}

/// A stopped machine with `mem_size` bytes of RAM.
fn new_machine(args: &Args, mem_size: u64) -> Result<Machine> {
    if args.no_kvm || no_kvm_forced() {
        let (start, end) = guest_range(args)?;
        return Ok(Machine::Soft(SoftVm::new(mem_size, start, end, true)?));
    }
    Ok(Machine::Kvm(Vm::new(&vm_config(args, mem_size))?))
}

fn now_ns() -> u128 {
    unix_ns(SystemTime::now())
}

/// One JSON object on a line of stdout (what scripts read).
fn event(v: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn source_options(args: &Args) -> SourceOptions {
    SourceOptions {
        config: MigrationConfig {
            channels: args.channels,
            ..MigrationConfig::default()
        },
        plan: StreamPlan {
            machine: "multifd-vmm".into(),
            ..StreamPlan::default()
        },
        downtime_limit: Duration::from_millis(args.downtime_limit_ms),
        max_rounds: args.max_rounds,
        max_time: args.max_time_secs.map(Duration::from_secs_f64),
        max_bandwidth: args.max_bandwidth,
        auto_converge: args.auto_converge.then(AutoConverge::default),
        downtime_ramp: args.downtime_ramp,
        ..SourceOptions::default()
    }
}

/// Receives a guest on `uri`, checks it and starts it.
fn incoming(args: &Args, uri: &str) -> Result<Machine> {
    let uri: Uri = uri.parse().context("--incoming URI")?;
    let listener = Listener::bind(&uri).context("listening")?;
    event(serde_json::json!({"event": "listening", "uri": listener.local_uri()?.to_string()}));
    let opts = ReceiveOptions {
        config: MigrationConfig {
            channels: args.channels,
            ..MigrationConfig::default()
        },
        ..ReceiveOptions::default()
    };
    let owned = args.clone();
    let mut provider = IncomingMachine::new(move |size| new_machine(&owned, size));
    let progress = Progress::default();
    let inc = multifd::receive(&listener, &opts, &mut provider, &progress)
        .context("receiving the migration")?;
    let received = SystemTime::now();
    let mut machine = provider.machine.take().context("no RAM was announced")?;
    let range = guest_range(args)?;
    let resumed = resume_incoming(
        &mut machine,
        &inc,
        args.verify_before_resume.then_some(range),
    )?;
    let received_ns = now_ns();
    event(serde_json::json!({
        "event": "resumed",
        "resumed_unix_ns": unix_ns(resumed.at).to_string(),
        "received_unix_ns": unix_ns(received).to_string(),
        "reported_unix_ns": received_ns.to_string(),
        "machine": machine.kind(),
        "dirty": machine.dirty_kind(),
        "mem_mib": machine.mem_size() >> 20,
        "markers": resumed.markers,
        "counters_before_resume": resumed.counters.map(|c| format!("{c:?}")),
        "bytes": inc.stats.bytes,
        "rounds": inc.stats.rounds,
    }));
    // The guest must go on from where it was.
    let m = expect_progress(&machine, 3, Duration::from_secs(10))?;
    let c = check_running(&machine, range.0, range.1)?;
    event(serde_json::json!({
        "event": "running",
        "markers": m,
        "counters_checked": format!("{c:?}"),
    }));
    Ok(machine)
}

/// Migrates the running `machine` to `uri`. Ok(true): migrated.
fn migrate_to(args: &Args, machine: &mut Machine, uri: &str) -> Result<bool> {
    let uri: Uri = uri.parse().context("--migrate-to URI")?;
    let mut log = machine
        .take_dirty_log()
        .context("the VM has no dirty tracking (--dirty none?)")?;
    let opts = source_options(args);
    let progress = Progress::default();
    let t0 = SystemTime::now();
    let (r, paused, resumed) = migrate_out(machine, log.as_mut(), &uri, &opts, &progress);
    let info = progress.query();
    match r {
        Ok(stats) => {
            event(serde_json::json!({
                "event": "migrated",
                "started_unix_ns": unix_ns(t0).to_string(),
                "paused_unix_ns": paused.map(|p| unix_ns(p).to_string()),
                "downtime_us": progress.downtime().map(|d| d.as_micros() as u64),
                "total_time_ms": info.total_time,
                "setup_time_ms": info.setup_time,
                "expected_downtime_ms": info.expected_downtime,
                "transferred": stats.bytes,
                "rounds": stats.rounds,
                "dirty_sync_count": info.dirty_sync_count,
                "throughput_mib_s": stats.throughput_mib_s,
                "cpu_throttle_percentage": info.cpu_throttle_percentage,
                "downtime_limit_ms": info.downtime_limit,
                "duration_s": stats.duration_s,
                "dirty": machine.dirty_kind(),
                "machine": machine.kind(),
            }));
            Ok(true)
        }
        Err(e) => {
            let before = machine.markers();
            let running = machine.wait_markers(before + 2, Duration::from_secs(5));
            event(serde_json::json!({
                "event": "migration-failed",
                "error": format!("{:#}", anyhow::Error::from(e)),
                "status": info.status,
                "rounds": info.rounds,
                "paused_unix_ns": paused.map(|p| unix_ns(p).to_string()),
                "resumed_unix_ns": resumed.map(|p| unix_ns(p).to_string()),
                "guest_running": running,
                "markers": machine.markers(),
            }));
            Ok(false)
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut machine = match &args.incoming {
        Some(uri) => incoming(&args, uri)?,
        None => {
            let mut machine = new_machine(&args, args.mem << 20)?;
            if let Machine::Kvm(vm) = &machine {
                let image = boot_image(&args)?;
                let entry = vm.load_boot_sector(
                    &image,
                    match args.entry {
                        EntryArg::Auto => EntryMode::Auto,
                        EntryArg::Real => EntryMode::Real,
                        EntryArg::Protected => EntryMode::Protected,
                    },
                )?;
                tracing::info!(?entry, "boot sector loaded");
            }
            tracing::info!(
                machine = machine.kind(),
                dirty = machine.dirty_kind(),
                mem_mib = args.mem,
                "starting"
            );
            machine.start()?;
            machine
        }
    };
    if let Some(uri) = &args.migrate_to {
        let deadline = Instant::now() + Duration::from_secs_f64(args.migrate_after);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            if let RunState::Exited(m) = machine.run_state() {
                bail!("vCPU exited: {}", m.unwrap_or_default());
            }
        }
        let ok = migrate_to(&args, &mut machine, uri)?;
        machine.shutdown()?;
        if !ok {
            std::process::exit(2);
        }
        return Ok(());
    }
    run(&args, machine)
}

/// Runs the guest (`--run-secs`, `--pause-after-markers`, or until
/// killed), printing dirty pages when asked.
fn run(args: &Args, mut machine: Machine) -> Result<()> {
    let mut dirty = machine.take_dirty_log();
    let t0 = Instant::now();
    let deadline = args.run_secs.map(|s| t0 + Duration::from_secs_f64(s));
    let tick = Duration::from_millis(args.dirty_every_ms.unwrap_or(100));
    let mut last_markers = 0;
    loop {
        std::thread::sleep(tick);
        if let RunState::Exited(m) = machine.run_state() {
            bail!("vCPU exited: {}", m.unwrap_or_default());
        }
        if args.dirty_every_ms.is_some()
            && let Some(d) = dirty.as_mut()
        {
            let c = Instant::now();
            let pages = d.collect_dirty()?;
            let m = machine.markers();
            println!(
                "t={:.3}s markers={m} (+{}) dirty_pages={} collect={:.1}us",
                t0.elapsed().as_secs_f64(),
                m - last_markers,
                pages.len(),
                c.elapsed().as_secs_f64() * 1e6
            );
            last_markers = m;
        }
        if machine.run_state() == RunState::Paused {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            machine.pause()?;
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let markers = machine.markers();
    let ring_full = match &machine {
        Machine::Kvm(vm) => vm.ring_full_exits(),
        Machine::Soft(_) => 0,
    };
    println!(
        "markers={markers} secs={secs:.3} markers_per_sec={:.0} ring_full_exits={ring_full}",
        markers as f64 / secs,
    );
    machine.shutdown()?;
    Ok(())
}
