//! A userspace delay line between two network namespaces, for kernels
//! without `tc netem`: one TUN device in each namespace, and per direction
//! a link model (serialisation at a rate behind a drop-tail queue, then a
//! one-way delay) that decides when each packet read from one device is
//! written to the other.

pub mod clock;
pub mod forward;
pub mod link;
pub mod netns;
pub mod signals;
pub mod tun;
