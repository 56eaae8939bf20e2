//! Live migration between two machines of one test process: the source
//! runs the guest (KVM with the boot sector, or the workload guest without
//! KVM), the destination receives on a thread into a fresh machine.

use std::path::Path;
use std::sync::Arc;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, SystemTime};

use multifd::{Listener, MigrationConfig, Progress, ReceiveOptions, SourceOptions, Uri};
use multifd_example_vmm::migration::{IncomingMachine, migrate_out};
use multifd_example_vmm::{EntryMode, Machine, SoftVm, Vm, no_kvm_forced};

use super::{END, START, WAIT, boot_sector, config};

/// True when this run uses the workload guest: MULTIFD_VMM_NO_KVM is set,
/// or there is no /dev/kvm (or no nasm) and CI is not set.
pub fn workload_guest() -> bool {
    if no_kvm_forced() {
        return true;
    }
    let kvm = Path::new("/dev/kvm").exists()
        && std::process::Command::new("nasm")
            .arg("-v")
            .output()
            .is_ok();
    if !kvm {
        assert!(
            std::env::var_os("CI").is_none(),
            "no /dev/kvm or nasm with CI set: the KVM live tests must run"
        );
        eprintln!("\n*** no /dev/kvm or nasm: the live tests run the workload guest ***\n");
    }
    !kvm
}

/// A stopped machine with `mem` bytes, KVM or workload.
pub fn machine(mem: u64) -> Machine {
    if workload_guest() {
        Machine::Soft(SoftVm::new(mem, START, END, true).expect("workload guest"))
    } else {
        let cfg = multifd_example_vmm::VmConfig {
            mem_size: mem,
            ..config()
        };
        Machine::Kvm(Vm::new(&cfg).expect("Vm::new"))
    }
}

/// A running source guest that printed a few markers.
pub fn running_source() -> Machine {
    let mut m = machine(64 << 20);
    if let Machine::Kvm(vm) = &m {
        vm.load_boot_sector(&boot_sector(), EntryMode::Auto)
            .expect("boot sector");
    }
    m.start().expect("start");
    assert!(
        m.wait_markers(3, WAIT),
        "the source guest prints no markers"
    );
    m
}

/// Options of both sides.
pub fn source_options(channels: u8) -> SourceOptions {
    SourceOptions {
        config: MigrationConfig {
            channels,
            ..MigrationConfig::default()
        },
        ..SourceOptions::default()
    }
}

pub fn receive_options(channels: u8) -> ReceiveOptions {
    ReceiveOptions {
        config: MigrationConfig {
            channels,
            ..MigrationConfig::default()
        },
        accept_timeout: Some(Duration::from_secs(10)),
        ..ReceiveOptions::default()
    }
}

pub fn listen() -> (Listener, Uri) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("uri")).expect("bind");
    let uri = l.local_uri().expect("local uri");
    (l, uri)
}

/// What a destination thread ends with.
pub type Received = anyhow::Result<(Machine, multifd::Incoming)>;

/// Starts a destination on `listener` in `scope`.
pub fn spawn_destination<'s, 'e>(
    s: &'s std::thread::Scope<'s, 'e>,
    listener: &'e Listener,
    opts: &'e ReceiveOptions,
) -> ScopedJoinHandle<'s, Received> {
    s.spawn(move || {
        let mut provider = IncomingMachine::new(|size| Ok(machine(size)));
        let inc = multifd::receive(listener, opts, &mut provider, &Progress::default())?;
        let m = provider
            .machine
            .take()
            .ok_or_else(|| anyhow::anyhow!("no machine"))?;
        Ok((m, inc))
    })
}

/// One migration of `src` (whose dirty log is `log`) with `opts`:
/// (source result, pause time, destination result).
pub fn migrate(
    src: &Machine,
    log: &mut dyn multifd_example_vmm::DirtyLog,
    opts: &SourceOptions,
    progress: &Progress,
) -> (
    multifd::Result<multifd::Stats>,
    Option<SystemTime>,
    Received,
) {
    let (listener, uri) = listen();
    let ropts = receive_options(opts.config.channels);
    std::thread::scope(|s| {
        let dest = spawn_destination(s, &listener, &ropts);
        let (r, paused, _) = migrate_out(src, log, &uri, opts, progress);
        (r, paused, dest.join().expect("destination thread"))
    })
}

/// A shared cancel handle.
pub fn cancel() -> Arc<multifd::Cancel> {
    Arc::new(multifd::Cancel::new())
}
