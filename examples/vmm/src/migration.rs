//! Live migration of a [`Machine`] with the `multifd` library: the
//! example of embedding it.
//!
//! * Source: [`LiveSource`] is the [`SourceVm`]: the dirty log is the
//!   machine's [`DirtyLog`] (one block, [`BLOCK`]), pause / resume /
//!   throttle are the machine's, and the device state is
//!   [`Machine::save_state`] wrapped by [`multifd::device_state_section`].
//!   Guest RAM is the machine's own mapping as a [`RamBlock`], no copy.
//! * Destination: [`IncomingMachine`] is the [`RamProvider`]: it creates
//!   the machine once the source announced its RAM size and hands its
//!   mapping to the receiver; [`resume_incoming`] restores the state from
//!   [`Incoming::device_state`], checks the guest's counters against its
//!   markers and starts it.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use multifd::{
    Access, GuestRam, Incoming, RamBlock, RamBlockInfo, RamProvider, SourceOptions, SourceVm, Stats,
};

use crate::checker::{CounterState, check_counters, check_markers};
use crate::dirty::DirtyLog;
use crate::machine::Machine;

/// The name of the one RAM block (QEMU's name for a PC's RAM).
pub const BLOCK: &str = "pc.ram";

fn vm_error(what: &str, e: anyhow::Error) -> multifd::Error {
    multifd::Error::Io {
        context: what.to_owned(),
        source: io::Error::other(format!("{e:#}")),
    }
}

/// Nanoseconds since the Unix epoch (to compare instants of two processes
/// on one host).
pub fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// A running [`Machine`] as a migration source.
pub struct LiveSource<'m> {
    machine: &'m Machine,
    log: &'m mut dyn DirtyLog,
    section_id: u32,
    /// When the machine was paused for the switchover.
    pub paused_at: Option<SystemTime>,
    /// When it ran again after a failed migration.
    pub resumed_at: Option<SystemTime>,
}

impl<'m> LiveSource<'m> {
    /// The source side of `machine`, whose dirty log is `log`. Empties the
    /// log first: round 1 sends every page anyway (pages the destination
    /// wrote while receiving this machine must not count as dirty).
    pub fn new(machine: &'m Machine, log: &'m mut dyn DirtyLog, opts: &SourceOptions) -> Self {
        let _ = log.collect_dirty();
        Self {
            machine,
            log,
            section_id: opts.plan.ram_section_id + 1,
            paused_at: None,
            resumed_at: None,
        }
    }
}

impl SourceVm for LiveSource<'_> {
    fn collect_dirty(&mut self, _: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        let pages = self.log.collect_dirty().map_err(|e| multifd::Error::Io {
            context: format!("collecting dirty pages ({})", self.log.kind()),
            source: e,
        })?;
        dirty[0].extend(pages);
        Ok(())
    }

    fn pause(&mut self) -> multifd::Result<()> {
        self.paused_at = Some(SystemTime::now());
        self.machine
            .pause()
            .map_err(|e| vm_error("pausing the VM", e))
    }

    fn resume(&mut self) -> multifd::Result<()> {
        self.machine
            .resume()
            .map_err(|e| vm_error("resuming the VM", e))?;
        self.resumed_at = Some(SystemTime::now());
        Ok(())
    }

    fn throttle(&mut self, percent: u8) -> multifd::Result<()> {
        self.machine.set_throttle(percent);
        Ok(())
    }

    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        let state = self
            .machine
            .save_state()
            .map_err(|e| vm_error("saving the VM state", e))?;
        multifd::device_state_section(self.section_id, &state)
    }
}

/// The machine's RAM as the source's [`GuestRam`] (its mapping, no copy).
pub fn source_ram(machine: &Machine) -> multifd::Result<GuestRam> {
    let mut ram = GuestRam::new();
    ram.push(RamBlock::from_mmap(
        BLOCK,
        machine.region().clone(),
        Access::ReadOnly,
        false,
    )?)?;
    Ok(ram)
}

/// Migrates a running `machine` to `uri`. Returns the result and the
/// source's [`LiveSource`] record of pause and resume times.
pub fn migrate_out(
    machine: &Machine,
    log: &mut dyn DirtyLog,
    uri: &multifd::Uri,
    opts: &SourceOptions,
    progress: &multifd::Progress,
) -> (
    multifd::Result<Stats>,
    Option<SystemTime>,
    Option<SystemTime>,
) {
    let ram = match source_ram(machine) {
        Ok(r) => r,
        Err(e) => return (Err(e), None, None),
    };
    let mut src = LiveSource::new(machine, log, opts);
    let r = multifd::migrate(uri, &ram, &mut src, opts, progress);
    (r, src.paused_at, src.resumed_at)
}

/// A [`RamProvider`] that creates the destination machine once the source
/// announced its RAM, and receives straight into its mapping.
pub struct IncomingMachine {
    make: Box<dyn FnMut(u64) -> Result<Machine> + Send>,
    /// The machine, once the source announced its RAM.
    pub machine: Option<Machine>,
}

impl IncomingMachine {
    /// `make(mem_size)` builds a stopped machine with that much RAM.
    pub fn new(make: impl FnMut(u64) -> Result<Machine> + Send + 'static) -> Self {
        Self {
            make: Box::new(make),
            machine: None,
        }
    }
}

impl RamProvider for IncomingMachine {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> multifd::Result<GuestRam> {
        let [b] = blocks else {
            return Err(multifd::Error::Mismatch(format!(
                "expected one RAM block {BLOCK:?}, the source has {}",
                blocks.len()
            )));
        };
        if b.idstr != BLOCK {
            return Err(multifd::Error::Mismatch(format!(
                "expected RAM block {BLOCK:?}, the source has {:?}",
                b.idstr
            )));
        }
        let machine = (self.make)(b.used_length).map_err(|e| vm_error("creating the VM", e))?;
        let mut ram = GuestRam::new();
        // Fresh anonymous memory: pages never sent read as zero.
        ram.push(RamBlock::from_mmap(
            BLOCK,
            machine.region().clone(),
            Access::ReadWrite,
            true,
        )?)?;
        self.machine = Some(machine);
        Ok(ram)
    }
}

/// What the destination found and did.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// When the guest ran again.
    pub at: SystemTime,
    /// The guest's counters as received (before it ran).
    pub counters: Option<CounterState>,
    /// Markers carried by the device state.
    pub markers: u64,
}

/// Restores the device state delivered with `incoming` into `machine`,
/// checks the counters of `[start, end)` against the markers (when
/// `check` is given), and starts the guest.
pub fn resume_incoming(
    machine: &mut Machine,
    incoming: &Incoming,
    check: Option<(u64, u64)>,
) -> Result<Resumed> {
    let state = incoming
        .device_state()
        .context("reading the device state")?
        .context("the source sent no device state")?;
    machine.restore_state(state)?;
    let markers = machine.markers();
    let counters = match check {
        Some((start, end)) => {
            ensure!(end <= machine.mem_size(), "check range beyond guest RAM");
            let mut mem = vec![0u8; (end - start) as usize];
            machine.read_memory(start, &mut mem)?;
            let s = check_counters(&mem, start).map_err(anyhow::Error::msg)?;
            check_markers(&s, markers).map_err(anyhow::Error::msg)?;
            Some(s)
        }
        None => None,
    };
    machine.start()?;
    let at = SystemTime::now();
    Ok(Resumed {
        at,
        counters,
        markers,
    })
}

/// Pauses `machine`, checks `[start, end)` against its markers, resumes.
pub fn check_running(machine: &Machine, start: u64, end: u64) -> Result<CounterState> {
    machine.pause()?;
    let mut mem = vec![0u8; (end - start) as usize];
    let r = machine.read_memory(start, &mut mem).and_then(|()| {
        let s = check_counters(&mem, start).map_err(anyhow::Error::msg)?;
        check_markers(&s, machine.markers()).map_err(anyhow::Error::msg)?;
        Ok(s)
    });
    machine.resume()?;
    r
}

/// Waits until the guest wrote `more` markers beyond what it has now.
pub fn expect_progress(machine: &Machine, more: u64, timeout: Duration) -> Result<u64> {
    let m = machine.markers();
    if !machine.wait_markers(m + more, timeout) {
        bail!(
            "the guest made no progress: {} markers after {timeout:?} (state {:?})",
            machine.markers(),
            machine.run_state()
        );
    }
    Ok(machine.markers())
}
