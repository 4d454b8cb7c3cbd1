//! Emulated devices and the buses that route vCPU exits to them.

pub mod bus;
pub mod legacy;
pub mod pace;
pub mod slots;
pub mod virtio;

pub use bus::{Bus, BusDevice};
