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
    /// Receiver: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    /// RAM block images, IDSTR=FILE (repeat or comma-separate). With
    /// --snapshot: the files of blocks received outside its directory.
    #[arg(long, value_delimiter = ',', required_unless_present = "snapshot")]
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
    #[command(flatten)]
    tls: trust::SourceTls,
    #[command(flatten)]
    common: Common,
}

/// Runs `multifd send`.
pub fn run(a: SendArgs) -> Result<()> {
    let uri: Uri = a.to.parse()?;
    let mut config = a.common.config()?;
    config.connect_timeout = a.connect_timeout;
    let tls = a.tls.client(&uri)?;
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
    let (result, rss_mib) =
        with_progress(a.common.quiet || a.common.json, ram.total_len(), |p, _| {
            multifd::migrate(&uri, &ram, &mut StaticRam, &opts, p)
        });
    let stats = result.with_context(|| format!("migrating to {uri}"))?;
    if a.common.json {
        print_json("send", &stats, &config, rss_mib);
    } else if !a.common.quiet {
        summary("sent", &stats, rss_mib);
    }
    Ok(())
}
