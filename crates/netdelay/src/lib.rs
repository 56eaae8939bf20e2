//! A userspace delay line between two network namespaces, for kernels
//! without `tc netem`: one TUN device in each namespace, and per direction
//! a link model (serialisation at a rate behind a drop-tail queue, then a
//! one-way delay) that decides when each packet read from one device is
//! written to the other.
//!
//! `unsafe` is confined to the system calls std does not wrap: TUNSETIFF
//! (`tun`), setns (`netns`), ppoll and the timer slack (`clock`), the signal
//! mask and sigtimedwait (`signals`).
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod clock;
pub mod forward;
pub mod link;
#[allow(unsafe_code)]
pub mod netns;
#[allow(unsafe_code)]
pub mod signals;
#[allow(unsafe_code)]
pub mod tun;
