//! Judge0 `additional_files` (a zip from the client) unpacked under caps; see
//! `cloude_fuzz::api::run_judge0_zip` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::api::run_judge0_zip(data));
