//! Guest-facing virtqueue parsing: pure functions over guest memory, no device state.
//!
//! `virtio_queue::Queue` keeps the ring state (addresses, indices, used ring updates); the
//! descriptor chain itself is walked here, because every field in it is hostile: indices are
//! bounds-checked, loops are cut by a hop cap, every buffer must lie inside guest memory, and the
//! readable/writable split must be ordered. A malformed chain is an error that fails the device.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Most descriptors one chain may have (also bounded by the queue size).
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;
/// Most bytes one chain may describe in total (the spec bound is 2^32).
pub const MAX_CHAIN_BYTES: u64 = 64 << 20;
/// Largest queue the VMM offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Descriptor flag.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// A malformed ring or chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} is outside the queue")]
    IndexOutOfRange(u16),
    #[error("descriptor chain is longer than the queue or {MAX_CHAIN_DESCRIPTORS} (a loop?)")]
    TooLong,
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("chain describes more than {MAX_CHAIN_BYTES} bytes")]
    TooManyBytes,
    #[error("a readable descriptor follows a writable one")]
    ReadAfterWrite,
    #[error("the descriptor table cannot be read")]
    DescriptorTable,
    #[error("the available ring is invalid: {0}")]
    AvailRing(String),
    #[error("the used ring cannot be written: {0}")]
    UsedRing(String),
}

/// One validated buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
}

/// A validated descriptor chain: readable buffers first, then writable ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Desc>,
    pub writable: Vec<Desc>,
}

impl Chain {
    /// Total readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|d| u64::from(d.len)).sum()
    }

    /// Total writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|d| u64::from(d.len)).sum()
    }
}

/// Walks the chain starting at `head` in the descriptor table at `table` of `size` entries.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Default::default()
    };
    let mut index = head;
    let mut total: u64 = 0;
    let cap = usize::from(size).min(MAX_CHAIN_DESCRIPTORS);
    for _ in 0..cap {
        if index >= size {
            return Err(ChainError::IndexOutOfRange(index));
        }
        let at = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::DescriptorTable)?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, at)
            .map_err(|_| ChainError::DescriptorTable)?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        if !mem.check_range(GuestAddress(addr), len as usize, Permissions::ReadWrite) {
            return Err(ChainError::OutOfMemory { addr, len });
        }
        total += u64::from(len);
        if total > MAX_CHAIN_BYTES {
            return Err(ChainError::TooManyBytes);
        }
        let d = Desc { addr, len };
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            chain.writable.push(d);
        } else if chain.writable.is_empty() {
            chain.readable.push(d);
        } else {
            return Err(ChainError::ReadAfterWrite);
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = next;
    }
    Err(ChainError::TooLong)
}

/// Takes the next available chain, if any. Errors mean the ring is malformed.
pub fn pop(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<Chain>, ChainError> {
    if !queue.ready() {
        return Ok(None);
    }
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut iter = queue
        .iter(mem)
        .map_err(|e| ChainError::AvailRing(e.to_string()))?;
    match iter.next() {
        None => Ok(None),
        Some(c) => walk_chain(mem, table, size, c.head_index()).map(Some),
    }
}

/// Returns a used chain with `len` bytes written to it.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), ChainError> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| ChainError::UsedRing(e.to_string()))
}

/// Copies up to `out.len()` bytes from `segs`, starting `skip` bytes in. Returns bytes copied.
pub fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Desc],
    mut skip: u64,
    out: &mut [u8],
) -> Result<usize, ChainError> {
    let mut done = 0;
    for d in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        let addr = GuestAddress(d.addr + skip);
        mem.read_slice(&mut out[done..done + n], addr)
            .map_err(|_| ChainError::OutOfMemory {
                addr: d.addr,
                len: d.len,
            })?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// Copies `data` into `segs`, starting `skip` bytes in. Returns bytes copied.
pub fn scatter(
    mem: &GuestMemoryMmap,
    segs: &[Desc],
    mut skip: u64,
    data: &[u8],
) -> Result<usize, ChainError> {
    let mut done = 0;
    for d in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len() - done);
        let addr = GuestAddress(d.addr + skip);
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| ChainError::OutOfMemory {
                addr: d.addr,
                len: d.len,
            })?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// Test and fuzz helpers: builds split rings in plain guest memory.
pub mod testing {
    use super::*;

    /// Descriptor table, avail ring and used ring addresses used by [`RingBuilder`].
    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;

    /// Writes raw descriptors and avail entries into guest memory.
    pub struct RingBuilder<'a> {
        pub mem: &'a GuestMemoryMmap,
        pub size: u16,
        avail_idx: u16,
    }

    impl<'a> RingBuilder<'a> {
        /// A ring of `size` entries at the fixed addresses.
        pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
            Self {
                mem,
                size,
                avail_idx: 0,
            }
        }

        /// Writes descriptor `i`. Ignores writes outside memory (fuzz input may ask for those).
        pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = self
                .mem
                .write_slice(&raw, GuestAddress(DESC + u64::from(i) * 16));
        }

        /// Publishes a chain head.
        pub fn publish(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.size.max(1));
            let _ = self.mem.write_obj(head, GuestAddress(slot));
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        /// Sets the avail index directly (to test bogus values).
        pub fn set_avail_idx(&self, idx: u16) {
            let _ = self.mem.write_obj(idx, GuestAddress(AVAIL + 2));
        }

        /// A ready `Queue` over this ring.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(MAX_QUEUE_SIZE).expect("max size is a power of two");
            q.set_size(self.size);
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_ready(true);
            q
        }
    }

    pub use super::{
        VIRTQ_DESC_F_INDIRECT as F_INDIRECT, VIRTQ_DESC_F_NEXT as F_NEXT,
        VIRTQ_DESC_F_WRITE as F_WRITE,
    };
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap")
    }

    #[test]
    fn valid_chain_split_into_read_and_write() {
        let m = mem();
        let mut r = RingBuilder::new(&m, 16);
        r.desc(0, 0x8000, 44, F_NEXT, 1);
        r.desc(1, 0x9000, 100, F_NEXT, 2);
        r.desc(2, 0xa000, 4096, F_WRITE, 0);
        r.publish(0);
        let mut q = r.queue();
        let c = pop(&mut q, &m).expect("valid").expect("one chain");
        assert_eq!(c.readable.len(), 2);
        assert_eq!(c.writable_len(), 4096);
        assert_eq!(pop(&mut q, &m).expect("valid"), None);
        add_used(&mut q, &m, c.head, 10).expect("used");
        let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).expect("read");
        assert_eq!(used_idx, 1);
    }

    #[test]
    fn loop_is_cut() {
        let m = mem();
        let mut r = RingBuilder::new(&m, 8);
        r.desc(0, 0x8000, 1, F_NEXT, 1);
        r.desc(1, 0x8000, 1, F_NEXT, 0);
        r.publish(0);
        assert_eq!(pop(&mut r.queue(), &m), Err(ChainError::TooLong));
        let mut r = RingBuilder::new(&m, 8);
        r.desc(3, 0x8000, 1, F_NEXT, 3);
        r.publish(3);
        assert_eq!(pop(&mut r.queue(), &m), Err(ChainError::TooLong));
    }

    #[test]
    fn bad_indices_addresses_lengths_and_flags() {
        let m = mem();
        let mut r = RingBuilder::new(&m, 8);
        r.desc(0, 0x8000, 1, F_NEXT, 9);
        r.publish(0);
        r.publish(12);
        let mut q = r.queue();
        assert_eq!(pop(&mut q, &m), Err(ChainError::IndexOutOfRange(9)));
        assert_eq!(pop(&mut q, &m), Err(ChainError::IndexOutOfRange(12)));

        let mut r = RingBuilder::new(&m, 8);
        r.desc(0, (1 << 20) - 10, 11, 0, 0);
        r.desc(1, u64::MAX - 5, 100, 0, 0);
        r.desc(2, 0x8000, u32::MAX, F_WRITE, 0);
        r.desc(3, 0x8000, 16, F_INDIRECT, 0);
        r.desc(4, 0x8000, 16, F_WRITE | F_NEXT, 5);
        r.desc(5, 0x9000, 16, 0, 0);
        for h in 0..6 {
            r.publish(h);
        }
        let mut q = r.queue();
        assert!(matches!(
            pop(&mut q, &m),
            Err(ChainError::OutOfMemory { .. })
        ));
        assert!(matches!(
            pop(&mut q, &m),
            Err(ChainError::OutOfMemory { .. })
        ));
        assert!(matches!(
            pop(&mut q, &m),
            Err(ChainError::OutOfMemory { .. })
        ));
        assert_eq!(pop(&mut q, &m), Err(ChainError::Indirect));
        assert_eq!(pop(&mut q, &m), Err(ChainError::ReadAfterWrite));
    }

    #[test]
    fn absurd_total_length_is_rejected() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 48 << 20)]).expect("mmap");
        let mut r = RingBuilder::new(&m, 8);
        r.desc(0, 0x10_0000, 40 << 20, F_NEXT, 1);
        r.desc(1, 0x10_0000, 40 << 20, 0, 0);
        r.publish(0);
        assert_eq!(pop(&mut r.queue(), &m), Err(ChainError::TooManyBytes));
    }

    #[test]
    fn bogus_avail_index_fails() {
        let m = mem();
        let r = RingBuilder::new(&m, 8);
        r.set_avail_idx(100);
        assert!(matches!(
            pop(&mut r.queue(), &m),
            Err(ChainError::AvailRing(_))
        ));
    }

    #[test]
    fn gather_and_scatter_cross_segments() {
        let m = mem();
        let segs = [
            Desc {
                addr: 0x8000,
                len: 3,
            },
            Desc {
                addr: 0x9000,
                len: 5,
            },
        ];
        assert_eq!(scatter(&m, &segs, 1, b"abcdefghij").expect("scatter"), 7);
        let mut out = [0u8; 6];
        assert_eq!(gather(&m, &segs, 2, &mut out).expect("gather"), 6);
        assert_eq!(&out, b"bcdefg");
        let mut out = [0u8; 4];
        assert_eq!(gather(&m, &segs, 100, &mut out).expect("gather"), 0);
    }
}
