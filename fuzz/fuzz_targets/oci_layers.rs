//! The image builder's layer flattening: one or two tar layers applied in order, then the cpio
//! round trip; see `cloude_fuzz::oci` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::oci::run(data));
