//! `WriteTracker` (userfaultfd asynchronous write-protect + PAGEMAP_SCAN)
//! against real writes: anonymous memory, a shared tmpfs file, a shared
//! file on a disk filesystem; exact reports round after round, and no
//! lost write while a writer thread races with the collects.
//!
//! Needs Linux 6.7+. On an older kernel every test prints SKIPPED (and
//! fails when `CI` is set, where the kernel is known to be recent).

use std::collections::{BTreeSet, HashSet};
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use multifd::{WriteTracker, WriteTrackerError};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

const PAGE: u64 = 4096;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn anon(pages: u64) -> Arc<MmapRegion> {
    Arc::new(MmapRegion::new((pages * PAGE) as usize).expect("mmap"))
}

fn shared_file(dir: &Path, pages: u64) -> Arc<MmapRegion> {
    let path = dir.join("ram");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("ram file");
    file.set_len(pages * PAGE).expect("size");
    // Some data in the file before tracking starts: not reported.
    std::fs::write(&path, vec![7u8; 3 * PAGE as usize]).expect("prefill");
    file.set_len(pages * PAGE).expect("size");
    Arc::new(
        MmapRegion::from_file(FileOffset::new(file, 0), (pages * PAGE) as usize).expect("mmap"),
    )
}

fn write_page(region: &MmapRegion, off: u64, v: u8) {
    region
        .get_ref::<u8>(off as usize + (v as usize % 64))
        .expect("in range")
        .store(v);
}

fn read_page(region: &MmapRegion, off: u64) -> u8 {
    region.get_ref::<u8>(off as usize).expect("in range").load()
}

/// A tracker, or None (after a loud note) where the kernel cannot.
fn tracker(region: &Arc<MmapRegion>) -> Option<WriteTracker> {
    match WriteTracker::new(region.clone()) {
        Ok(t) => Some(t),
        Err(e @ WriteTrackerError::Unsupported { .. }) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "write tracking unsupported under CI: {e}"
            );
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("WriteTracker::new: {e}"),
    }
}

fn collect(t: &mut WriteTracker) -> Vec<u64> {
    let mut v = Vec::new();
    let n = t.collect(&mut v).expect("collect");
    assert_eq!(n, v.len());
    assert!(v.windows(2).all(|w| w[0] < w[1]), "not ascending: {v:?}");
    v
}

/// Rounds of random writes (and reads), each collect reports exactly the
/// pages written in that round.
fn exact_rounds(region: &Arc<MmapRegion>, what: &str) {
    let Some(mut t) = tracker(region) else { return };
    let pages = region.size() as u64 / PAGE;
    assert_eq!(
        collect(&mut t),
        Vec::<u64>::new(),
        "{what}: nothing written yet"
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ pages);
    for round in 0..8u64 {
        let mut want = BTreeSet::new();
        let writes = 1 + rng.next() % (pages / 2);
        for _ in 0..writes {
            let off = (rng.next() % pages) * PAGE;
            write_page(region, off, round as u8 + 1);
            want.insert(off);
        }
        // Reads of other pages are not writes.
        for _ in 0..16 {
            let _ = read_page(region, (rng.next() % pages) * PAGE);
        }
        if round == 3 {
            // A write to the first and last page, and a run across the middle.
            for off in [0, (pages - 1) * PAGE] {
                write_page(region, off, 9);
                want.insert(off);
            }
        }
        let got: BTreeSet<u64> = collect(&mut t).into_iter().collect();
        assert_eq!(got, want, "{what}: round {round}");
        assert!(
            collect(&mut t).is_empty(),
            "{what}: round {round}: second collect"
        );
    }
}

#[test]
fn anonymous_memory_exact_rounds() {
    exact_rounds(&anon(1024), "anonymous");
}

#[test]
fn shared_tmpfs_file_exact_rounds() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm");
    exact_rounds(&shared_file(dir.path(), 1024), "tmpfs MAP_SHARED");
}

#[test]
fn shared_disk_file_exact_rounds() {
    // Asynchronous write-protect accepts any memory type (Linux 6.7+), so
    // a plain file on a disk filesystem works too.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    exact_rounds(&shared_file(dir.path(), 512), "disk MAP_SHARED");
}

#[test]
fn a_second_tracker_on_the_same_range_is_refused() {
    let region = anon(16);
    let Some(_t) = tracker(&region) else { return };
    let e = WriteTracker::new(region.clone()).unwrap_err();
    assert!(matches!(e, WriteTrackerError::InvalidRange { .. }), "{e}");
    // Dropping the first unregisters: a new one can be made.
    drop(_t);
    WriteTracker::new(region).expect("after drop");
}

#[test]
fn a_read_only_file_mapping_is_refused() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm");
    let path = dir.path().join("ro");
    std::fs::write(&path, vec![0u8; 4 * PAGE as usize]).expect("file");
    let file = std::fs::File::open(&path).expect("open");
    let region = Arc::new(
        MmapRegion::<()>::build(
            Some(FileOffset::new(file, 0)),
            4 * PAGE as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
        )
        .expect("mmap"),
    );
    match WriteTracker::new(region) {
        Err(WriteTrackerError::InvalidRange { .. }) => {}
        Err(WriteTrackerError::Unsupported { .. }) => eprintln!("SKIPPED: unsupported kernel"),
        other => panic!("expected InvalidRange, got {other:?}"),
    }
}

/// A writer thread races with the collects. Every write is logged with the
/// collect epoch read before it started and after it completed; the write
/// must be reported by a collect in `[before, after + 1]` (the collect in
/// progress when it started, up to the first one to start after it
/// completed). Only even pages are written: an odd page reported would be
/// a false positive.
fn concurrent(region: &Arc<MmapRegion>, what: &str) {
    let Some(mut t) = tracker(region) else { return };
    let pages = region.size() as u64 / PAGE;
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(u64, u64, u64)>();
    let writer = {
        let (region, epoch, stop) = (region.clone(), epoch.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(42);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (rng.next() % (pages / 2)) * 2 * PAGE;
                let before = epoch.load(Ordering::SeqCst);
                write_page(&region, off, n as u8);
                fence(Ordering::SeqCst);
                let after = epoch.load(Ordering::SeqCst);
                tx.send((off, before, after)).expect("log");
                n += 1;
            }
            n
        })
    };
    // reports[k]: pages reported by collect k (collect 0 = tracker creation).
    let mut reports: Vec<HashSet<u64>> = vec![HashSet::new()];
    let t0 = Instant::now();
    let mut collect_time = Duration::ZERO;
    while t0.elapsed() < Duration::from_millis(800) {
        std::thread::sleep(Duration::from_micros(500 + reports.len() as u64 % 7 * 300));
        epoch.fetch_add(1, Ordering::SeqCst);
        let c = Instant::now();
        let got = collect(&mut t);
        collect_time += c.elapsed();
        reports.push(got.into_iter().collect());
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    // The final collect, after every write completed.
    epoch.fetch_add(1, Ordering::SeqCst);
    reports.push(collect(&mut t).into_iter().collect());
    let last = reports.len() as u64 - 1;

    let mut responsible: Vec<HashSet<u64>> = vec![HashSet::new(); reports.len()];
    let mut logged = 0u64;
    for (off, before, after) in rx.try_iter() {
        logged += 1;
        let window = before..=(after + 1).min(last);
        assert!(
            window.clone().any(|k| reports[k as usize].contains(&off)),
            "{what}: write of page {} (collects {before}..{after}) lost: \
             not reported by collects {window:?}",
            off / PAGE
        );
        for k in window {
            responsible[k as usize].insert(off);
        }
    }
    assert_eq!(logged, writes);
    for (k, got) in reports.iter().enumerate() {
        for off in got {
            assert!(
                responsible[k].contains(off),
                "{what}: collect {k} reported page {} that no write explains",
                off / PAGE
            );
        }
    }
    let reported: usize = reports.iter().map(HashSet::len).sum();
    eprintln!(
        "{what}: {writes} writes, {} collects ({:.1} us each), {reported} pages reported",
        reports.len() - 1,
        collect_time.as_secs_f64() * 1e6 / (reports.len() - 2) as f64
    );
    assert!(
        writes > 1000,
        "{what}: the writer barely ran ({writes} writes)"
    );
}

#[test]
fn concurrent_writer_anonymous() {
    concurrent(&anon(4096), "anonymous");
}

#[test]
fn concurrent_writer_tmpfs() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm");
    concurrent(&shared_file(dir.path(), 4096), "tmpfs MAP_SHARED");
}

/// Collect cost, printed per GiB: clean (nothing written) and fully
/// written. Run with `--nocapture` to see the figures.
#[test]
fn collect_cost_per_gib() {
    const PAGES: u64 = 65536; // 256 MiB
    let region = anon(PAGES);
    for p in 0..PAGES {
        write_page(&region, p * PAGE, 1);
    }
    let Some(mut t) = tracker(&region) else {
        return;
    };
    let per_gib = |d: Duration| d.as_secs_f64() * 1e3 * (1 << 30) as f64 / (PAGES * PAGE) as f64;
    let c = Instant::now();
    assert!(collect(&mut t).is_empty());
    let clean = c.elapsed();
    let w = Instant::now();
    for p in 0..PAGES {
        write_page(&region, p * PAGE, 2);
    }
    let write_faults = w.elapsed();
    let c = Instant::now();
    assert_eq!(collect(&mut t).len() as u64, PAGES);
    let dirty = c.elapsed();
    // Every 8th page: worst case for region merging.
    for p in (0..PAGES).step_by(8) {
        write_page(&region, p * PAGE, 3);
    }
    let c = Instant::now();
    assert_eq!(collect(&mut t).len() as u64, PAGES / 8);
    let sparse = c.elapsed();
    eprintln!(
        "collect per GiB: clean {:.2} ms, all written {:.2} ms, every 8th page {:.2} ms; \
         first write to a protected page {:.2} us",
        per_gib(clean),
        per_gib(dirty),
        per_gib(sparse),
        write_faults.as_secs_f64() * 1e6 / PAGES as f64
    );
}
