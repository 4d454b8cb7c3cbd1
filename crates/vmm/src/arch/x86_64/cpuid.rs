//! CPUID adjustments on top of `KVM_GET_SUPPORTED_CPUID`: topology, the hypervisor bit and the
//! KVM paravirt leaves (without them the guest has no kvm-clock and calibrates the TSC against
//! the PIT, which can stall boot for a long time).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// KVM paravirt signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirt features leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;
/// kvm-clock (both MSR sets), NOP I/O delay and a stable clocksource.
const KVM_DEFAULT_FEATURES: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

/// Errors while adjusting CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("the CPUID table is full")]
    Full,
}

/// Rewrites `cpuid` for vCPU `index` of `count`.
pub fn adjust(cpuid: &mut CpuId, index: u8, count: u8) -> Result<(), CpuidError> {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= HYPERVISOR_BIT;
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= HTT_BIT;
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
                e.eax &= !(0xfff << 14);
            }
            6 => e.ecx &= !(1 << 3), // no energy-performance bias MSR
            0xa => {
                // No PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = u32::from(count).next_power_of_two().trailing_zeros();
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => e.ecx = (e.ecx & !0xff) | u32::from(count.saturating_sub(1)),
            0x8000_001e => {
                // AMD topology: extended APIC id, one thread per core, core id, node 0.
                e.eax = u32::from(index);
                e.ebx = u32::from(index);
                e.ecx = 0;
            }
            _ => {}
        }
    }
    let has = |c: &CpuId, f: u32| c.as_slice().iter().any(|e| e.function == f);
    if !has(cpuid, KVM_CPUID_SIGNATURE) {
        let (b, c, d) = kvm_signature();
        cpuid
            .push(kvm_cpuid_entry2 {
                function: KVM_CPUID_SIGNATURE,
                eax: KVM_CPUID_FEATURES,
                ebx: b,
                ecx: c,
                edx: d,
                ..Default::default()
            })
            .map_err(|_| CpuidError::Full)?;
    }
    if !has(cpuid, KVM_CPUID_FEATURES) {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: KVM_CPUID_FEATURES,
                eax: KVM_DEFAULT_FEATURES,
                ..Default::default()
            })
            .map_err(|_| CpuidError::Full)?;
    }
    for e in cpuid.as_mut_slice() {
        if e.function == KVM_CPUID_SIGNATURE && e.eax < KVM_CPUID_FEATURES {
            e.eax = KVM_CPUID_FEATURES;
        }
    }
    Ok(())
}

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
fn kvm_signature() -> (u32, u32, u32) {
    let s = *b"KVMKVMKVM\0\0\0";
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (w(0), w(4), w(8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_hypervisor_bit_and_kvm_leaves() {
        let mut c = CpuId::new(2).expect("cpuid");
        c.as_mut_slice()[0] = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0000_0800,
            ..Default::default()
        };
        c.as_mut_slice()[1] = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            ..Default::default()
        };
        adjust(&mut c, 3, 4).expect("adjust");
        let leaf = |f: u32| *c.as_slice().iter().find(|e| e.function == f).expect("leaf");
        let l1 = leaf(1);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        let sig = leaf(KVM_CPUID_SIGNATURE);
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
        assert_eq!(&sig.ebx.to_le_bytes(), b"KVMK");
        assert_ne!(leaf(KVM_CPUID_FEATURES).eax & (1 << 3), 0);
        assert_eq!(leaf(0xb).edx, 3);
        assert_eq!(leaf(0xb).ebx, 4);
    }
}
