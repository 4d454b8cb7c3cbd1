//! Piston v2 request decoding and validation (`POST /api/v2/execute`), exactly as the handler
//! runs it; see `cloude_fuzz::api` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::api::run_piston(data));
