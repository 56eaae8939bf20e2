//! The synchronisation primitives of the hand-off, abort and teardown
//! protocol (`source/dispatch.rs`, `lifecycle/abort.rs`,
//! `lifecycle/cancel.rs`, `destination/barrier.rs`): std's, or loom's when
//! built with `--cfg loom`, so the model checker explores every
//! interleaving of the real types.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Runs `f` under the loom model checker in every interleaving within a
/// preemption bound of 3 (the bound every model of the protocol uses).
#[cfg(all(test, loom))]
pub(crate) fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}
