//! Fuzz entry point for the guest-facing parsers (virtqueue walking and vsock headers), shared
//! by the cargo-fuzz target in `fuzz/` and a deterministic smoke run in the unit tests.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue;
use super::vsock::packet::{check_addressing, check_structure, peer_credit, Header, HDR_SIZE};

/// Guest memory size used for fuzzing.
pub const FUZZ_MEM: usize = 0x10000;
/// Most chains popped per input.
const MAX_POPS: usize = 64;

fn word(data: &[u8], i: usize) -> u32 {
    let b = |k: usize| u32::from(data.get(i + k).copied().unwrap_or(0));
    b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24)
}

/// Interprets `data` as guest memory plus ring addresses and parses everything it can.
pub fn parse_rings(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM)])
        .expect("small anonymous mapping");
    let n = data.len().min(FUZZ_MEM);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("within the mapping");
    let mut q = Queue::new(queue::MAX_QUEUE_SIZE).expect("power of two");
    q.set_size(1u16 << (data.first().copied().unwrap_or(0) % 9));
    // Addresses may point anywhere, including outside guest memory.
    q.set_desc_table_address(Some(word(data, 1) & !0xf), Some(0));
    q.set_avail_ring_address(Some(word(data, 5) & !0x1), Some(0));
    q.set_used_ring_address(Some(word(data, 9) & !0x3), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    for _ in 0..MAX_POPS {
        let chain = match queue::pop(&mut q, &mem) {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => return,
        };
        let mut hdr = [0u8; HDR_SIZE];
        let got = queue::gather(&mem, &chain.readable, 0, &mut hdr).expect("validated chain");
        if let Ok(h) = Header::parse(&hdr[..got]) {
            let _ = check_structure(&h, chain.readable_len().saturating_sub(HDR_SIZE as u64));
            let _ = check_addressing(&h, 3);
            let _ = peer_credit(h.buf_alloc, h.fwd_cnt, h.len);
        }
        let mut out = [0u8; 64];
        let _ = queue::scatter(&mem, &chain.writable, 1, &out[..]);
        let _ = queue::gather(&mem, &chain.readable, 7, &mut out);
        if queue::add_used(&mut q, &mem, chain.head, got as u32).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic smoke fuzz: random and structured-random inputs never panic or hang.
    #[test]
    fn random_inputs_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..300 {
            let len = (next() as usize) % FUZZ_MEM;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && data.len() > 0x3000 {
                // Plausible layout: table at 0x1000, avail at 0x2000, used at 0x3000, small
                // indices so chains are found and walked.
                data[0] = 4;
                data[1..5].copy_from_slice(&0x1000u32.to_le_bytes());
                data[5..9].copy_from_slice(&0x2000u32.to_le_bytes());
                data[9..13].copy_from_slice(&0x3000u32.to_le_bytes());
                for i in 0..16 {
                    data[0x1000 + i * 16 + 14] = (next() % 20) as u8;
                    data[0x1000 + i * 16 + 12] = (next() % 8) as u8;
                    data[0x1000 + i * 16 + 8] = (next() % 200) as u8;
                    data[0x1000 + i * 16 + 9] = 0;
                    data[0x1000 + i * 16 + 10] = 0;
                    data[0x1000 + i * 16 + 11] = 0;
                    for k in 2..8 {
                        data[0x1000 + i * 16 + k] = 0;
                    }
                }
                data[0x2002] = (next() % 20) as u8;
                data[0x2003] = 0;
            }
            parse_rings(&data);
        }
    }
}
