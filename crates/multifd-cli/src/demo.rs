//! `multifd demo`: the built-in default job. Generates a guest RAM image,
//! migrates it over loopback TCP from a sender to a receiver in this
//! process, checks the copy is byte-identical, prints a summary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use multifd::snapshot::FileRamProvider;
use multifd::{
    Access, GuestRam, Listener, MigrationConfig, Progress, RamBlock, ReceiveOptions, SourceOptions,
    StaticRam, Uri,
};

use crate::image;

/// Options of `multifd demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM size, a multiple of 4096 bytes.
    #[arg(long, allow_hyphen_values = true, default_value = "1GiB", value_parser = crate::parse::ram_size)]
    size: bytesize::ByteSize,
    /// Number of multifd channels, 1-255.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// Where to put the image and its copy (removed afterwards).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> Result<()> {
    let tag = std::process::id();
    let src_path = a.dir.join(format!("multifd-demo-{tag}-src.img"));
    let dst_path = a.dir.join(format!("multifd-demo-{tag}-dst.img"));
    let _cleanup = Cleanup(vec![src_path.clone(), dst_path.clone()]);
    eprintln!(
        "generating a {} guest RAM image: 40% zero, 40% compressible, 20% random pages",
        a.size
    );
    image::generate(&src_path, a.size.as_u64(), image::Mix::default(), 42)?;

    let mut src = GuestRam::new();
    src.push(RamBlock::open_file(
        "m0",
        &src_path,
        Access::ReadOnly,
        None,
    )?)?;
    let config = MigrationConfig {
        channels: a.channels,
        ..MigrationConfig::default()
    };
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse::<Uri>()?)?;
    let uri = listener.local_uri()?;
    let mut provider = FileRamProvider::new(
        [("m0".to_owned(), dst_path.clone())].into_iter().collect(),
        None,
        false,
    )?;
    eprintln!("migrating over {uri} with {} channels", a.channels);
    let recv_progress = Progress::default();
    let ropts = ReceiveOptions {
        config: config.clone(),
        accept_timeout: Some(Duration::from_secs(10)),
        ..ReceiveOptions::default()
    };
    let sopts = SourceOptions {
        config,
        ..SourceOptions::default()
    };
    let ((sent, received), rss) = crate::with_progress(false, src.total_len(), |p, _| {
        std::thread::scope(|s| {
            let receiver =
                s.spawn(|| multifd::receive(&listener, &ropts, &mut provider, &recv_progress));
            let sent = multifd::migrate(&uri, &src, &mut StaticRam, &sopts, p);
            let received = receiver.join().expect("receiver thread");
            (sent, received)
        })
    });
    let sent = sent.context("sending")?;
    let received = received.context("receiving")?;
    let dst = received.ram.get("m0").context("received RAM")?;
    let (mut x, mut y) = ([0u8; 4096], [0u8; 4096]);
    let block = &src.blocks()[0];
    for p in 0..block.pages() {
        block.read_page(p * 4096, &mut x)?;
        dst.read_page(p * 4096, &mut y)?;
        if x != y {
            bail!("page {:#x} differs after the migration", p * 4096);
        }
    }
    crate::summary("sent", &sent, rss);
    eprintln!(
        "guest RAM pages: {} KiB at the source, {} KiB at the destination (4 KiB on the wire)",
        src.page_size() / 1024,
        received.ram.page_size() / 1024
    );
    eprintln!(
        "verified: all {} pages byte-identical ({} as data, {} as zero pages)",
        block.pages(),
        received.stats.normal_pages,
        received.stats.zero_pages
    );
    Ok(())
}
