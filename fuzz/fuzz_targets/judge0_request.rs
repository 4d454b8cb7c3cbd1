//! Judge0 submission decoding and validation (`POST /submissions`), exactly as the handler runs
//! it, with and without `base64_encoded`; see `cloude_fuzz::api` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::api::run_judge0(data));
