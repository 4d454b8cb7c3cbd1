//! Fuzzes the VMM's virtio-blk device: guest-controlled descriptor tables, rings and requests
//! served against a read-only and a read-write disk (`cloude_vmm::devices::virtio::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cloude_vmm::devices::virtio::fuzzing::block_requests(data);
});
