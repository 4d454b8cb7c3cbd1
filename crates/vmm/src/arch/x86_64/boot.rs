//! Kernel and initrd loading, and the boot structures the kernel reads at entry
//! (PVH `hvm_start_info` or the Linux zero page), including the e820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the start of a loaded bzImage protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default `initrd_addr_max` when the kernel does not give one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the kernel or initrd or writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the kernel is neither an ELF vmlinux nor a bzImage ({0})")]
    UnknownKernelFormat(String),
    #[error("the kernel could not be loaded: {0}")]
    KernelLoad(String),
    #[error("could not read the kernel or initrd: {0}")]
    Io(#[from] std::io::Error),
    #[error("the initrd ({size} bytes) does not fit in guest memory below {max:#x} after the kernel; raise --memory-mib")]
    InitrdTooBig { size: u64, max: u64 },
    #[error("the kernel command line is longer than {CMDLINE_MAX_SIZE} bytes")]
    CmdlineTooLong,
    #[error("could not write boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, `%ebx` = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, `%rsi` = zero page.
    Linux64(u64),
}

/// The loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// First guest address after the kernel image.
    pub kernel_end: u64,
    /// The bzImage setup header (absent for ELF).
    pub setup_header: Option<setup_header>,
}

/// Loads an ELF vmlinux (preferring its PVH entry) or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let mut magic = [0u8; 4];
    kernel.seek(SeekFrom::Start(0))?;
    kernel
        .read_exact(&mut magic)
        .map_err(|e| BootError::UnknownKernelFormat(e.to_string()))?;
    kernel.seek(SeekFrom::Start(0))?;
    let start = Some(GuestAddress(HIMEM_START));
    if magic == *b"\x7fELF" {
        let res = Elf::load(mem, None, kernel, start)
            .map_err(|e| BootError::KernelLoad(format!("ELF: {e}")))?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.raw_value()),
            _ => EntryPoint::Linux64(res.kernel_load.raw_value()),
        };
        return Ok(LoadedKernel {
            entry,
            kernel_end: res.kernel_end,
            setup_header: None,
        });
    }
    let res = BzImage::load(mem, None, kernel, start).map_err(|e| match e {
        linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        ) => BootError::UnknownKernelFormat("no ELF magic and no bzImage header".into()),
        e => BootError::KernelLoad(format!("bzImage: {e}")),
    })?;
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64(res.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET),
        kernel_end: res.kernel_end,
        setup_header: res.setup_header,
    })
}

/// Loads the initrd at the highest page-aligned address that fits below `low_mem_end` (and
/// the kernel's `initrd_addr_max`), above the kernel. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel: &LoadedKernel,
    low_mem_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd.seek(SeekFrom::End(0))?;
    initrd.seek(SeekFrom::Start(0))?;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = low_mem_end.min(addr_max + 1);
    let floor = kernel.kernel_end.max(HIMEM_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= floor)
        .ok_or(BootError::InitrdTooBig { size, max: top })?;
    let usize_size =
        usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size, max: top })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, usize_size)?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE || cmdline.contains('\0') {
        return Err(BootError::CmdlineTooLong);
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(())
}

/// The e820 map: (address, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x400, E820_RESERVED),
    ];
    for (start, len) in ram_regions(mem_size) {
        let (start, len) = if start == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start, len)
        };
        map.push((start, len, E820_RAM));
    }
    map
}

/// Where the initrd went (address, size) and the command line length.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub initrd: (u64, u64),
    pub cmdline_len: usize,
    pub mem_size: u64,
}

/// Writes the PVH start info, module list (initrd) and memory map.
pub fn write_pvh_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let map = e820_map(info.mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    let module = hvm_modlist_entry {
        paddr: info.initrd.0,
        size: info.initrd.1,
        ..Default::default()
    };
    mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
    let start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: 1,
        modlist_paddr: PVH_MODLIST_START,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(start, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

/// Writes the Linux zero page for the 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.ramdisk_image = info.initrd.0 as u32;
    params.hdr.ramdisk_size = info.initrd.1 as u32;
    let map = e820_map(info.mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("mmap")
    }

    #[test]
    fn e820_skips_the_legacy_hole() {
        let map = e820_map(128 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let m = mem(64 << 20);
        let mut f = tempfile::tempfile().expect("tmp");
        f.write_all(&[0x55; 8192]).expect("write");
        let err = load_kernel(&m, &mut f).expect_err("garbage must not load");
        assert!(
            matches!(
                err,
                BootError::UnknownKernelFormat(_) | BootError::KernelLoad(_)
            ),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_to_the_top_and_too_big_fails() {
        let m = mem(64 << 20);
        let k = LoadedKernel {
            entry: EntryPoint::Pvh(0),
            kernel_end: 0x20_0000,
            setup_header: None,
        };
        let mut f = tempfile::tempfile().expect("tmp");
        f.write_all(&[7u8; 5000]).expect("write");
        let (addr, size) = load_initrd(&m, &mut f, &k, 64 << 20).expect("fits");
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20);
        let mut big = tempfile::tempfile().expect("tmp");
        big.set_len(70 << 20).expect("len");
        assert!(matches!(
            load_initrd(&m, &mut big, &k, 64 << 20),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn cmdline_is_nul_terminated_and_capped() {
        let m = mem(1 << 20);
        write_cmdline(&m, "console=ttyS0").expect("write");
        let b: u8 = m.read_obj(GuestAddress(CMDLINE_START + 13)).expect("read");
        assert_eq!(b, 0);
        assert!(write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }
}
