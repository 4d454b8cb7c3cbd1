//! The KVM VM: opening /dev/kvm, guest memory, in-kernel irqchip and PIT.

use std::io::ErrorKind;

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::arch::x86_64::layout::{ram_regions, KVM_TSS_ADDRESS};
use crate::snapshot::KvmVmState;

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

/// The x86-64 huge page size.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of anonymous guest RAM for guest-physical `gpa` at a host address congruent
/// to `gpa` modulo 2 MiB, so that [`Vm::advise_huge_pages`] can work: KVM maps guest memory with
/// 2 MiB pages only where host and guest addresses agree modulo 2 MiB (and the host page is
/// huge). The mapping is not owned by the returned region: it lasts until the process exits (one
/// VM per process; devices hold clones of the guest memory until then).
fn map_ram(gpa: u64, len: usize) -> std::io::Result<MmapRegion> {
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::other("guest memory size overflows"))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses; nothing is replaced.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let want = (gpa as usize) % HUGE_PAGE;
    let start = base + (want + HUGE_PAGE - base % HUGE_PAGE) % HUGE_PAGE;
    let end = start + len;
    // SAFETY: both ranges lie inside the mapping made above and outside [start, end), which is
    // what we keep; unmapping page-aligned parts of our own fresh mapping affects nothing else.
    unsafe {
        if start > base {
            libc::munmap(base as *mut libc::c_void, start - base);
        }
        if base + reserve > end {
            libc::munmap(end as *mut libc::c_void, base + reserve - end);
        }
    }
    // SAFETY: [start, start + len) is a valid read/write mapping of this process (made above)
    // that is never unmapped while the process runs.
    unsafe {
        MmapRegionBuilder::new(len)
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .with_raw_mmap_pointer(start as *mut u8)
    }
    .build()
    .map_err(|e| std::io::Error::other(e.to_string()))
}

impl Vm {
    /// Asks for transparent huge pages on all guest RAM, before the kernel and initrd are loaded
    /// into it: the kernel text and the initramfs the guest reads, and everything it touches
    /// while booting and unpacking (tens of thousands of 4 KiB pages), then fault in 2 MiB at a
    /// time, cutting EPT/nested page faults by up to 512 times. Measured in the KVM lab: boot to
    /// ready 5.1 s -> 3.2 s; advising only after loading the images left the boot at 4.2 s. The
    /// price is start-up CPU where the host compacts memory for huge pages synchronously
    /// (`defrag=madvise`). Advice only: it fails harmlessly where THP is not built in.
    pub fn advise_huge_pages(&self) {
        for region in self.mem.iter() {
            if let Ok(host) = self.mem.get_host_address(region.start_addr()) {
                // SAFETY: madvise only changes paging policy of our own mapping of this region.
                unsafe {
                    libc::madvise(
                        host.cast::<libc::c_void>(),
                        region.len() as usize,
                        libc::MADV_HUGEPAGE,
                    )
                };
            }
        }
    }

    /// Creates the VM with `mem_size` bytes of RAM, an irqchip and a PIT.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        Self::with_memory(mem_size, None)
    }

    /// Like [`Vm::new`], with guest RAM mapped copy-on-write from `memory` (a snapshot's
    /// memory file, regions in guest-physical order) instead of anonymous memory.
    pub fn with_memory(mem_size: u64, memory: Option<&std::fs::File>) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem_err = |reason: String| VmError::Memory {
            mib: mem_size >> 20,
            reason,
        };
        let mut file_offset = 0u64;
        let regions = ranges
            .iter()
            .map(|(gpa, len)| {
                let map = match memory {
                    None => map_ram(gpa.raw_value(), *len),
                    Some(f) => {
                        let m = crate::snapshot::memory::map_private(
                            f,
                            file_offset,
                            gpa.raw_value(),
                            *len,
                        );
                        file_offset += *len as u64;
                        m
                    }
                }
                .map_err(|e| mem_err(e.to_string()))?;
                GuestRegionMmap::new(map, *gpa).ok_or_else(|| mem_err("region overflows".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| mem_err(e.to_string()))?;
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

impl Vm {
    /// The irqchip, PIT and clock (call with every vCPU paused).
    pub fn save_state(&self) -> Result<KvmVmState, String> {
        let e = |what: &'static str| {
            move |err: kvm_ioctls::Error| format!("KVM could not save the {what}: {err}")
        };
        let chip = |id: u32| -> Result<kvm_irqchip, String> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(e("interrupt controllers"))?;
            Ok(c)
        };
        Ok(KvmVmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(e("PIT"))?,
            clock: self.fd.get_clock().map_err(e("KVM clock"))?,
        })
    }

    /// Restores the PIC, IOAPIC and PIT (before the vCPUs' local APICs).
    pub fn restore_chips(&self, st: &KvmVmState) -> Result<(), String> {
        let e = |what: &'static str| {
            move |err: kvm_ioctls::Error| format!("KVM refused the saved {what}: {err}")
        };
        for (chip, id) in [
            (&st.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&st.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&st.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(format!(
                    "the saved interrupt controller {id} has id {}",
                    chip.chip_id
                ));
            }
            self.fd
                .set_irqchip(chip)
                .map_err(e("interrupt controllers"))?;
        }
        self.fd.set_pit2(&st.pit).map_err(e("PIT"))
    }

    /// Restores the KVM clock: the guest's kvm-clock continues from the saved value (the time
    /// the snapshot spent on disk is not added). Last step of a restore.
    pub fn restore_clock(&self, st: &KvmVmState) -> Result<(), String> {
        let mut clock = st.clock;
        // Only the clock value: no realtime catch-up, no host TSC pairing from the old host.
        clock.flags = 0;
        clock.realtime = 0;
        clock.host_tsc = 0;
        self.fd
            .set_clock(&clock)
            .map_err(|err| format!("KVM refused the saved KVM clock: {err}"))
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    kvm(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_congruent_to_its_guest_address_modulo_2_mib() {
        for (gpa, len) in [(0u64, 8 << 20), (1 << 20, 3 << 20), (0x1_0000_0000, 4096)] {
            let r = map_ram(gpa, len).expect("map");
            let host = r.as_ptr() as u64;
            assert_eq!(
                host % HUGE_PAGE as u64,
                gpa % HUGE_PAGE as u64,
                "gpa {gpa:#x}"
            );
            assert_eq!(r.size(), len);
            // Writable end to end.
            // SAFETY: the mapping is `len` bytes, readable and writable, and ours.
            unsafe {
                *r.as_ptr() = 1;
                *r.as_ptr().add(len - 1) = 2;
            }
        }
    }
}
