//! Connections: TCP and Unix sockets addressed by QEMU-style URIs, in the
//! clear or over TLS.
//!
//! A [`Connection`] is one byte stream (a main or multifd channel). It
//! offers vectored writes of [`IoSlice`]s and vectored reads into
//! [`IoSliceMut`]s, so pages go from guest RAM to the socket and back
//! without a copy, and a `shutdown` that makes any blocked read or write on
//! it return: the abort path uses that to stop every thread promptly.

mod activity;
mod conn;
mod connect;
pub(crate) mod iov;
mod listen;
#[cfg(feature = "tls-psk")]
mod psk;
mod socket;
pub(crate) mod sys;
mod tls;
mod uri;

pub(crate) use activity::Activity;
pub use conn::Connection;
pub use iov::{IoSlice, IoSliceMut};
pub use listen::Listener;
pub use tls::{TlsClient, TlsServer};
pub use uri::Uri;
