//! The agent's request decoding: any bytes -> RunRequest parse -> validate, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::agent_protocol(data));
