//! The guest RAM checker lives in the example crate (`checker`), where the
//! VMM's `--incoming` uses it too.
pub use multifd_example_vmm::checker::*;
