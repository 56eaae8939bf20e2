//! A guest without KVM: a workload thread that does what `guest/loop.asm`
//! does (increment byte 0 of every page of `[start, end)` in ascending
//! order, one marker per pass) on a host mapping, with the same pause /
//! resume / save / restore / throttle surface as [`crate::Vm`]. Its dirty
//! pages are tracked by write-protect ([`multifd::WriteTracker`]), the
//! tracker that needs no KVM. Used where there is no `/dev/kvm`, or when
//! [`crate::NO_KVM_ENV`] asks for it.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::dirty::{DirtyLog, PAGE, WriteProtectLog};
use crate::vm::RunState;

const REQ_RUN: u8 = 0;
const REQ_PAUSE: u8 = 1;
const REQ_STOP: u8 = 2;
/// The throttle timeslice, as for the KVM vCPU.
const SLICE: Duration = Duration::from_millis(10);
/// "SOFT": the first bytes of a [`SoftVm::save_state`].
const STATE_MAGIC: &[u8; 4] = b"SOFT";

struct Core {
    memory: GuestMemoryMmap,
    start: u64,
    end: u64,
    request: AtomicU8,
    throttle: AtomicU8,
    max_throttle: AtomicU8,
    markers: AtomicU64,
    /// The next page the workload increments.
    next: AtomicU64,
    status: Mutex<RunState>,
    changed: Condvar,
}

impl Core {
    fn status(&self) -> MutexGuard<'_, RunState> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The workload "guest" (see the module docs).
pub struct SoftVm {
    core: Arc<Core>,
    region: Arc<MmapRegion>,
    dirty: Option<Box<dyn DirtyLog>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SoftVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftVm")
            .field("start", &self.core.start)
            .field("end", &self.core.end)
            .finish_non_exhaustive()
    }
}

impl SoftVm {
    /// `mem_size` bytes of anonymous RAM; the workload will loop over
    /// `[start, end)`; write-protect dirty tracking when `track`.
    pub fn new(mem_size: u64, start: u64, end: u64, track: bool) -> Result<Self> {
        ensure!(
            mem_size.is_multiple_of(PAGE) && start.is_multiple_of(PAGE) && end.is_multiple_of(PAGE),
            "sizes must be multiples of 4 KiB"
        );
        ensure!(start < end && end <= mem_size, "range outside guest RAM");
        let region = Arc::new(
            MmapRegion::build(
                None,
                usize::try_from(mem_size)?,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
            .context("mapping anonymous guest RAM")?,
        );
        let guest =
            GuestRegionMmap::with_arc(region.clone(), GuestAddress(0)).context("guest region")?;
        let memory = GuestMemoryMmap::from_arc_regions(vec![Arc::new(guest)])?;
        let dirty: Option<Box<dyn DirtyLog>> = if track {
            Some(Box::new(WriteProtectLog {
                tracker: multifd::WriteTracker::new(region.clone())
                    .context("userfaultfd write tracking of guest RAM")?,
            }))
        } else {
            None
        };
        Ok(Self {
            core: Arc::new(Core {
                memory,
                start,
                end,
                request: AtomicU8::new(REQ_PAUSE),
                throttle: AtomicU8::new(0),
                max_throttle: AtomicU8::new(0),
                markers: AtomicU64::new(0),
                next: AtomicU64::new(start),
                status: Mutex::new(RunState::Created),
                changed: Condvar::new(),
            }),
            region,
            dirty,
            thread: None,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.core.memory
    }

    /// The host mapping of guest RAM.
    pub fn region(&self) -> &Arc<MmapRegion> {
        &self.region
    }

    /// Takes the dirty log (write-protect), if tracking.
    pub fn take_dirty_log(&mut self) -> Option<Box<dyn DirtyLog>> {
        self.dirty.take()
    }

    /// Markers (passes completed).
    pub fn markers(&self) -> u64 {
        self.core.markers.load(Ordering::Acquire)
    }

    /// What the workload thread is doing.
    pub fn run_state(&self) -> RunState {
        self.core.status().clone()
    }

    /// Starts the workload thread.
    pub fn start(&mut self) -> Result<()> {
        ensure!(self.thread.is_none(), "started already");
        self.core.request.store(REQ_RUN, Ordering::Release);
        *self.core.status() = RunState::Running;
        let core = self.core.clone();
        self.thread = Some(
            std::thread::Builder::new()
                .name("soft-vcpu".into())
                .spawn(move || {
                    let msg = workload(&core).err().map(|e| format!("{e:#}"));
                    *core.status() = RunState::Exited(msg);
                    core.changed.notify_all();
                })
                .context("spawning the workload thread")?,
        );
        Ok(())
    }

    fn wait_for(&self, what: &str, want: &RunState) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = self.core.status();
        while *st != *want {
            if let RunState::Exited(m) = &*st {
                bail!("workload exited ({m:?}) while waiting to be {what}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "workload not {what} after 10 s");
            st = self
                .core
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Stops the workload between two page increments.
    pub fn pause(&self) -> Result<()> {
        match self.run_state() {
            RunState::Created | RunState::Paused => return Ok(()),
            RunState::Exited(m) => bail!("workload exited: {m:?}"),
            RunState::Running => {}
        }
        {
            let _g = self.core.status();
            self.core.request.store(REQ_PAUSE, Ordering::Release);
            self.core.changed.notify_all();
        }
        self.wait_for("paused", &RunState::Paused)
    }

    /// Lets a paused workload run again.
    pub fn resume(&self) -> Result<()> {
        match self.run_state() {
            RunState::Running => return Ok(()),
            RunState::Created => bail!("not started"),
            RunState::Exited(m) => bail!("workload exited: {m:?}"),
            RunState::Paused => {}
        }
        {
            let _g = self.core.status();
            self.core.request.store(REQ_RUN, Ordering::Release);
            self.core.changed.notify_all();
        }
        self.wait_for("running", &RunState::Running)
    }

    /// Throttle, percent (see [`crate::Vm::set_throttle`]).
    pub fn set_throttle(&self, percent: u8) {
        self.core.throttle.store(percent.min(99), Ordering::Release);
        self.core
            .max_throttle
            .fetch_max(percent.min(99), Ordering::AcqRel);
        let _g = self.core.status();
        self.core.changed.notify_all();
    }

    /// The highest throttle set so far, percent.
    pub fn max_throttle(&self) -> u8 {
        self.core.max_throttle.load(Ordering::Acquire)
    }

    /// The workload's position and marker count (paused or not started).
    pub fn save_state(&self) -> Result<Vec<u8>> {
        ensure!(
            matches!(self.run_state(), RunState::Paused | RunState::Created),
            "saving state needs a paused workload"
        );
        let mut out = STATE_MAGIC.to_vec();
        for v in [
            self.core.start,
            self.core.end,
            self.core.next.load(Ordering::Acquire),
            self.markers(),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    /// Loads a [`SoftVm::save_state`] of a workload over the same range.
    pub fn restore_state(&self, bytes: &[u8]) -> Result<()> {
        ensure!(
            bytes.len() == 36 && &bytes[..4] == STATE_MAGIC,
            "not a workload state ({} bytes)",
            bytes.len()
        );
        let v = |i: usize| u64::from_le_bytes(bytes[4 + 8 * i..12 + 8 * i].try_into().expect("8"));
        ensure!(
            v(0) == self.core.start && v(1) == self.core.end,
            "the state's range {:#x}..{:#x} is not ours",
            v(0),
            v(1)
        );
        ensure!(
            (v(0)..v(1)).contains(&v(2)) && v(2).is_multiple_of(PAGE),
            "bad position"
        );
        self.core.next.store(v(2), Ordering::Release);
        self.core.markers.store(v(3), Ordering::Release);
        Ok(())
    }

    /// Stops and joins the workload thread.
    pub fn shutdown(&mut self) -> Result<()> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        {
            let _g = self.core.status();
            self.core.request.store(REQ_STOP, Ordering::Release);
            self.core.changed.notify_all();
        }
        t.join()
            .map_err(|_| anyhow::anyhow!("the workload thread panicked"))
    }
}

impl Drop for SoftVm {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Parks while paused; returns false when asked to stop.
fn park(core: &Core) -> bool {
    let mut st = core.status();
    loop {
        match core.request.load(Ordering::Acquire) {
            REQ_RUN => {
                *st = RunState::Running;
                core.changed.notify_all();
                return true;
            }
            REQ_STOP => return false,
            _ => {
                if *st != RunState::Paused {
                    *st = RunState::Paused;
                    core.changed.notify_all();
                }
                st = core.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn workload(core: &Core) -> Result<()> {
    let mut slice = Instant::now();
    loop {
        if core.request.load(Ordering::Acquire) != REQ_RUN && !park(core) {
            return Ok(());
        }
        // One page at a time, the request checked in between: a pause
        // leaves a consistent prefix incremented.
        let page = core.next.load(Ordering::Relaxed);
        let addr = GuestAddress(page);
        let b: u8 = core.memory.read_obj(addr).context("reading guest RAM")?;
        core.memory
            .write_obj(b.wrapping_add(1), addr)
            .context("writing guest RAM")?;
        let next = if page + PAGE >= core.end {
            core.markers.fetch_add(1, Ordering::AcqRel);
            core.start
        } else {
            page + PAGE
        };
        core.next.store(next, Ordering::Release);
        let pct = u32::from(core.throttle.load(Ordering::Acquire));
        if pct > 0 && slice.elapsed() >= SLICE {
            let until = Instant::now() + SLICE * pct / (100 - pct);
            let mut st = core.status();
            while Instant::now() < until
                && core.request.load(Ordering::Acquire) == REQ_RUN
                && u32::from(core.throttle.load(Ordering::Acquire)) == pct
            {
                let left = until.saturating_duration_since(Instant::now());
                st = core
                    .changed
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            slice = Instant::now();
        } else if pct == 0 {
            slice = Instant::now();
        }
    }
}
