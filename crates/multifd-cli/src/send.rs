//! `multifd send`: migrate RAM images or a stored snapshot to a receiver.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use multifd::snapshot;
use multifd::{Access, GuestRam, RamBlock, SourceOptions, StaticRam, StreamPlan, Uri};

use crate::{Common, parse, parse_ram_args, print_json, summary, trust, with_progress};

/// Options of `multifd send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Receiver: tcp:HOST:PORT or unix:PATH; or a mapped-ram file,
    /// file:PATH[,offset=N] (with --mapped-ram).
    #[arg(long)]
    to: String,
    /// RAM block images, IDSTR=FILE (repeat or comma-separate). With
    /// --snapshot: the files of blocks received outside its directory.
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["snapshot", "mapped_ram_file"])]
    ram: Vec<String>,
    /// Replay a snapshot directory stored by `receive --snapshot`.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Machine type named in the configuration section (without --snapshot).
    #[arg(long, default_value = "none")]
    machine: String,
    /// Leave out SWITCHOVER_START (for machine types <= 9.2).
    #[arg(long)]
    no_switchover_start: bool,
    /// Seconds to try connecting (more than 0): a refused connection is
    /// retried, a host that does not answer fails when the time is up.
    #[arg(long, allow_hyphen_values = true, value_name = "SECS", default_value = "10", value_parser = parse::timeout)]
    connect_timeout: Duration,
    /// Write QEMU's mapped-ram file format (what `migrate file:` writes
    /// with the mapped-ram capability); needed with --to file:.
    #[arg(long)]
    mapped_ram: bool,
    /// Send the migration stored in this mapped-ram file
    /// (PATH or file:PATH[,offset=N]) instead of RAM images.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["ram", "snapshot"])]
    mapped_ram_file: Option<String>,
    #[command(flatten)]
    file_io: crate::file::FileIo,
    #[command(flatten)]
    tls: trust::SourceTls,
    #[command(flatten)]
    common: Common,
}

/// Runs `multifd send`.
pub fn run(a: SendArgs) -> Result<()> {
    let file_target = crate::file::target(&a.to)?;
    if file_target.is_some() != a.mapped_ram {
        anyhow::bail!(
            "--to file:PATH and --mapped-ram go together (a file is written in QEMU's mapped-ram format)"
        );
    }
    let mut config = a.common.config()?;
    config.connect_timeout = a.connect_timeout;
    let (uri, tls): (Option<Uri>, _) = match &file_target {
        Some(_) => {
            if a.tls.is_set() {
                anyhow::bail!("TLS is for network connections; a file target is written as is");
            }
            (None, None)
        }
        None => {
            let uri: Uri = a.to.parse()?;
            let tls = a.tls.client(&uri)?;
            (Some(uri), tls)
        }
    };
    if let (Some(file), Some(uri)) = (&a.mapped_ram_file, &uri) {
        let opts = SourceOptions {
            config,
            tls,
            ..SourceOptions::default()
        };
        return crate::file::play(file, uri, &opts, &a.file_io, &a.common);
    }
    let (ram, plan) = match &a.snapshot {
        Some(dir) => {
            let (ram, plan, _) = snapshot::open(dir, &parse_ram_args(&a.ram)?)
                .with_context(|| format!("opening snapshot {}", dir.display()))?;
            (ram, plan)
        }
        None => {
            let mut ram = GuestRam::new();
            for (id, file) in parse_ram_args(&a.ram)? {
                ram.push(
                    RamBlock::open_file(&id, &file, Access::ReadOnly, None)
                        .with_context(|| format!("opening RAM image {}", file.display()))?,
                )?;
            }
            let plan = StreamPlan {
                machine: a.machine.clone(),
                switchover_start: !a.no_switchover_start,
                ..StreamPlan::default()
            };
            (ram, plan)
        }
    };
    let opts = SourceOptions {
        config: config.clone(),
        plan,
        tls,
        ..SourceOptions::default()
    };
    let Some(uri) = uri else {
        let target = file_target.expect("a file target when there is no URI");
        return crate::file::save(&target, &ram, &opts, &a.file_io, &a.common);
    };
    let (result, rss_mib) =
        with_progress(a.common.quiet || a.common.json, ram.total_len(), |p, _| {
            multifd::migrate(&uri, &ram, &mut StaticRam, &opts, p)
        });
    let stats = result.with_context(|| format!("migrating to {uri}"))?;
    if a.common.json {
        print_json("send", &stats, &config, rss_mib, Some(ram.page_size()));
    } else if !a.common.quiet {
        summary("sent", &stats, rss_mib);
    }
    Ok(())
}
