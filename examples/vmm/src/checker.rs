//! Checker for the RAM of the `guest/loop.asm` guest (the same checker as
//! the QEMU live tests, crates/multifd-cli/tests/common/checker.rs).
//!
//! The guest loops forever over a range of pages, incrementing byte 0 of
//! every page in ascending order, one pass after another. A consistent copy
//! of its RAM (taken while the vCPU was stopped) therefore shows either the
//! same counter in every page, or exactly one step: the pass in progress
//! has already incremented a prefix of the pages to `v+1` (mod 256) while
//! the rest still hold `v`. Anything else (a page from an older or newer
//! round, a lost page, garbage) means the migration did not deliver a
//! consistent image. The other 4095 bytes of every page must stay zero.

/// Page size of the counters.
const PAGE: u64 = 4096;

/// What a valid range looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterState {
    /// Counter of the pages not yet incremented in the pass in progress.
    pub value: u8,
    /// How many leading pages already hold `value + 1` (0: all equal).
    pub advanced: usize,
    /// Pages checked.
    pub pages: usize,
}

impl CounterState {
    /// Number of page increments done since all pages were zero, modulo
    /// `256 * pages` (for comparing two states of one run).
    pub fn progress(&self) -> u64 {
        u64::from(self.value) * self.pages as u64 + self.advanced as u64
    }
}

fn runs(c: &[u8]) -> String {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=c.len() {
        if i == c.len() || c[i] != c[start] {
            out.push(format!("pages {start}..{i}={}", c[start]));
            start = i;
        }
        if out.len() >= 12 {
            out.push("...".into());
            break;
        }
    }
    out.join(", ")
}

/// Checks the counter pages of `mem`, a copy of the guest range starting at
/// a page boundary (`base` is its guest-physical address, for messages).
pub fn check_counters(mem: &[u8], base: u64) -> Result<CounterState, String> {
    let page = PAGE as usize;
    if mem.is_empty() || !mem.len().is_multiple_of(page) {
        return Err(format!(
            "range of {} bytes is not a whole number of pages",
            mem.len()
        ));
    }
    for (i, p) in mem.chunks(page).enumerate() {
        if let Some(j) = p[1..].iter().position(|&b| b != 0) {
            return Err(format!(
                "page {:#x}: byte {} is {:#04x}, expected 0 (only byte 0 is a counter)",
                base + i as u64 * PAGE,
                j + 1,
                p[j + 1]
            ));
        }
    }
    let c: Vec<u8> = mem.chunks(page).map(|p| p[0]).collect();
    let pages = c.len();
    let first = c[0];
    let Some(k) = c.iter().position(|&x| x != first) else {
        return Ok(CounterState {
            value: first,
            advanced: 0,
            pages,
        });
    };
    let v = c[k];
    let tail_ok = c[k..].iter().all(|&x| x == v);
    if first == v.wrapping_add(1) && tail_ok {
        return Ok(CounterState {
            value: v,
            advanced: k,
            pages,
        });
    }
    Err(format!(
        "counters at {base:#x} are not one pass (a prefix at v+1, the rest at v): {}",
        runs(&c)
    ))
}

/// Checks that counters agree with a marker count: after `markers` passes
/// every counter is `markers` (mod 256) with a prefix of the pass in
/// progress one ahead, or all are `markers + 1` when the pass ended but its
/// marker was not written yet.
pub fn check_markers(s: &CounterState, markers: u64) -> Result<(), String> {
    let ok = s.value == markers as u8 || (s.value == (markers + 1) as u8 && s.advanced == 0);
    if ok {
        Ok(())
    } else {
        Err(format!("counters {s:?} do not match {markers} markers"))
    }
}
