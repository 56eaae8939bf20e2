//! The VM: one memory slot, one vCPU on its own thread, a serial port that
//! counts markers, pause/resume from any thread, state save/restore.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, Msrs, kvm_dtable, kvm_enable_cap, kvm_msr_entry, kvm_segment,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::dirty::{
    BitmapLog, DirtyLog, DirtyRing, DirtyTracking, PAGE, RingLog, RingSet, WriteProtectLog,
};
use crate::state::VmState;

/// Where a BIOS would load the boot sector, and where we do.
pub const BOOT_ADDR: u64 = 0x7c00;
/// The serial port whose writes are markers (COM1 data register).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Where the VMM puts its GDT for a protected-mode entry (page 0).
pub const GDT_ADDR: u64 = 0x500;
/// Trailer of a boot sector that tells its 32-bit entry point: the magic
/// at byte 502, the entry address (u32, little-endian) at byte 506.
pub const PM32_MAGIC: &[u8; 4] = b"PM32";
/// The TSS KVM needs for real mode on hosts without unrestricted guest
/// (three pages, above any RAM this VMM maps).
const TSS_ADDR: usize = 0xfffb_d000;

/// MSRs carried in the state (those the host supports). This guest uses
/// none; they are what any 32/64-bit guest may set and expect back.
const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC: guest time goes on from where it was
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// How the vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryMode {
    /// Protected mode when the boot sector has a `PM32` trailer, else real.
    #[default]
    Auto,
    /// Real mode at 0x7c00, CS = 0, as a BIOS hands off.
    Real,
    /// 32-bit protected mode at the trailer's entry (flat segments, the
    /// VMM's GDT); an error without a trailer.
    Protected,
}

/// Where the vCPU was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Real mode, CS:IP = 0:0x7c00.
    Real,
    /// Protected mode at this EIP.
    Protected(u32),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes (one slot at guest-physical 0), a multiple of 4 KiB.
    pub mem_size: u64,
    /// Back RAM with this file, shared (like QEMU's memory-backend-file),
    /// instead of anonymous memory. Created when missing; an existing file
    /// must have exactly `mem_size` bytes (or be empty).
    pub mem_file: Option<PathBuf>,
    /// Dirty-page tracking.
    pub dirty: DirtyTracking,
    /// Entries of each vCPU's dirty ring (power of two; ring mode only).
    pub ring_entries: u32,
    /// Echo serial bytes to stdout.
    pub echo_serial: bool,
    /// Pause the vCPU by itself right after this many markers.
    pub pause_after_markers: Option<u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_size: 64 << 20,
            mem_file: None,
            dirty: DirtyTracking::Auto,
            ring_entries: 65536,
            echo_serial: false,
            pause_after_markers: None,
        }
    }
}

/// What the vCPU thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Not started yet.
    Created,
    /// In (or about to enter) KVM_RUN.
    Running,
    /// Out of KVM_RUN, waiting to be resumed.
    Paused,
    /// The thread ended: shut down, or the guest did something we do not
    /// emulate (the message says what).
    Exited(Option<String>),
}

/// The throttle timeslice (QEMU's CPU_THROTTLE_TIMESLICE_NS).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// What the controller asks of the vCPU thread.
const REQ_RUN: u8 = 0;
const REQ_PAUSE: u8 = 1;
const REQ_STOP: u8 = 2;

/// What the vCPU thread and the VM share. Field order is drop order: every
/// descriptor that keeps the kernel VM alive (vCPU fd, ring mappings, VM
/// fd) goes before the guest memory it maps.
pub(crate) struct Core {
    pub(crate) vcpu: Mutex<VcpuFd>,
    pub(crate) rings: Option<Arc<Mutex<RingSet>>>,
    pub(crate) vm_fd: VmFd,
    pub(crate) mem_size: u64,
    pub(crate) has_irqchip: bool,
    request: AtomicU8,
    markers: AtomicU64,
    pause_after: Option<u64>,
    echo: bool,
    port92: AtomicU8,
    /// Auto-converge throttle, percent of each timeslice the vCPU sleeps.
    throttle: AtomicU8,
    /// The highest throttle set so far.
    max_throttle: AtomicU8,
    status: Mutex<RunState>,
    changed: Condvar,
    /// Last: the mapping outlives every descriptor above.
    pub(crate) region: Arc<MmapRegion>,
}

impl Core {
    fn status(&self) -> MutexGuard<'_, RunState> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, s: RunState) {
        *self.status() = s;
        self.changed.notify_all();
    }
}

/// A running (or paused) guest.
pub struct Vm {
    thread: Option<JoinHandle<()>>,
    /// Kicks the vCPU once per throttle timeslice while throttled.
    ticker: Option<JoinHandle<()>>,
    memory: GuestMemoryMmap,
    kvm: Kvm,
    dirty: Option<Box<dyn DirtyLog>>,
    dirty_kind: &'static str,
    core: Arc<Core>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_size", &self.core.mem_size)
            .field("dirty", &self.dirty_kind)
            .field("state", &*self.core.status())
            .finish_non_exhaustive()
    }
}

/// Whether this host's KVM is known to push past a full dirty ring. PVM
/// (`kvm_pvm`, KVM without hardware virtualisation, as in nested cloud
/// VMs) exits for a full ring too late: the kernel warns "should never get
/// full" (virt/kvm/dirty_ring.c) and entries are overwritten.
pub fn ring_overflows() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn map_memory(cfg: &VmConfig) -> Result<MmapRegion> {
    let size = usize::try_from(cfg.mem_size)?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    match &cfg.mem_file {
        None => MmapRegion::build(
            None,
            size,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .context("mapping anonymous guest RAM"),
        Some(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let len = file.metadata()?.len();
            if len == 0 {
                file.set_len(cfg.mem_size)?;
            } else {
                ensure!(
                    len == cfg.mem_size,
                    "{} has {len} bytes, guest RAM is {} bytes",
                    path.display(),
                    cfg.mem_size
                );
            }
            MmapRegion::build(Some(FileOffset::new(file, 0)), size, prot, libc::MAP_SHARED)
                .with_context(|| format!("mapping {}", path.display()))
        }
    }
}

impl Vm {
    /// Creates the VM: memory, slot, vCPU (with the host's CPUID), dirty
    /// tracking. The vCPU starts in KVM's reset state; load a boot sector
    /// ([`Vm::load_boot_sector`]) or a saved state ([`Vm::restore_state`]),
    /// then [`Vm::start`].
    pub fn new(cfg: &VmConfig) -> Result<Self> {
        ensure!(
            cfg.mem_size >= 1 << 20 && cfg.mem_size.is_multiple_of(PAGE),
            "guest RAM must be at least 1 MiB and a multiple of 4 KiB"
        );
        ensure!(
            cfg.mem_size <= TSS_ADDR as u64,
            "guest RAM must end below {TSS_ADDR:#x}"
        );
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm_fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        vm_fd
            .set_tss_address(TSS_ADDR)
            .context("KVM_SET_TSS_ADDR")?;

        // The ring must be enabled before any vCPU exists.
        let ring_cap = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|c| (c, vm_fd.check_extension_raw(u64::from(c))))
            .find(|&(_, max)| max > 0);
        let dirty = match (cfg.dirty, ring_cap) {
            (DirtyTracking::Auto, Some(_)) if ring_overflows() => {
                tracing::info!("kvm_pvm: the dirty ring overflows there, using the bitmap");
                DirtyTracking::Bitmap
            }
            (DirtyTracking::Auto, Some(_)) => DirtyTracking::Ring,
            (DirtyTracking::Auto, None) => DirtyTracking::Bitmap,
            (DirtyTracking::Ring, None) => bail!("this kernel has no KVM dirty ring"),
            (d, _) => d,
        };
        let mut ring_entries = 0;
        if dirty == DirtyTracking::Ring {
            let (cap, max_bytes) = ring_cap.expect("checked above");
            let bytes = u64::from(cfg.ring_entries) * 16;
            ensure!(
                cfg.ring_entries.is_power_of_two() && bytes >= PAGE && bytes <= max_bytes as u64,
                "ring of {} entries: need a power of two, {}..={} entries",
                cfg.ring_entries,
                PAGE / 16,
                max_bytes / 16
            );
            let mut enable = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            enable.args[0] = bytes;
            vm_fd
                .enable_cap(&enable)
                .context("enabling the dirty ring")?;
            ring_entries = cfg.ring_entries;
            tracing::debug!(cap, entries = ring_entries, "dirty ring enabled");
        }

        let region = Arc::new(map_memory(cfg)?);
        let flags = match dirty {
            DirtyTracking::Ring | DirtyTracking::Bitmap => KVM_MEM_LOG_DIRTY_PAGES,
            _ => 0,
        };
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: cfg.mem_size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the slot makes KVM access `region` on the guest's behalf.
        // `Core` holds an Arc to it as its last field, so it is unmapped
        // only after Core's vCPU fd, ring mappings and VM fd (all that keep
        // the kernel VM, and so the slot, alive) are closed; the other
        // Arcs (GuestMemoryMmap, a WriteTracker) can only delay the unmap.
        unsafe { vm_fd.set_user_memory_region(slot) }.context("KVM_SET_USER_MEMORY_REGION")?;

        let vcpu = vm_fd.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;

        let pages = cfg.mem_size / PAGE;
        let rings = if dirty == DirtyTracking::Ring {
            let mut set = RingSet::new(pages);
            set.rings
                .push(DirtyRing::map(&vcpu, ring_entries).context("mapping the dirty ring")?);
            Some(Arc::new(Mutex::new(set)))
        } else {
            None
        };

        let guest_region =
            GuestRegionMmap::with_arc(region.clone(), GuestAddress(0)).context("guest region")?;
        let memory = GuestMemoryMmap::from_arc_regions(vec![Arc::new(guest_region)])
            .context("guest memory")?;

        let core = Arc::new(Core {
            vcpu: Mutex::new(vcpu),
            rings,
            vm_fd,
            mem_size: cfg.mem_size,
            has_irqchip: false,
            request: AtomicU8::new(REQ_PAUSE),
            markers: AtomicU64::new(0),
            pause_after: cfg.pause_after_markers,
            echo: cfg.echo_serial,
            port92: AtomicU8::new(0),
            throttle: AtomicU8::new(0),
            max_throttle: AtomicU8::new(0),
            status: Mutex::new(RunState::Created),
            changed: Condvar::new(),
            region,
        });
        let dirty_log: Option<Box<dyn DirtyLog>> = match dirty {
            DirtyTracking::Ring => Some(Box::new(RingLog {
                rings: core.rings.clone().expect("ring mode has rings"),
                core: core.clone(),
            })),
            DirtyTracking::Bitmap => Some(Box::new(BitmapLog { core: core.clone() })),
            DirtyTracking::WriteProtect => Some(Box::new(WriteProtectLog {
                tracker: multifd::WriteTracker::new(core.region.clone())
                    .context("userfaultfd write tracking of guest RAM")?,
            })),
            DirtyTracking::None | DirtyTracking::Auto => None,
        };
        let dirty_kind = dirty_log.as_ref().map_or("none", |d| d.kind());
        Ok(Self {
            thread: None,
            ticker: None,
            memory,
            kvm,
            dirty: dirty_log,
            dirty_kind,
            core,
        })
    }

    /// Guest RAM (guest-physical 0 .. `mem_size`).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The host mapping of guest RAM.
    pub fn region(&self) -> &Arc<MmapRegion> {
        &self.core.region
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.core.mem_size
    }

    /// Copies guest RAM `[addr, addr + buf.len())` into `buf`.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .with_context(|| format!("reading guest RAM at {addr:#x}"))
    }

    /// Writes `data` into guest RAM at `addr`.
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.memory
            .write_slice(data, GuestAddress(addr))
            .with_context(|| format!("writing guest RAM at {addr:#x}"))
    }

    /// The dirty-tracking mechanism in use: "ring", "bitmap",
    /// "write-protect" or "none".
    pub fn dirty_kind(&self) -> &'static str {
        self.dirty_kind
    }

    /// Takes the VM's dirty log (there is one: two collectors would steal
    /// each other's pages). None without tracking or when already taken.
    pub fn take_dirty_log(&mut self) -> Option<Box<dyn DirtyLog>> {
        self.dirty.take()
    }

    /// Ring-full exits the vCPU thread handled (ring mode).
    pub fn ring_full_exits(&self) -> u64 {
        self.core.rings.as_ref().map_or(0, |r| {
            r.lock().unwrap_or_else(|p| p.into_inner()).full_exits
        })
    }

    /// Serial markers written by the guest so far (carried by the state).
    pub fn markers(&self) -> u64 {
        self.core.markers.load(Ordering::Acquire)
    }

    /// What the vCPU thread is doing.
    pub fn run_state(&self) -> RunState {
        self.core.status().clone()
    }

    /// Loads a 512-byte boot sector at 0x7c00 and points the vCPU at it
    /// (see [`EntryMode`]). Returns where it will start.
    pub fn load_boot_sector(&self, image: &[u8], mode: EntryMode) -> Result<Entry> {
        ensure!(
            image.len() == 512 && image[510..] == [0x55, 0xaa],
            "not a boot sector (512 bytes ending in 55 aa)"
        );
        self.require_stopped("loading a boot sector")?;
        self.write_memory(BOOT_ADDR, image)?;
        let pm32 = (&image[502..506] == PM32_MAGIC)
            .then(|| u32::from_le_bytes(image[506..510].try_into().expect("4 bytes")));
        let entry = match (mode, pm32) {
            (EntryMode::Real, _) | (EntryMode::Auto, None) => Entry::Real,
            (_, Some(eip)) => {
                ensure!(
                    (BOOT_ADDR..BOOT_ADDR + 510).contains(&u64::from(eip)),
                    "PM32 entry {eip:#x} is outside the boot sector"
                );
                Entry::Protected(eip)
            }
            (EntryMode::Protected, None) => {
                bail!("the boot sector has no PM32 trailer: no protected-mode entry")
            }
        };
        let vcpu = self.core.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let mut sregs = vcpu.get_sregs()?;
        let mut regs = vcpu.get_regs()?;
        regs.rflags = 0x2;
        match entry {
            Entry::Real => {
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                regs.rip = BOOT_ADDR;
            }
            Entry::Protected(eip) => {
                // The program's own descriptors: null, flat 32-bit code at
                // 0x08, flat data at 0x10 (its segment loads need them).
                let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
                let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
                self.write_memory(GDT_ADDR, &bytes)?;
                let code = kvm_segment {
                    base: 0,
                    limit: 0xffff_ffff,
                    selector: 0x08,
                    type_: 0xb, // execute/read, accessed
                    present: 1,
                    dpl: 0,
                    db: 1,
                    s: 1,
                    l: 0,
                    g: 1,
                    avl: 0,
                    unusable: 0,
                    padding: 0,
                };
                let data = kvm_segment {
                    selector: 0x10,
                    type_: 0x3, // read/write, accessed
                    ..code
                };
                sregs.cs = code;
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.gdt = kvm_dtable {
                    base: GDT_ADDR,
                    limit: (bytes.len() - 1) as u16,
                    ..Default::default()
                };
                sregs.cr0 = 0x11; // PE | ET
                regs.rip = u64::from(eip);
                regs.rsp = BOOT_ADDR;
            }
        }
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&regs)?;
        Ok(entry)
    }

    /// Starts the vCPU thread (running). Only once.
    pub fn start(&mut self) -> Result<()> {
        ensure!(self.thread.is_none(), "the vCPU thread was started already");
        install_kick_handler()?;
        self.core.request.store(REQ_RUN, Ordering::Release);
        self.core.set_status(RunState::Running);
        let core = self.core.clone();
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let end = vcpu_thread(&core);
                let msg = end.err().map(|e| format!("{e:#}"));
                if let Some(m) = &msg {
                    tracing::error!("vCPU stopped: {m}");
                }
                core.set_status(RunState::Exited(msg));
            })
            .context("spawning the vCPU thread")?;
        let vcpu = t.as_pthread_t();
        self.thread = Some(t);
        let core = self.core.clone();
        let ticker = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while core.request.load(Ordering::Acquire) != REQ_STOP {
                    std::thread::sleep(THROTTLE_SLICE);
                    if core.throttle.load(Ordering::Acquire) > 0
                        && core.request.load(Ordering::Acquire) == REQ_RUN
                    {
                        // SAFETY: the vCPU thread is joined only after this
                        // thread (shutdown joins the ticker first), so the
                        // pthread_t is valid; the kick handler is installed.
                        unsafe { libc::pthread_kill(vcpu, kick_signal()) };
                    }
                }
            })
            .context("spawning the throttle ticker")?;
        self.ticker = Some(ticker);
        Ok(())
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t is valid while we hold the (unjoined)
            // JoinHandle; the kick signal's handler is installed (start).
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&RunState) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = self.core.status();
        while !pred(&st) {
            if let RunState::Exited(m) = &*st {
                bail!(
                    "vCPU exited ({}) while waiting to be {what}",
                    m.as_deref().unwrap_or("shut down")
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "vCPU not {what} after 10 s");
            // Re-kick now and then: cheap insurance, not needed for
            // correctness (the handler sets immediate_exit).
            let (g, _) = self
                .core
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            if !pred(&st) && self.core.request.load(Ordering::Acquire) != REQ_RUN {
                drop(st);
                self.kick();
                st = self.core.status();
            }
        }
        Ok(())
    }

    /// Stops the vCPU: when this returns, the guest executes nothing and
    /// writes no memory until [`Vm::resume`]. Idempotent.
    pub fn pause(&self) -> Result<()> {
        match self.run_state() {
            RunState::Created | RunState::Paused => return Ok(()),
            RunState::Exited(m) => bail!("vCPU exited: {}", m.unwrap_or_default()),
            RunState::Running => {}
        }
        {
            // Under the lock a throttled vCPU sleeps with: it wakes now.
            let _g = self.core.status();
            self.core.request.store(REQ_PAUSE, Ordering::Release);
            self.core.changed.notify_all();
        }
        self.kick();
        self.wait_for("paused", |s| *s == RunState::Paused)
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) -> Result<()> {
        match self.run_state() {
            RunState::Running => return Ok(()),
            RunState::Created => bail!("not started"),
            RunState::Exited(m) => bail!("vCPU exited: {}", m.unwrap_or_default()),
            RunState::Paused => {}
        }
        {
            // Under the lock the parked thread waits with: no lost wake-up.
            let _g = self.core.status();
            self.core.request.store(REQ_RUN, Ordering::Release);
            self.core.changed.notify_all();
        }
        self.wait_for("running", |s| *s == RunState::Running)
    }

    /// Waits until the guest wrote `n` markers (true) or `timeout` passed.
    pub fn wait_markers(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.markers() < n {
            if Instant::now() >= deadline || matches!(self.run_state(), RunState::Exited(_)) {
                return self.markers() >= n;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Waits until the vCPU paused by itself (`pause_after_markers`).
    pub fn wait_paused(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.core.status();
        while *st != RunState::Paused {
            if let RunState::Exited(m) = &*st {
                bail!("vCPU exited: {}", m.as_deref().unwrap_or("shut down"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "vCPU not paused after {timeout:?}");
            st = self
                .core
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn require_stopped(&self, what: &str) -> Result<()> {
        match self.run_state() {
            RunState::Created | RunState::Paused => Ok(()),
            s => bail!("{what} needs a paused vCPU (it is {s:?})"),
        }
    }

    /// The vCPU and VMM state as opaque bytes (layout in [`crate::state`]).
    /// The vCPU must be paused (or not started).
    pub fn save_state(&self) -> Result<Vec<u8>> {
        self.require_stopped("saving state")?;
        let vcpu = self.core.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let mut msrs = self.saved_msrs()?;
        let n = vcpu.get_msrs(&mut msrs).context("KVM_GET_MSRS")?;
        ensure!(
            n == msrs.as_slice().len(),
            "KVM_GET_MSRS read {n} of {}",
            msrs.as_slice().len()
        );
        let state = VmState {
            regs: vcpu.get_regs().context("KVM_GET_REGS")?,
            sregs: vcpu.get_sregs().context("KVM_GET_SREGS")?,
            fpu: vcpu.get_fpu().context("KVM_GET_FPU")?,
            xcrs: vcpu.get_xcrs().context("KVM_GET_XCRS")?,
            debugregs: vcpu.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
            events: vcpu.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
            mp_state: vcpu.get_mp_state().context("KVM_GET_MP_STATE")?,
            msrs: msrs.as_slice().to_vec(),
            lapic: if self.core.has_irqchip {
                Some(vcpu.get_lapic().context("KVM_GET_LAPIC")?)
            } else {
                None
            },
            markers: self.markers(),
        };
        Ok(state.to_bytes())
    }

    /// Loads a state from [`Vm::save_state`] (of a VM with the same
    /// configuration) into the vCPU; guest RAM is the caller's to copy.
    /// The vCPU must be paused (or not started).
    pub fn restore_state(&self, bytes: &[u8]) -> Result<()> {
        self.require_stopped("restoring state")?;
        let s = VmState::from_bytes(bytes)?;
        ensure!(
            s.lapic.is_some() == self.core.has_irqchip,
            "the state's in-kernel irqchip does not match this VM's"
        );
        let vcpu = self.core.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        // The order KVM wants: MP state before registers, special registers
        // before the rest, events last (they may refer to the others).
        vcpu.set_mp_state(s.mp_state).context("KVM_SET_MP_STATE")?;
        vcpu.set_sregs(&s.sregs).context("KVM_SET_SREGS")?;
        vcpu.set_regs(&s.regs).context("KVM_SET_REGS")?;
        vcpu.set_fpu(&s.fpu).context("KVM_SET_FPU")?;
        vcpu.set_xcrs(&s.xcrs).context("KVM_SET_XCRS")?;
        vcpu.set_debug_regs(&s.debugregs)
            .context("KVM_SET_DEBUGREGS")?;
        if let Some(lapic) = &s.lapic {
            vcpu.set_lapic(lapic).context("KVM_SET_LAPIC")?;
        }
        let msrs = Msrs::from_entries(&s.msrs).context("MSR list")?;
        let n = vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
        ensure!(
            n == s.msrs.len(),
            "KVM_SET_MSRS wrote {n} of {}",
            s.msrs.len()
        );
        vcpu.set_vcpu_events(&s.events)
            .context("KVM_SET_VCPU_EVENTS")?;
        self.core.markers.store(s.markers, Ordering::Release);
        Ok(())
    }

    fn saved_msrs(&self) -> Result<Msrs> {
        let supported = self
            .kvm
            .get_msr_index_list()
            .context("KVM_GET_MSR_INDEX_LIST")?;
        let entries: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .filter(|i| supported.as_slice().contains(i))
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        Ok(Msrs::from_entries(&entries)?)
    }

    /// Throttles the vCPU like QEMU's cpu-throttle: in every 10 ms
    /// timeslice it runs, it then sleeps `percent / (100 - percent)` of a
    /// timeslice (at 99%: 990 ms). A ticker thread kicks the vCPU out of
    /// KVM_RUN once per timeslice, so a guest that never exits is
    /// throttled too. 0 ends throttling. At most 99.
    pub fn set_throttle(&self, percent: u8) {
        self.core.throttle.store(percent.min(99), Ordering::Release);
        self.core
            .max_throttle
            .fetch_max(percent.min(99), Ordering::AcqRel);
        // Wake a throttled vCPU sleeping out a longer timeslice.
        let _g = self.core.status();
        self.core.changed.notify_all();
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.core.throttle.load(Ordering::Acquire)
    }

    /// The highest throttle set so far, percent.
    pub fn max_throttle(&self) -> u8 {
        self.core.max_throttle.load(Ordering::Acquire)
    }

    /// Stops the vCPU thread for good and joins it. Also done on drop.
    pub fn shutdown(&mut self) -> Result<()> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        self.core.request.store(REQ_STOP, Ordering::Release);
        {
            let _g = self.core.status();
            self.core.changed.notify_all();
        }
        // The ticker first: it kicks the vCPU thread by its pthread_t,
        // which must not be used once that thread is joined.
        if let Some(k) = self.ticker.take() {
            let _ = k.join();
        }
        {
            // Wake a paused thread under the lock it waits with.
            let _g = self.core.status();
            self.core.changed.notify_all();
        }
        // SAFETY: the handle is not joined yet, so the pthread_t is valid.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        t.join()
            .map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))?;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!("{e:#}");
        }
    }
}

// ---------------------------------------------------------------------------
// Kicking the vCPU out of KVM_RUN

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread is running, while
    /// it runs it (null otherwise). Read by the kick signal's handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local Cell without destructor: no
    // allocation or lazy init, safe in a signal handler.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` points into this thread's vCPU kvm_run mapping, set
        // by `vcpu_thread` for exactly as long as it holds the vCPU (the
        // mapping lives as long as the VcpuFd). A byte store is
        // async-signal-safe; KVM reads it at the next KVM_RUN entry, so a
        // kick that lands just before KVM_RUN is not lost.
        unsafe { p.write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| anyhow::anyhow!("installing the vCPU kick handler: {e}"));
    });
    res
}

/// Clears the thread-local pointer when the vCPU lock is released.
struct ImmediateExitGuard;

impl Drop for ImmediateExitGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

fn vcpu_thread(core: &Core) -> Result<()> {
    loop {
        // Parked until asked to run (or stop).
        {
            let mut st = core.status();
            loop {
                match core.request.load(Ordering::Acquire) {
                    REQ_RUN => break,
                    REQ_STOP => return Ok(()),
                    _ => {
                        if *st != RunState::Paused {
                            *st = RunState::Paused;
                            core.changed.notify_all();
                        }
                        st = core.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
            *st = RunState::Running;
            core.changed.notify_all();
        }
        let mut vcpu = core.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let ptr = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|c| c.set(ptr));
        let _clear = ImmediateExitGuard;
        run_until_asked(core, &mut vcpu)?;
    }
}

/// Sleeps out the throttle once the vCPU has run a whole timeslice; a
/// pause or stop request (or a throttle change) cuts the sleep short.
fn throttle_point(core: &Core, slice_start: &mut Instant) {
    let pct = u32::from(core.throttle.load(Ordering::Acquire));
    if pct == 0 {
        *slice_start = Instant::now();
        return;
    }
    if slice_start.elapsed() < THROTTLE_SLICE {
        return;
    }
    let sleep = THROTTLE_SLICE * pct / (100 - pct);
    let until = Instant::now() + sleep;
    let mut st = core.status();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero()
            || core.request.load(Ordering::Acquire) != REQ_RUN
            || u32::from(core.throttle.load(Ordering::Acquire)) != pct
        {
            break;
        }
        st = core
            .changed
            .wait_timeout(st, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    *slice_start = Instant::now();
}

/// Runs the vCPU until the request is no longer REQ_RUN.
fn run_until_asked(core: &Core, vcpu: &mut VcpuFd) -> Result<()> {
    let mut slice_start = Instant::now();
    while core.request.load(Ordering::Acquire) == REQ_RUN {
        throttle_point(core, &mut slice_start);
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    if port == SERIAL_PORT {
                        let n = core.markers.fetch_add(1, Ordering::AcqRel) + 1;
                        if core.echo {
                            use std::io::Write;
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(data);
                            let _ = out.flush();
                        }
                        if core.pause_after == Some(n) {
                            // Pause here, between two passes: a request
                            // from pause() meanwhile is the same request.
                            let _ = core.request.compare_exchange(
                                REQ_RUN,
                                REQ_PAUSE,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                        }
                    } else if port == 0x92 {
                        core.port92.store(data[0], Ordering::Relaxed);
                    }
                    // Anything else (no other device here): ignored.
                }
                VcpuExit::IoIn(port, data) => {
                    data.fill(0);
                    match port {
                        0x92 => data[0] = core.port92.load(Ordering::Relaxed),
                        // Line status: transmitter empty, so a polling
                        // guest would go on writing.
                        0x3fd => data[0] = 0x60,
                        _ => {}
                    }
                }
                VcpuExit::MmioRead(_, data) => data.fill(0xff),
                VcpuExit::MmioWrite(..) => {}
                VcpuExit::Unsupported(r) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                    let rings = core
                        .rings
                        .as_ref()
                        .context("ring-full exit without rings")?;
                    let mut set = rings.lock().unwrap_or_else(|p| p.into_inner());
                    set.full_exits += 1;
                    let (harvested, recycled) = set
                        .harvest_and_reset(&core.vm_fd)
                        .context("harvesting the dirty ring")?;
                    // The kernel says full, yet nothing to harvest or
                    // recycle: its indices and ours disagree (a ring pushed
                    // past full). Re-entering would exit again at once.
                    ensure!(
                        harvested > 0 || recycled > 0,
                        "dirty ring full but empty: the kernel overflowed it; \
                         dirty pages are lost (use the bitmap)"
                    );
                }
                VcpuExit::Hlt => bail!("the guest halted"),
                VcpuExit::Shutdown => bail!("the guest shut down (triple fault?)"),
                VcpuExit::FailEntry(reason, cpu) => {
                    bail!("KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on cpu {cpu}")
                }
                VcpuExit::InternalError => bail!("KVM_EXIT_INTERNAL_ERROR"),
                other => bail!("unhandled vCPU exit {other:?}"),
            },
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked: clear the flag the handler set, then look at the
                // request again.
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(e).context("KVM_RUN"),
        }
    }
    Ok(())
}
