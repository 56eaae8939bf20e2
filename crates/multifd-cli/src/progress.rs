//! A progress bar on stderr, drawn from the engine's counters by a thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multifd::Progress;

use crate::rss::RssMeter;

/// Draws `progress` until `done` is set; samples memory while at it.
/// `total_bytes` sizes the bar (guest RAM size; 0 when unknown).
pub fn watch(
    progress: &Progress,
    done: &AtomicBool,
    total_bytes: &std::sync::atomic::AtomicU64,
    rss: &RssMeter,
    quiet: bool,
) {
    let start = Instant::now();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut shown = false;
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        rss.sample();
        if quiet {
            continue;
        }
        if !shown && start.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        let total = total_bytes.load(Ordering::Relaxed);
        if total > 0 {
            bar.set_length(total);
        }
        let pages = progress.pages_done();
        bar.set_position((pages * 4096).min(total.max(pages * 4096)));
        bar.set_message(format!(
            "round {} | {} on the wire",
            progress.rounds.load(Ordering::Relaxed),
            bytesize::ByteSize(progress.bytes.load(Ordering::Relaxed))
        ));
    }
    rss.sample();
    bar.finish_and_clear();
}
