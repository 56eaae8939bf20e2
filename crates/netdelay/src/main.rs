//! `netdelay`: joins two network namespaces with a TUN device in each and
//! forwards IP packets between them at a rate, with a one-way delay of half
//! the round-trip time per direction.
//!
//! It creates the devices, prints `ready` on stdout and forwards until
//! SIGINT or SIGTERM, until either namespace file disappears (`ip netns del`
//! or the owning process exiting) or until a device fails. The caller sets
//! addresses, MTU and routes on the devices (`ip link set DEV up`).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use netdelay::clock::{self, Clock};
use netdelay::forward::{Direction, MAX_WAIT};
use netdelay::link::{Link, LinkParams};
use netdelay::{netns, signals, tun};

#[derive(Parser)]
#[command(about = "A delay line between two network namespaces over TUN devices")]
struct Args {
    /// Source namespace: a name under /run/netns, or a path such as /proc/PID/ns/net.
    #[arg(long)]
    src: String,
    /// Destination namespace, as --src.
    #[arg(long)]
    dst: String,
    /// TUN device created in the source namespace.
    #[arg(long, default_value = "ndsrc")]
    src_dev: String,
    /// TUN device created in the destination namespace.
    #[arg(long, default_value = "nddst")]
    dst_dev: String,
    /// Link rate per direction, as tc writes it: 100mbit, 1gbit, 10gbit, 2500kbit, 64000bit.
    #[arg(long, value_parser = parse_rate)]
    rate: u64,
    /// Round-trip time in milliseconds; each direction delays by half of it.
    #[arg(long)]
    rtt_ms: f64,
    /// Stop sleeping this many microseconds before a packet is due and poll
    /// instead: precise delays for CPU (a busy CPU per direction while packets
    /// are in flight); 0 sleeps to the due time.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let body = lower
        .strip_suffix("bit")
        .ok_or("expected a rate ending in bit, as 100mbit")?;
    let (num, mult) = match body.char_indices().last() {
        Some((i, 'k')) => (&body[..i], 1e3),
        Some((i, 'm')) => (&body[..i], 1e6),
        Some((i, 'g')) => (&body[..i], 1e9),
        _ => (body, 1.0),
    };
    let v: f64 = num.parse().map_err(|e| format!("{s}: {e}"))?;
    let bps = (v * mult).round();
    if !(1.0..1e15).contains(&bps) {
        return Err(format!("{s}: rate out of range"));
    }
    Ok(bps as u64)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    if !(a.rtt_ms.is_finite() && a.rtt_ms >= 0.0) {
        return Err(format!("--rtt-ms {}: expected a non-negative number", a.rtt_ms).into());
    }
    // Before any thread exists, so every thread inherits the mask.
    signals::block()?;
    let (src_ns, dst_ns): (PathBuf, PathBuf) = (netns::resolve(&a.src), netns::resolve(&a.dst));
    let src_tun = netns::within(&src_ns, || tun::create(&a.src_dev))??;
    let dst_tun = netns::within(&dst_ns, || tun::create(&a.dst_dev))??;
    let params = LinkParams {
        rate_bps: a.rate,
        one_way_ns: (a.rtt_ms * 1e6 / 2.0).round() as u64,
    };
    tracing::info!(
        rate_bps = params.rate_bps,
        one_way_ns = params.one_way_ns,
        queue_limit_bytes = params.queue_limit_bytes(),
        "{} in {} <-> {} in {}",
        a.src_dev,
        src_ns.display(),
        a.dst_dev,
        dst_ns.display()
    );
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let stop = AtomicBool::new(false);
    let clock = Clock::new();
    let spin = std::time::Duration::from_micros(a.spin_us);
    let dirs = [
        Direction {
            name: "src->dst".into(),
            input: &src_tun,
            output: &dst_tun,
            link: Link::new(params),
            clock,
            spin,
        },
        Direction {
            name: "dst->src".into(),
            input: &dst_tun,
            output: &src_tun,
            link: Link::new(params),
            clock,
            spin,
        },
    ];
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .into_iter()
            .map(|d| {
                let stop = &stop;
                let name = d.name.clone();
                std::thread::Builder::new()
                    .name(name)
                    .spawn_scoped(s, move || {
                        if !clock::precise_timers() {
                            tracing::warn!(
                                "timer slack not lowered: delays may run up to 50 us long"
                            );
                        }
                        d.run(stop)
                    })
                    .expect("spawning a forwarding thread")
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            if let Some(sig) = signals::wait(MAX_WAIT) {
                tracing::info!("signal {sig}: stopping");
                break;
            }
            if let Some(gone) = [&src_ns, &dst_ns].into_iter().find(|p| !p.exists()) {
                tracing::info!("{} is gone: stopping", gone.display());
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().expect("forwarding thread panicked"))
            .collect::<Vec<_>>()
    });
    let mut failed = None;
    for (dir, r) in ["src->dst", "dst->src"].into_iter().zip(results) {
        match r {
            Ok(st) => {
                let late_us = st.late_ns as f64 / st.delivered.max(1) as f64 / 1e3;
                tracing::info!(
                    delivered = st.delivered,
                    bytes = st.bytes,
                    queue_drops = st.queue_drops,
                    output_drops = st.output_drops,
                    mean_late_us = format_args!("{late_us:.1}"),
                    "direction done {dir}:"
                );
            }
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_as_tc_writes_them() {
        assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("10Gbit"), Ok(10_000_000_000));
        assert_eq!(parse_rate("2.5gbit"), Ok(2_500_000_000));
        assert_eq!(parse_rate("64000bit"), Ok(64_000));
        assert!(parse_rate("100mb").is_err());
        assert!(parse_rate("0bit").is_err());
        assert!(parse_rate("xmbit").is_err());
    }
}
