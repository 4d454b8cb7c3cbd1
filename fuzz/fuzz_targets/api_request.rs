//! The native API's request decoding and validation (`POST /v1/executions`), exactly as the
//! handler runs it; see `cloude_fuzz::api` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::api::run_v1(data));
