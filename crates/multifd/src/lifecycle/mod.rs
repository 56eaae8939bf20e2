//! How a migration's threads live and end, on both wings: the first-error
//! latch that tears everything down ([`Abort`]), cancellation from outside
//! ([`Cancel`]), the idle watchdog, and thread spawning that turns a panic
//! into an error like any other.

mod abort;
mod cancel;
mod spawn;
mod watchdog;

pub(crate) use abort::{Abort, Wake};
pub use cancel::Cancel;
pub(crate) use cancel::watched;
pub(crate) use spawn::{catch_panic, spawn};
pub(crate) use watchdog::Watchdog;
