//! Playing a mapped-ram file to a network destination: the file is
//! restored into anonymous memory (present pages read in parallel, absent
//! pages left as fresh zero memory, stale bytes of absent pages never
//! read), then migrated like any image by the network source, with the
//! file's own configuration (without `mapped-ram`), `ram` section id and
//! device state, so a QEMU destination started like the source loads it.

use super::read::{ReadLimits, read_file};
use super::restore::{RestoreOptions, load_pages};
use super::{FileOptions, FileUri};
use crate::error::Result;
use crate::ram::{GuestRam, RamBlock};
use crate::source::{SourceOptions, StaticRam, StreamPlan, migrate};
use crate::stats::{Progress, Stats};
use crate::transport::Uri;

/// Sends the migration stored in the mapped-ram file `file` to the
/// receiver at `to` (a QEMU destination with `migrate-incoming`, multifd
/// on, mapped-ram off; or ours). `opts` are the network source's; its
/// plan is replaced by the file's. Reading uses `opts.config.channels`
/// threads. Memory: the guest's RAM size, in anonymous memory, so a file
/// announcing more than `limits.max_ram` is [`Error::RamLimit`](crate::Error::RamLimit)
/// before any is made.
pub fn play(
    file: &FileUri,
    to: &Uri,
    opts: &SourceOptions,
    file_opts: &FileOptions,
    limits: &ReadLimits,
    progress: &Progress,
) -> Result<Stats> {
    let image = read_file(file, limits)?;
    let mut ram = GuestRam::new();
    for b in &image.blocks {
        ram.push(RamBlock::anonymous(&b.idstr, b.used_length)?)?;
    }
    let indices: Vec<usize> = (0..image.blocks.len()).collect();
    let restore = RestoreOptions {
        channels: opts.config.channels,
        file: file_opts.clone(),
        cancel: opts.cancel.clone(),
        ..RestoreOptions::default()
    };
    load_pages(file, &image, &ram, &indices, &restore, &Progress::default())?;
    let plan = StreamPlan {
        prefix: Some(image.network_prefix()?),
        machine: image.configuration.machine.clone(),
        ram_section_id: image.ram_section_id,
        switchover_start: image.switchover_start,
        tail: Some(image.tail.clone()),
    };
    let opts = SourceOptions {
        plan,
        ..opts.clone()
    };
    migrate(to, &ram, &mut StaticRam, &opts, progress)
}
