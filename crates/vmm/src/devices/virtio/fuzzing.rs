//! Fuzz entry points for the guest-facing parsers (virtqueue walking, vsock headers, virtio-blk
//! requests), shared by the cargo-fuzz targets in `fuzz/` and deterministic smoke runs in the
//! unit tests.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::Block;
use super::queue;
use super::vsock::packet::{check_addressing, check_structure, peer_credit, Header, HDR_SIZE};
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Guest memory size used for fuzzing.
pub const FUZZ_MEM: usize = 0x10000;
/// Most chains popped per input.
const MAX_POPS: usize = 64;

fn word(data: &[u8], i: usize) -> u32 {
    let b = |k: usize| u32::from(data.get(i + k).copied().unwrap_or(0));
    b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24)
}

/// Guest memory holding `data` and a ready queue whose size and ring addresses are its first
/// 13 bytes (addresses may point anywhere, including outside guest memory); None when the queue
/// is not valid.
fn ring_from(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM)])
        .expect("small anonymous mapping");
    let n = data.len().min(FUZZ_MEM);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("within the mapping");
    let mut q = Queue::new(queue::MAX_QUEUE_SIZE).expect("power of two");
    q.set_size(1u16 << (data.first().copied().unwrap_or(0) % 9));
    q.set_desc_table_address(Some(word(data, 1) & !0xf), Some(0));
    q.set_avail_ring_address(Some(word(data, 5) & !0x1), Some(0));
    q.set_used_ring_address(Some(word(data, 9) & !0x3), Some(0));
    q.set_ready(true);
    q.is_valid(&mem).then_some((mem, q))
}

/// Bytes of each fuzzed disk.
pub const FUZZ_DISK: usize = 0x10000;
/// Most `process_queue` rounds per input and disk.
const MAX_ROUNDS: usize = 3;

fn disk_pattern() -> Vec<u8> {
    (0..FUZZ_DISK).map(|i| (i % 253) as u8).collect()
}

/// An anonymous file (`O_TMPFILE`, nothing left behind) holding [`disk_pattern`].
fn fuzz_disk() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(0o600)
        .open(std::env::temp_dir())
        .expect("an O_TMPFILE in the temporary directory");
    f.write_all_at(&disk_pattern(), 0).expect("fill the disk");
    f
}

/// Interprets `data` as guest memory plus ring addresses (as [`parse_rings`]) and serves every
/// request found there by a virtio-blk device, once on a read-only disk and once on a
/// read-write one. Panics (the fuzzer's crash) if the read-only disk changes, if either file
/// grows, or if the chains returned and the requests counted disagree. Returns the requests
/// served with each outcome, both disks together.
pub fn block_requests(data: &[u8]) -> super::block::Counters {
    let mut sum = super::block::Counters::default();
    for read_only in [true, false] {
        let Some((mem, q)) = ring_from(data) else {
            return sum;
        };
        let file = fuzz_disk();
        let check = file.try_clone().expect("dup");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let mut dev = Block::new(0, file, FUZZ_DISK as u64, read_only, irq).expect("device");
        dev.activate(mem.clone(), vec![q], VIRTIO_F_VERSION_1)
            .expect("one queue");
        for _ in 0..MAX_ROUNDS {
            if !matches!(dev.process_queue(), Ok(n) if n > 0) {
                break;
            }
        }
        let c = dev.counters();
        let total =
            c.reads + c.writes + c.flushes + c.get_ids + c.failed + c.unsupported + c.unanswerable;
        // Every chain returned to the guest was counted once; one more may have been counted
        // when the ring broke before it could be returned.
        let used = dev.queue_states().map_or(0, |q| u64::from(q[0].next_used));
        assert!(
            used <= total && total <= used + 1,
            "{used} chains used, {total} counted"
        );
        let len = check.metadata().expect("metadata").len();
        assert_eq!(len, FUZZ_DISK as u64, "a disk never grows");
        if read_only {
            assert_eq!(c.writes + c.flushes, 0, "a read-only disk took a write");
            let mut now = vec![0u8; FUZZ_DISK];
            check.read_exact_at(&mut now, 0).expect("read back");
            assert!(now == disk_pattern(), "the read-only disk changed");
        }
        sum.reads += c.reads;
        sum.writes += c.writes;
        sum.flushes += c.flushes;
        sum.get_ids += c.get_ids;
        sum.failed += c.failed;
        sum.unsupported += c.unsupported;
        sum.unanswerable += c.unanswerable;
    }
    sum
}

/// Interprets `data` as guest memory plus ring addresses and parses everything it can.
pub fn parse_rings(data: &[u8]) {
    let Some((mem, mut q)) = ring_from(data) else {
        return;
    };
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

/// A seed for [`block_requests`]: a 16-entry ring at 0x1000 (avail 0x2000, used 0x3000) with
/// one request of each kind (read, write, flush, GET_ID, an unsupported type, one without a
/// status byte), headers at 0x4000, data at 0x6000, status bytes at 0x5000.
pub fn block_seed() -> Vec<u8> {
    let mut m = vec![0u8; 0x8000];
    m[0] = 4; // 16 entries
    m[1..5].copy_from_slice(&0x1000u32.to_le_bytes());
    m[5..9].copy_from_slice(&0x2000u32.to_le_bytes());
    m[9..13].copy_from_slice(&0x3000u32.to_le_bytes());
    let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let at = 0x1000 + i * 16;
        m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    use queue::{VIRTQ_DESC_F_NEXT as N, VIRTQ_DESC_F_WRITE as W};
    // (type, sector, data length, data writable) per request; three descriptors each.
    let reqs: [(u32, u64, u32, bool); 5] = [
        (0, 3, 1024, true),
        (1, 7, 512, false),
        (4, 0, 0, false),
        (8, 0, 20, true),
        (11, 0, 512, false),
    ];
    let mut heads = Vec::new();
    for (k, (_, _, len, w)) in reqs.iter().enumerate() {
        let d = (k * 3) as u16;
        let hdr = 0x4000 + 16 * k as u64;
        let status = 0x5000 + k as u64;
        desc(d.into(), hdr, 16, N, d + 1);
        if *len > 0 {
            desc(
                (d + 1).into(),
                0x6000 + 0x400 * k as u64,
                *len,
                N | if *w { W } else { 0 },
                d + 2,
            );
            desc((d + 2).into(), status, 1, W, 0);
        } else {
            desc((d + 1).into(), status, 1, W, 0);
        }
        heads.push(d);
    }
    // A chain without a status byte: a lone header.
    desc(15, 0x4000, 16, 0, 0);
    heads.push(15);
    for (k, (kind, sector, _, _)) in reqs.iter().enumerate() {
        let at = 0x4000 + 16 * k;
        m[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        m[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
    }
    for (i, h) in heads.iter().enumerate() {
        m[0x2004 + 2 * i..0x2006 + 2 * i].copy_from_slice(&h.to_le_bytes());
    }
    m[0x2002..0x2004].copy_from_slice(&(heads.len() as u16).to_le_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed is not vacuous: each request kind reaches its outcome.
    #[test]
    fn block_seed_serves_every_kind() {
        let seed = block_seed();
        if let Ok(dir) = std::env::var("CLOUDE_WRITE_BLK_SEED") {
            std::fs::write(std::path::Path::new(&dir).join("six_kinds"), &seed).expect("seed");
        }
        let (mem, q) = ring_from(&seed).expect("a valid ring");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let mut dev = Block::new(0, fuzz_disk(), FUZZ_DISK as u64, false, irq).expect("device");
        dev.activate(mem.clone(), vec![q], VIRTIO_F_VERSION_1)
            .expect("activate");
        assert_eq!(dev.process_queue().expect("served"), 6);
        let c = dev.counters();
        assert_eq!(
            (
                c.reads,
                c.writes,
                c.flushes,
                c.get_ids,
                c.unsupported,
                c.unanswerable
            ),
            (1, 1, 1, 1, 1, 1)
        );
        let mut status = [0xffu8; 5];
        mem.read_slice(&mut status, GuestAddress(0x5000))
            .expect("status");
        assert_eq!(status, [0, 0, 0, 0, 2]);
        let both = block_requests(&seed);
        assert_eq!(
            (both.reads, both.writes, both.failed),
            (2, 1, 2),
            "{both:?}"
        );
    }

    /// A deterministic smoke fuzz of the block device: random bytes and random requests over
    /// the seed's ring never panic, and the harness's invariants hold.
    #[test]
    fn random_block_requests_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed = block_seed();
        let mut sum = crate::devices::virtio::block::Counters::default();
        for round in 0..200 {
            let mut data = if round % 4 == 0 {
                (0..(next() as usize % FUZZ_MEM))
                    .map(|_| next() as u8)
                    .collect()
            } else {
                seed.clone()
            };
            // Flip a few bytes in the descriptors, headers, ring and status area.
            for _ in 0..(1 + next() % 12) {
                let at = match next() % 4 {
                    0 => 0x1000 + next() as usize % 0x100,
                    1 => 0x4000 + next() as usize % 0x60,
                    2 => 0x2000 + next() as usize % 0x20,
                    _ => next() as usize % data.len().max(1),
                };
                if let Some(b) = data.get_mut(at) {
                    *b = next() as u8;
                }
            }
            let c = block_requests(&data);
            sum.reads += c.reads;
            sum.writes += c.writes;
            sum.failed += c.failed;
            sum.unsupported += c.unsupported;
            sum.unanswerable += c.unanswerable;
        }
        // The mutations reach every outcome, not only broken rings.
        println!("random block requests: {sum:?}");
        assert!(sum.reads > 20 && sum.writes > 20, "{sum:?}");
        assert!(
            sum.failed > 20 && sum.unsupported > 5 && sum.unanswerable > 20,
            "{sum:?}"
        );
    }

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
