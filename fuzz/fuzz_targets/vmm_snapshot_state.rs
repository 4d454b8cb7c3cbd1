//! Fuzzes the VMM's snapshot state file decoder (a restore reads files it did not write).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_vmm::snapshot::fuzz_decode(data));
