//! The E2B face's Connect envelopes and envd messages, and the agent's sandbox-process requests;
//! see `cloude_fuzz::e2b_messages`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::e2b_messages(data));
