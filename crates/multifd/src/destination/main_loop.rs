//! The destination's main loop (QEMU's `ram_load_precopy()` for a multifd
//! stream): follows the main stream after the block list, holds each sync
//! point until every channel's SYNC arrived, applies legacy ZERO and PAGE
//! records, and keeps the tail after the `ram` section.

use multifd_wire::stream::{Command, Event};

use super::barrier::SyncBarrier;
use super::main_stream::StreamReader;
use crate::config::{FlushMode, MigrationConfig};
use crate::error::{Endpoint, Error, Result};
use crate::ram::{GuestRam, RamBlock};
use crate::stats::Progress;

pub(super) struct MainLoop<'a, 'r> {
    pub(super) reader: &'r mut StreamReader,
    pub(super) ram: &'a GuestRam,
    pub(super) barrier: &'a SyncBarrier,
    pub(super) cfg: &'a MigrationConfig,
    pub(super) progress: &'a Progress,
    /// Sync points seen.
    pub(super) flushes: u64,
    /// Whether SWITCHOVER_START came.
    pub(super) switchover_start: bool,
}

impl MainLoop<'_, '_> {
    fn sync_point(&mut self) -> Result<()> {
        self.barrier.wait_all_and_release()?;
        self.flushes += 1;
        self.progress.add(&self.progress.rounds, 1);
        Ok(())
    }

    fn block(&self, name: &str) -> Result<&RamBlock> {
        self.ram.get(name).ok_or_else(|| Error::UnknownBlock {
            endpoint: Endpoint::Main,
            name: name.to_owned(),
        })
    }

    /// Follows the main stream from after the setup section's block list to
    /// the end; returns the opaque tail.
    pub(super) fn run(&mut self, max_tail: usize, require_vmdesc: bool) -> Result<Vec<u8>> {
        let per_round = self.cfg.flush_mode == FlushMode::PerRound;
        // The rest of the START section: FLUSH (per-round) then EOS.
        let mut in_setup = true;
        let mut setup_flushed = false;
        let mut ended = false;
        loop {
            match self.reader.next()? {
                Event::Flush => {
                    if !per_round {
                        return Err(Error::Mismatch(
                            "source sends MULTIFD_FLUSH records but per-section flushing \
                             (multifd-flush-after-each-section=on) is configured"
                                .into(),
                        ));
                    }
                    if in_setup {
                        setup_flushed = true;
                    }
                    self.sync_point()?;
                }
                Event::Eos => {
                    if in_setup && per_round && !setup_flushed {
                        return Err(Error::Mismatch(
                            "the setup section has no MULTIFD_FLUSH: the source flushes after \
                             each section (multifd-flush-after-each-section=on) but per-round \
                             flushing is configured"
                                .into(),
                        ));
                    }
                    in_setup = false;
                    if !per_round {
                        self.sync_point()?;
                    }
                    if ended {
                        // The last sync point is behind: nothing more may
                        // come on the channels but their end.
                        self.barrier.close()?;
                    }
                }
                Event::Footer { .. } => {
                    if ended {
                        return self.reader.read_tail(max_tail, require_vmdesc);
                    }
                }
                Event::RamPart { .. } => {}
                Event::RamEnd { .. } => ended = true,
                Event::Zero { block, offset } => {
                    self.block(&block)?.page(offset)?.apply_zero()?;
                    self.progress.add(&self.progress.zero_pages, 1);
                }
                Event::Page {
                    block,
                    offset,
                    data,
                } => {
                    let data = data.as_ref().try_into().map_err(|_| {
                        Error::Internal("the decoder gave a PAGE record of wrong size")
                    })?;
                    self.block(&block)?.write_page(offset, data)?;
                    self.progress.add(&self.progress.normal_pages, 1);
                }
                Event::Command(Command::SwitchoverStart) => self.switchover_start = true,
                Event::Command(other) => {
                    return Err(Error::Unsupported(format!(
                        "command {other:?} on the main stream (return-path is not supported)"
                    )));
                }
                Event::DeviceTail | Event::Eof => {
                    return Err(Error::Unsupported(
                        "device state before the end of the ram section".into(),
                    ));
                }
                Event::VmDesc { .. } => {
                    return Err(Error::Unsupported("vmdesc in the main stream".into()));
                }
                Event::Header => {
                    return Err(Error::Unsupported(
                        "a second header in the main stream".into(),
                    ));
                }
                Event::Configuration(_) => {
                    return Err(Error::Unsupported(
                        "a second configuration in the main stream".into(),
                    ));
                }
                Event::RamStart { .. } => {
                    return Err(Error::Unsupported(
                        "a second ram START in the main stream".into(),
                    ));
                }
                Event::MemSize { .. } => {
                    return Err(Error::Unsupported(
                        "a second MEM_SIZE in the main stream".into(),
                    ));
                }
            }
        }
    }
}
