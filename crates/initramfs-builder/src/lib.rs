//! `cloude-image`: the guest kernel build, the language catalogue and initramfs images.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod cli;
pub mod image;
pub mod integrity;
pub mod kernel;
pub mod lock;
pub mod paths;
pub mod progress;
pub mod versions;
