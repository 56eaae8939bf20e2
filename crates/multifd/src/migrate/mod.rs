//! Drivers: the precopy source and the destination.

pub mod source;
