//! Fuzzes the VMM's guest-facing parsers: split-virtqueue chain walking and vsock headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_vmm::devices::virtio::fuzzing::parse_rings(data));
