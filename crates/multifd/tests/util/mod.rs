//! Shared helpers of the integration tests. Each binary uses a subset.
//!
//! - [`leak`]: one test at a time, and thread and fd counts checked
//!   against a baseline after every case;
//! - [`transport`]: loopback TCP and Unix listeners, raw client sockets;
//! - [`ram`]: destination RAM providers, source contents, a dirtying guest;
//! - [`wire`]: hand-made main-stream and channel bytes;
//! - [`peer`]: a scripted source that writes those bytes;
//! - [`receiver`]: the real receiver on a watched thread;
//! - [`scenario`]: a receiver against a scripted peer, in a few lines;
//! - [`proxy`]: a fault-injecting proxy for real sender/receiver pairs;
//! - [`errors`]: how errors are printed, classified and asserted;
//! - [`pki`]: throw-away TLS credentials in QEMU's directory layout;
//! - [`rng`]: a small PRNG and the seed of randomised tests.
#![allow(dead_code, missing_docs)]

mod errors;
mod leak;
mod peer;
mod pki;
mod proxy;
mod ram;
mod receiver;
mod rng;
mod scenario;
mod transport;
mod wire;

// Each test binary uses a subset of these.
#[allow(unused_imports)]
pub use self::{
    errors::*, leak::*, peer::*, pki::*, proxy::*, ram::*, receiver::*, rng::*, scenario::*,
    transport::*, wire::*,
};

use std::time::Duration;

/// Every bound asserted by the tests: an error must surface within this.
pub const FAST: Duration = Duration::from_secs(5);
