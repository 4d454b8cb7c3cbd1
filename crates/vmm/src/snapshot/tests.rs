//! State file round trip and every refusal.

use super::*;
use crate::devices::virtio::block::DiskState;
use crate::devices::virtio::mmio::QueueSnap;
use crate::devices::virtio::{TYPE_BLOCK, TYPE_RNG, TYPE_VSOCK};

/// A plausible state: two vCPUs, a read-only disk, rng and vsock.
pub(crate) fn sample_state() -> VmState {
    let vcpu = |i: u64| VcpuState {
        cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        }],
        msrs: vec![
            kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 123_456_789 + i,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: 0x4b56_4d01,
                data: 0x1000 | 1,
                ..Default::default()
            },
        ],
        regs: kvm_bindings::kvm_regs {
            rip: 0x1000 + i,
            rax: 42,
            ..Default::default()
        },
        sregs: Default::default(),
        // SAFETY: kvm_xsave is plain integers; all-zero is a valid value.
        xsave: unsafe { std::mem::zeroed() },
        xcrs: Default::default(),
        // SAFETY: kvm_lapic_state is plain integers; all-zero is a valid value.
        lapic: unsafe { std::mem::zeroed() },
        mp_state: Default::default(),
        events: Default::default(),
        debug_regs: Default::default(),
        tsc_khz: Some(2_000_000),
    };
    let q = |max: u16| QueueSnap {
        max_size: max,
        size: 128,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
        next_avail: 7,
        next_used: 7,
    };
    let mmio = |t: u32, n: usize| MmioState {
        device_type: t,
        features_acked: 1 << 32,
        device_features_sel: 1,
        driver_features_sel: 1,
        queue_sel: 0,
        status: 0xf,
        config_generation: 0,
        activated: true,
        device_active: true,
        interrupt_status: 0,
        needs_reset: false,
        queues: (0..n).map(|_| q(256)).collect(),
    };
    VmState {
        vmm_version: VMM_VERSION.into(),
        tag: Some("bash-5.2".into()),
        mem_size: 256 << 20,
        vcpus: vec![vcpu(0), vcpu(1)],
        vm: KvmVmState {
            // SAFETY: kvm_irqchip is plain integers (and a union of them); zero is valid.
            pic_master: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            pic_slave: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            ioapic: unsafe { std::mem::zeroed() },
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 5_000_000_000,
                ..Default::default()
            },
        },
        devices: DevicesState {
            serial: SerialState {
                line_status: 0x60,
                in_buffer: vec![b'a', b'b'],
                ..Default::default()
            },
            i8042: (),
            virtio: vec![mmio(TYPE_BLOCK, 1), mmio(TYPE_RNG, 1), mmio(TYPE_VSOCK, 3)],
            disks: vec![DiskState {
                size: 64 << 20,
                read_only: true,
            }],
        },
    }
}

fn expect_for(s: &VmState) -> Expect {
    Expect {
        mem_size: s.mem_size,
        vcpus: s.vcpus.len(),
        devices: s.devices.virtio.iter().map(|d| d.device_type).collect(),
        disks: s.devices.disks.clone(),
        tag: s.tag.clone(),
    }
}

#[test]
fn state_round_trips() {
    let s = sample_state();
    let bytes = encode(&s).expect("encode");
    assert_eq!(&bytes[..8], &MAGIC);
    let back = decode(&bytes).expect("decode");
    assert_eq!(encode(&back).expect("encode"), bytes, "bit-identical");
    assert_eq!(back.vcpus[1].regs.rip, 0x1001);
    assert_eq!(back.vcpus[0].msrs[0].data, 123_456_789);
    assert_eq!(back.devices, s.devices);
    assert_eq!(back.vm.clock.clock, 5_000_000_000);
    check_shape(&back, &expect_for(&s), s.mem_size).expect("fits");
    if let Ok(path) = std::env::var("CLOUDE_WRITE_STATE_SEED") {
        std::fs::write(path, &bytes).expect("write seed");
    }
}

#[test]
fn truncated_files_are_refused_at_every_offset() {
    let bytes = encode(&sample_state()).expect("encode");
    let len = bytes.len();
    for cut in [0, 1, 7, 8, 12, 20, 23, 24, 25, len / 2, len - 1] {
        let r = decode(&bytes[..cut]);
        assert!(
            matches!(r, Err(Refusal::Truncated(..))),
            "cut at {cut}: {:?}",
            r.err()
        );
    }
    let mut longer = bytes.clone();
    longer.push(b' ');
    assert!(matches!(decode(&longer), Err(Refusal::Trailing(1))));
}

#[test]
fn flipped_bytes_are_refused() {
    let bytes = encode(&sample_state()).expect("encode");
    for at in [0, 5, 9, 13, 21, 24, 100, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x20;
        let r = decode(&b);
        assert!(r.is_err(), "flip at {at} accepted");
        let e = r.err().expect("error").to_string();
        assert!(!e.contains('\n'), "{e}");
    }
    let mut b = bytes.clone();
    b[HEADER_LEN + 10] ^= 1;
    assert!(matches!(decode(&b), Err(Refusal::Checksum)));
    let mut b = bytes;
    b[0] = b'X';
    assert!(matches!(decode(&b), Err(Refusal::Magic)));
    assert!(matches!(decode(b"\x7fELF"), Err(Refusal::Magic)));
}

/// Re-frames `body` with a correct header and checksum.
fn frame(version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

#[test]
fn other_versions_and_oversized_lists_are_refused() {
    let bytes = encode(&sample_state()).expect("encode");
    let body = &bytes[HEADER_LEN..];
    assert!(matches!(
        decode(&frame(FORMAT_VERSION + 1, body)),
        Err(Refusal::FormatVersion(2))
    ));
    let mut s = sample_state();
    s.vmm_version = "0.0.1-other".into();
    assert!(matches!(
        decode(&encode(&s).expect("encode")),
        Err(Refusal::VmmVersion(v)) if v == "0.0.1-other"
    ));
    let mut s = sample_state();
    s.devices.serial.in_buffer = vec![0; MAX_SERIAL_FIFO + 1];
    assert!(matches!(
        decode(&encode(&s).expect("encode")),
        Err(Refusal::Cap(..))
    ));
    let mut s = sample_state();
    s.devices.disks = vec![s.devices.disks[0]; MAX_DISKS + 1];
    assert!(matches!(
        decode(&encode(&s).expect("encode")),
        Err(Refusal::Cap(5, "disks", 4))
    ));
    let mut s = sample_state();
    let e = s.vcpus[0].msrs[0];
    s.vcpus[0].msrs = vec![e; MAX_MSRS + 1];
    assert!(matches!(
        decode(&encode(&s).expect("encode")),
        Err(Refusal::Cap(..))
    ));
    // A huge declared length is refused before anything is read or allocated.
    let mut huge = bytes.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(decode(&huge), Err(Refusal::TooLarge(_))));
    // Valid framing around JSON that is not a state.
    assert!(matches!(
        decode(&frame(FORMAT_VERSION, b"{\"x\":1}")),
        Err(Refusal::Decode(_))
    ));
}

#[test]
fn other_shapes_and_tags_are_refused() {
    let s = sample_state();
    let ok = expect_for(&s);
    let check = |e: Expect, file: u64| check_shape(&s, &e, file);
    assert!(matches!(
        check(
            Expect {
                mem_size: 512 << 20,
                ..ok.clone()
            },
            s.mem_size
        ),
        Err(Refusal::MemorySize {
            have: 256,
            want: 512
        })
    ));
    assert!(matches!(
        check(
            Expect {
                vcpus: 1,
                ..ok.clone()
            },
            s.mem_size
        ),
        Err(Refusal::Vcpus { have: 2, want: 1 })
    ));
    let r = check(
        Expect {
            devices: vec![TYPE_BLOCK, TYPE_RNG],
            ..ok.clone()
        },
        s.mem_size,
    );
    assert_eq!(
        r.expect_err("refused").to_string(),
        "the snapshot's devices are [block, rng, vsock], this VM's are [block, rng]"
    );
    // No disk where the snapshot had one: another device set.
    let r = check(
        Expect {
            devices: vec![TYPE_RNG, TYPE_VSOCK],
            disks: vec![],
            ..ok.clone()
        },
        s.mem_size,
    );
    assert!(matches!(r, Err(Refusal::Devices { .. })), "{r:?}");
    // A disk of another size, or read-write where it was read-only.
    let disk = |size: u64, read_only: bool| Expect {
        disks: vec![DiskState { size, read_only }],
        ..ok.clone()
    };
    assert_eq!(
        check(disk(32 << 20, true), s.mem_size)
            .expect_err("refused")
            .to_string(),
        "the snapshot's disks are [vda 67108864 bytes read-only], this VM's are \
         [vda 33554432 bytes read-only]"
    );
    assert!(matches!(
        check(disk(64 << 20, false), s.mem_size),
        Err(Refusal::Disks { .. })
    ));
    check(disk(64 << 20, true), s.mem_size).expect("the same disk fits");
    assert!(matches!(
        check(ok.clone(), s.mem_size - 4096),
        Err(Refusal::MemoryFile { .. })
    ));
    let r = check(
        Expect {
            tag: Some("python-3.11".into()),
            ..ok.clone()
        },
        s.mem_size,
    );
    assert_eq!(
        r.expect_err("refused").to_string(),
        "the snapshot's tag is \"bash-5.2\", --snapshot-tag is \"python-3.11\""
    );
    assert!(matches!(
        check(Expect { tag: None, ..ok }, s.mem_size),
        Err(Refusal::Tag { .. })
    ));
}

/// A state written before disks existed (no `disks` field) still decodes, with no disks.
#[test]
fn a_state_without_disks_decodes_with_none() {
    let mut s = sample_state();
    s.devices.virtio.remove(0);
    s.devices.disks.clear();
    let mut v: serde_json::Value = serde_json::to_value(&s).expect("json");
    v["devices"]
        .as_object_mut()
        .expect("devices")
        .remove("disks")
        .expect("had the field");
    let body = serde_json::to_vec(&v).expect("body");
    let back = decode(&frame(FORMAT_VERSION, &body)).expect("decode");
    assert!(back.devices.disks.is_empty());
}

#[test]
fn fuzz_entry_accepts_anything() {
    let bytes = encode(&sample_state()).expect("encode");
    fuzz_decode(&bytes);
    for n in 0..64 {
        let mut b = bytes.clone();
        let at = (n * 7919) % b.len();
        b[at] = b[at].wrapping_add(n as u8);
        fuzz_decode(&b);
        fuzz_decode(&b[..at]);
    }
}
