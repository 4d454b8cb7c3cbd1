//! The image crate's cpio newc reader; see `cloude_fuzz::cpio`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::cpio::run(data));
