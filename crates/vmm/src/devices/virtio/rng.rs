//! virtio-rng: fills guest buffers from the host's getrandom(2).

mod event_handler;

use std::sync::Arc;

use super::device::DeviceCore;
use super::queue::{self, ChainError};
use super::{Interrupt, VirtioDevice, MAX_CHAINS_PER_EVENT, TYPE_RNG, VIRTIO_F_VERSION_1};

/// Most random bytes given for one request.
pub const MAX_RNG_BYTES_PER_REQUEST: usize = 64 << 10;
const QUEUE_SIZES: [u16; 1] = [256];

/// The entropy device.
pub struct Rng {
    core: DeviceCore,
}

impl Rng {
    /// A new, inactive device.
    pub fn new(irq: Arc<Interrupt>) -> std::io::Result<Self> {
        Ok(Self {
            core: DeviceCore::new(irq, QUEUE_SIZES.len())?,
        })
    }

    /// True after activation.
    pub fn is_active(&self) -> bool {
        self.core.is_active()
    }

    /// Serves up to [`MAX_CHAINS_PER_EVENT`] pending requests (re-kicking itself when more may
    /// wait); returns how many were completed.
    pub fn process_queue(&mut self) -> Result<usize, ChainError> {
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        let (mem, q) = (&a.mem, &mut a.queues[0]);
        let mut served = 0;
        let mut buf = vec![0u8; MAX_RNG_BYTES_PER_REQUEST];
        while served < MAX_CHAINS_PER_EVENT {
            let Some(chain) = queue::pop(q, mem)? else {
                break;
            };
            let want = (chain.writable_len() as usize).min(MAX_RNG_BYTES_PER_REQUEST);
            let n = fill_random(&mut buf[..want]);
            let written = queue::scatter(mem, &chain.writable, 0, &buf[..n])?;
            queue::add_used(q, mem, chain.head, written as u32)?;
            served += 1;
        }
        self.core.rekick_if_capped(0, served);
        Ok(served)
    }
}

fn fill_random(buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which is valid
        // for writes; getrandom writes at most that many bytes.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r <= 0 {
            break;
        }
        done += r as usize;
    }
    done
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn core(&self) -> &DeviceCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn setup() -> (GuestMemoryMmap, Arc<Interrupt>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        (
            mem,
            Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))),
        )
    }

    #[test]
    fn fills_buffers_and_caps_length() {
        let (mem, irq) = setup();
        let mut r = RingBuilder::new(&mem, 8);
        r.desc(0, 0x8000, 64, F_WRITE, 0);
        r.desc(1, 0x10000, 512 << 10, F_WRITE, 0);
        r.publish(0);
        r.publish(1);
        let mut rng = Rng::new(irq).expect("rng");
        rng.activate(mem.clone(), vec![r.queue()], VIRTIO_F_VERSION_1)
            .expect("activate");
        assert_eq!(rng.process_queue().expect("ok"), 2);
        let mut out = [0u8; 64];
        mem.read_slice(&mut out, GuestAddress(0x8000))
            .expect("read");
        assert!(out.iter().any(|b| *b != 0));
        let len: u32 = mem
            .read_obj(GuestAddress(USED + 4 + 8 + 4))
            .expect("used len");
        assert_eq!(len as usize, MAX_RNG_BYTES_PER_REQUEST);
    }

    #[test]
    fn malformed_ring_is_an_error_not_a_panic() {
        let (mem, irq) = setup();
        let mut r = RingBuilder::new(&mem, 8);
        r.desc(0, 0x8000, 64, F_WRITE | F_NEXT, 0);
        r.publish(0);
        let mut rng = Rng::new(irq).expect("rng");
        rng.activate(mem.clone(), vec![r.queue()], VIRTIO_F_VERSION_1)
            .expect("activate");
        assert_eq!(rng.process_queue(), Err(ChainError::TooLong));
    }
}
