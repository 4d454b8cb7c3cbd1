//! Guest physical memory layout (everything the VMM places in the guest lives here).

/// GDT used at entry (both PVH 32-bit and 64-bit boot).
pub const GDT_START: u64 = 0x500;
/// IDT address (an empty IDT: the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux boot protocol "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for 64-bit boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for 64-bit boot (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB = the first GiB identity mapped).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum kernel command line size including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table lives here. RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory; the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC); RAM beyond it moves above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI used by virtio-mmio devices (COM1 uses 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IOAPIC pin.
pub const IRQ_MAX: u32 = 23;
/// IOAPIC MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (three pages, Intel only but harmless elsewhere).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// COM1 port base and GSI.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 controller ports 0x60..0x64.
pub const I8042_PORT: u16 = 0x60;

/// Guest RAM regions for `mem_size` bytes: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }
}
