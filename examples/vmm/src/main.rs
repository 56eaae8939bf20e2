//! `multifd-vmm`: runs a boot sector (the live-migration test guest) under
//! KVM, counts its serial markers, optionally reports dirty pages.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use multifd_example_vmm::{DirtyTracking, EntryMode, Vm, VmConfig};

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
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The boot sector: a 512-byte image, or a .asm file assembled with
    /// `nasm -f bin` (e.g. guest/loop.asm).
    #[arg(long)]
    boot: PathBuf,
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
    if args.boot.extension().is_some_and(|e| e == "asm") {
        let out = std::env::temp_dir().join(format!("multifd-vmm-{}.img", std::process::id()));
        let mut cmd = Command::new("nasm");
        cmd.args(["-f", "bin"]);
        for d in &args.defines {
            cmd.arg(format!("-D{d}"));
        }
        let st = cmd
            .arg("-o")
            .arg(&out)
            .arg(&args.boot)
            .status()
            .context("running nasm")?;
        ensure!(st.success(), "nasm failed: {st}");
        let img = std::fs::read(&out)?;
        let _ = std::fs::remove_file(&out);
        Ok(img)
    } else {
        std::fs::read(&args.boot).with_context(|| format!("reading {}", args.boot.display()))
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
    let cfg = VmConfig {
        mem_size: args.mem << 20,
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
    };
    let image = boot_image(&args)?;
    let mut vm = Vm::new(&cfg)?;
    let entry = vm.load_boot_sector(
        &image,
        match args.entry {
            EntryArg::Auto => EntryMode::Auto,
            EntryArg::Real => EntryMode::Real,
            EntryArg::Protected => EntryMode::Protected,
        },
    )?;
    let mut dirty = vm.take_dirty_log();
    tracing::info!(
        ?entry,
        dirty = vm.dirty_kind(),
        mem_mib = args.mem,
        "starting"
    );
    let t0 = Instant::now();
    vm.start()?;
    let deadline = args.run_secs.map(|s| t0 + Duration::from_secs_f64(s));
    let tick = Duration::from_millis(args.dirty_every_ms.unwrap_or(100));
    let mut last_markers = 0;
    loop {
        std::thread::sleep(tick);
        if let multifd_example_vmm::RunState::Exited(m) = vm.run_state() {
            bail!("vCPU exited: {}", m.unwrap_or_default());
        }
        if args.dirty_every_ms.is_some()
            && let Some(d) = dirty.as_mut()
        {
            let c = Instant::now();
            let pages = d.collect_dirty()?;
            let m = vm.markers();
            println!(
                "t={:.3}s markers={m} (+{}) dirty_pages={} collect={:.1}us",
                t0.elapsed().as_secs_f64(),
                m - last_markers,
                pages.len(),
                c.elapsed().as_secs_f64() * 1e6
            );
            last_markers = m;
        }
        if vm.run_state() == multifd_example_vmm::RunState::Paused {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            vm.pause()?;
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let markers = vm.markers();
    println!(
        "markers={markers} secs={secs:.3} markers_per_sec={:.0} ring_full_exits={}",
        markers as f64 / secs,
        vm.ring_full_exits()
    );
    vm.shutdown()?;
    Ok(())
}
