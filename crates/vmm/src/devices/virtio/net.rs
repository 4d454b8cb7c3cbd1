//! virtio-net on a Linux tap device (no offloads: plain Ethernet frames behind a 12-byte
//! virtio-net header that the device strips and adds).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::DeviceCore;
use super::queue::{self, ChainError};
use super::{
    ActivateError, Interrupt, VirtioDevice, MAX_CHAINS_PER_EVENT, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::config::TapSource;

/// virtio-net header size with VERSION_1 (includes `num_buffers`).
pub const NET_HDR_SIZE: usize = 12;
/// Largest Ethernet frame moved either way (no TSO/GSO is offered).
pub const MAX_FRAME: usize = 65_550;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RXQ: usize = 0;
const TXQ: usize = 1;
const DATA_TAP: u32 = 2;
/// Opens (creating if needed) the tap device `name`, non-blocking.
pub fn open_tap(name: &str) -> std::io::Result<File> {
    cloude_tap::open(name, true).map(File::from)
}

mod event_handler;

/// Errors that fail the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// The network device.
pub struct Net {
    tap: File,
    mac: [u8; 6],
    core: DeviceCore,
    /// A frame read from the tap that waits for a guest RX buffer.
    rx_frame: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Frames dropped (tap full, or guest buffer too small).
    pub dropped: u64,
}

impl Net {
    /// Opens the tap and creates the device.
    pub fn new(tap: &str, mac: [u8; 6], irq: Arc<Interrupt>) -> std::io::Result<Self> {
        Self::with_tap(open_tap(tap)?, mac, irq)
    }

    /// Opens the tap by name, or takes over an inherited tap fd (made non-blocking and
    /// close-on-exec here).
    pub fn from_source(
        src: &TapSource,
        mac: [u8; 6],
        irq: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        match src {
            TapSource::Name(name) => Self::new(name, mac, irq),
            TapSource::Fd(fd) => {
                let fd = *fd;
                // SAFETY: fcntl on an fd number only reads/sets its flags; a bad fd fails.
                let ok = unsafe {
                    let fl = libc::fcntl(fd, libc::F_GETFL);
                    fl >= 0
                        && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
                        && libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) >= 0
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: the fd was inherited for this device (checked to be a tap at
                // validation) and nothing else in this process owns it.
                let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                Self::with_tap(file, mac, irq)
            }
        }
    }

    /// Creates the device on an already open, non-blocking tap-like fd.
    pub fn with_tap(tap: File, mac: [u8; 6], irq: Arc<Interrupt>) -> std::io::Result<Self> {
        Ok(Self {
            tap,
            mac,
            core: DeviceCore::new(irq, QUEUE_SIZES.len())?,
            rx_frame: None,
            rx_buf: vec![0u8; MAX_FRAME],
            tx_buf: vec![0u8; MAX_FRAME],
            dropped: 0,
        })
    }

    /// Sends guest frames to the tap; returns chains consumed.
    pub fn process_tx(&mut self) -> Result<usize, NetError> {
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        let mut n = 0;
        while n < MAX_CHAINS_PER_EVENT {
            let Some(chain) = queue::pop(&mut a.queues[TXQ], &a.mem)? else {
                break;
            };
            let total = chain.readable_len();
            if total > NET_HDR_SIZE as u64 && total - NET_HDR_SIZE as u64 <= MAX_FRAME as u64 {
                let len = (total as usize) - NET_HDR_SIZE;
                queue::gather(
                    &a.mem,
                    &chain.readable,
                    NET_HDR_SIZE as u64,
                    &mut self.tx_buf[..len],
                )?;
                if self.tap.write(&self.tx_buf[..len]).is_err() {
                    self.dropped += 1;
                }
            } else {
                self.dropped += 1;
            }
            queue::add_used(&mut a.queues[TXQ], &a.mem, chain.head, 0)?;
            n += 1;
        }
        self.core.rekick_if_capped(TXQ, n);
        Ok(n)
    }

    /// Moves tap frames into guest buffers; returns frames delivered.
    pub fn process_rx(&mut self) -> Result<usize, NetError> {
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        let mut n = 0;
        while n < MAX_CHAINS_PER_EVENT {
            let len = match self.rx_frame {
                Some(len) => len,
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                },
            };
            self.rx_frame = Some(len);
            let q = &mut a.queues[RXQ];
            let Some(chain) = queue::pop(q, &a.mem)? else {
                break;
            };
            if chain.writable_len() < (NET_HDR_SIZE + len) as u64 {
                // Too small for this frame: hand it back empty (the driver counts an error)
                // and try the frame in the next buffer.
                self.dropped += 1;
                queue::add_used(q, &a.mem, chain.head, 0)?;
                n += 1;
                continue;
            }
            self.rx_frame = None;
            let mut hdr = [0u8; NET_HDR_SIZE];
            hdr[10] = 1; // num_buffers
            queue::scatter(&a.mem, &chain.writable, 0, &hdr)?;
            queue::scatter(
                &a.mem,
                &chain.writable,
                NET_HDR_SIZE as u64,
                &self.rx_buf[..len],
            )?;
            queue::add_used(q, &a.mem, chain.head, (NET_HDR_SIZE + len) as u32)?;
            n += 1;
        }
        self.core.rekick_if_capped(RXQ, n);
        Ok(n)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
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
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        self.core.activate(mem, queues)?;
        // Frames that reached the tap before the driver was ready.
        self.core.kick(RXQ);
        Ok(())
    }
    fn reset(&mut self) {
        self.core.deactivate();
        self.rx_frame = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A datagram socketpair behaves like a tap: one frame per read/write.
    fn rig() -> (Net, UnixDatagram, GuestMemoryMmap) {
        let (a, b) = UnixDatagram::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        let fd: std::os::fd::OwnedFd = a.into();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let net = Net::with_tap(File::from(fd), [6, 0, 0, 0, 0, 1], irq).expect("net");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        (net, b, mem)
    }

    #[test]
    fn frames_flow_both_ways_and_small_buffers_drop() {
        let (mut net, peer, mem) = rig();
        let mut rx = RingBuilder::new(&mem, 8);
        let mut cfg = [0u8; 6];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [6, 0, 0, 0, 0, 1]);
        // TX uses a second ring far away.
        let tx_mem_off = 0x40000u64;
        let mut txq = Queue::new(256).expect("q");
        txq.set_size(8);
        txq.set_desc_table_address(Some((DESC + tx_mem_off) as u32), Some(0));
        txq.set_avail_ring_address(Some((AVAIL + tx_mem_off) as u32), Some(0));
        txq.set_used_ring_address(Some((USED + tx_mem_off) as u32), Some(0));
        txq.set_ready(true);
        rx.desc(0, 0x8000, 2048, F_WRITE, 0);
        rx.desc(1, 0x9000, 20, F_WRITE, 0);
        rx.publish(1);
        rx.publish(0);
        net.activate(mem.clone(), vec![rx.queue(), txq], VIRTIO_F_VERSION_1)
            .expect("activate");

        peer.send(&[0xaa; 100]).expect("send frame");
        assert_eq!(net.process_rx().expect("rx"), 2);
        assert_eq!(net.dropped, 1, "the 20-byte buffer was too small");
        let mut got = [0u8; 112];
        mem.read_slice(&mut got, GuestAddress(0x8000))
            .expect("read");
        assert_eq!(got[10], 1);
        assert!(got[12..].iter().all(|b| *b == 0xaa));

        // Guest sends a frame: header + 60 bytes.
        mem.write_slice(&[0x55u8; 72], GuestAddress(0xa000))
            .expect("frame");
        let raw_desc = |i: u64, addr: u64, len: u32| {
            mem.write_obj(addr, GuestAddress(DESC + tx_mem_off + i * 16))
                .expect("addr");
            mem.write_obj(len, GuestAddress(DESC + tx_mem_off + i * 16 + 8))
                .expect("len");
        };
        raw_desc(0, 0xa000, 72);
        mem.write_obj(0u16, GuestAddress(AVAIL + tx_mem_off + 4))
            .expect("ring");
        mem.write_obj(1u16, GuestAddress(AVAIL + tx_mem_off + 2))
            .expect("idx");
        assert_eq!(net.process_tx().expect("tx"), 1);
        let mut frame = [0u8; 200];
        assert_eq!(peer.recv(&mut frame).expect("recv"), 60);
    }
}
