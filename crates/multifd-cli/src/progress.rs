//! A progress bar on stderr, drawn from the engine's counters by a thread.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multifd::Progress;

use crate::rss::RssMeter;

/// How often the bar is redrawn and memory sampled.
const TICK: Duration = Duration::from_millis(50);

/// Draws `progress` until `done` disconnects (its sender is dropped, which
/// ends the wait at once: the caller's exit is never delayed by a tick);
/// samples memory while at it. `total_bytes` sizes the bar (guest RAM
/// size; 0 when unknown).
pub fn watch(
    progress: &Progress,
    done: Receiver<()>,
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
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(TICK) {
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
