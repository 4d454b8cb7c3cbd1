//! The KVM VM: opening /dev/kvm, guest memory, in-kernel irqchip and PIT.

use std::io::ErrorKind;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{ram_regions, KVM_TSS_ADDRESS};

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: this host has no KVM (enable VT-x/AMD-V and load kvm_intel or kvm_amd)")]
    NoKvm,
    #[error("/dev/kvm is not accessible (permission denied): run as a user in the kvm group")]
    KvmPermission,
    #[error("could not open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("could not allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM with its memory registered and interrupt controllers created.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
}

/// Opens /dev/kvm with a clear error for the two common failures.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm =
        Kvm::new().map_err(
            |e| match std::io::Error::from_raw_os_error(e.errno()).kind() {
                ErrorKind::NotFound => VmError::NoKvm,
                ErrorKind::PermissionDenied => VmError::KvmPermission,
                _ => VmError::KvmOpen(e),
            },
        )?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM with `mem_size` bytes of RAM, an irqchip and a PIT.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
            mib: mem_size >> 20,
            reason: e.to_string(),
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Memory {
                    mib: mem_size >> 20,
                    reason: e.to_string(),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region's host mapping is owned by `mem`, which lives in the returned
            // `Vm` as long as `fd`; the range is exactly the mapped region.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        Ok(Self { kvm, fd, mem })
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    kvm(what)
}
