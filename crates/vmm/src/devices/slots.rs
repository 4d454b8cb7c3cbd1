//! Where each virtio-mmio device lives: a 4 KiB window in the MMIO hole and its own IOAPIC pin,
//! handed out in order (the guest learns both from `virtio_mmio.device=` on the command line).

use crate::arch::x86_64::layout::{IRQ_MAX, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// One device's window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

impl Slot {
    /// The kernel parameter that tells the guest about this device.
    pub fn cmdline_arg(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// Hands out [`Slot`]s; each pin from [`VIRTIO_IRQ_BASE`] to [`IRQ_MAX`] once.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    next: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("no interrupt line is left for another virtio device (at most {0})")]
pub struct SlotsExhausted(pub u32);

impl SlotAllocator {
    /// Most devices: one IOAPIC pin each.
    pub const CAPACITY: u32 = IRQ_MAX - VIRTIO_IRQ_BASE + 1;

    pub fn allocate(&mut self) -> Result<Slot, SlotsExhausted> {
        if self.next >= Self::CAPACITY {
            return Err(SlotsExhausted(Self::CAPACITY));
        }
        let i = self.next;
        self.next += 1;
        Ok(Slot {
            base: VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq: VIRTIO_IRQ_BASE + i,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_bounded() {
        let mut a = SlotAllocator::default();
        let first = a.allocate().expect("first");
        assert_eq!(first.cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
        let second = a.allocate().expect("second");
        assert_eq!(second.base, first.base + VIRTIO_MMIO_SIZE);
        assert_eq!(second.irq, first.irq + 1);
        for _ in 2..SlotAllocator::CAPACITY {
            assert!(a.allocate().expect("within capacity").irq <= IRQ_MAX);
        }
        assert!(a.allocate().is_err());
    }
}
