//! The Intel MultiProcessor table (spec 1.4) at the EBDA, so that the guest finds every vCPU,
//! the IOAPIC and the ISA interrupt routing without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

/// Most vCPUs: keeps the table inside the 1 KiB EBDA reservation.
pub const MAX_VCPUS: u8 = 32;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs is more than the MP table supports ({MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("could not write the MP table: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer + configuration table for `cpus` vCPUs, located at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = base as u32 + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[
            0,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: APIC, FPU
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // Every ISA IRQ, the timer included, goes to the same IOAPIC pin (KVM's default routing).
    // (An ExtINT entry for IRQ 0 leaves Linux without an IRQ 0 mapping: it then crashes in
    // check_timer.)
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"CLOUDE  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);
    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table at [`EBDA_START`].
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4, EBDA_START).expect("table");
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cpus = cfg[44..].chunks(20).take(4).filter(|c| c[0] == 0).count();
        assert_eq!(cpus, 4);
        assert!(t.len() < 0x400, "fits in the EBDA reservation");
        let irq0 = cfg[44..]
            .windows(8)
            .any(|w| w[0] == 3 && w[1] == MP_INT && w[5] == 0 && w[7] == 0);
        assert!(irq0, "IRQ 0 is routed as a normal interrupt");
        assert!(build(0, EBDA_START).is_err());
        assert!(build(MAX_VCPUS + 1, EBDA_START).is_err());
        assert!(build(MAX_VCPUS, EBDA_START).expect("max").len() <= 0x400);
    }
}
