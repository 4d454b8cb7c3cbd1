//! An address-range bus (one for port I/O, one for MMIO) shared by all vCPU threads.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// Devices sorted by base address; lookups are a binary search.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Arc<Vec<Range>>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at `[base, base+len)`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let overlaps = self
            .ranges
            .iter()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < base.saturating_add(len));
        if overlaps || len == 0 {
            return Err(BusError::Overlap { base, len });
        }
        let mut v: Vec<Range> = self
            .ranges
            .iter()
            .map(|r| Range {
                base: r.base,
                len: r.len,
                dev: r.dev.clone(),
            })
            .collect();
        v.push(Range { base, len, dev });
        v.sort_by_key(|r| r.base);
        self.ranges = Arc::new(v);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let i = self.ranges.partition_point(|r| r.base <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (addr - r.base < r.len).then_some((r, addr - r.base))
    }

    /// Dispatches a read; returns false (and fills 0xff) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, off)) => {
                lock(&r.dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, off)) => {
                lock(&r.dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex, recovering the data if another thread panicked while holding it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 8)
            .expect("insert");
        bus.insert(Arc::new(Mutex::new(Echo(50))), 0x200, 8)
            .expect("insert");
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x104, 8).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(!bus.read(0x108, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x200, &[7]));
        assert!(bus.read(0x201, &mut b));
        assert_eq!(b[0], 8);
        assert!(!bus.write(0x50, &[1]));
    }
}
