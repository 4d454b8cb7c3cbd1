//! virtio-vsock with Firecracker-style hybrid host sockets.
//!
//! `packet` (header parsing) and `../queue` (chain walking) are the guest-facing parsers; `conn`
//! and `muxer` hold host-side state; this file is the device, `event_handler` its event-loop glue.

pub mod conn;
mod event_handler;
pub mod muxer;
pub mod packet;

use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::DeviceCore;
use super::queue::{self, ChainError};
use super::{
    ActivateError, Interrupt, VirtioDevice, MAX_CHAINS_PER_EVENT, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use muxer::Muxer;
use packet::{check_structure, Header, PacketError, HDR_SIZE, MAX_PKT_PAYLOAD};

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// `struct virtio_vsock_event` id: the guest must drop its connections and re-read its CID.
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

const DATA_LISTENER: u32 = 3;
const DATA_CONN: u32 = 4;

/// Errors that fail the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("bad packet: {0}")]
    Packet(#[from] PacketError),
    #[error("an RX buffer is smaller than a vsock header")]
    SmallRxBuffer,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    core: DeviceCore,
    muxer: Muxer,
    buf: Vec<u8>,
    /// A transport reset event waits for a guest event-queue buffer.
    reset_event_pending: bool,
    /// The reset event was delivered and the guest has not yet refilled its event queue (which
    /// Linux does right after handling the event). Until then nothing is sent to the guest: a
    /// connection it accepted before handling the reset would be dropped by that reset without
    /// a word to the host, leaving the host client waiting.
    awaiting_reset_ack: bool,
}

impl Vsock {
    /// Creates the device and binds the host socket at `uds`.
    pub fn new(cid: u64, uds: &Path, irq: Arc<Interrupt>) -> std::io::Result<Self> {
        Ok(Self {
            cid,
            core: DeviceCore::new(irq, QUEUE_SIZES.len())?,
            muxer: Muxer::new(cid, uds)?,
            buf: vec![0u8; MAX_PKT_PAYLOAD as usize],
            reset_event_pending: false,
            awaiting_reset_ack: false,
        })
    }

    /// The guest notified the event queue (it refilled it, so it has handled a delivered
    /// reset); delivers a reset that was still waiting for a buffer.
    pub fn event_queue_kicked(&mut self) -> Result<usize, VsockError> {
        if !self.reset_event_pending {
            self.awaiting_reset_ack = false;
        }
        self.send_events()
    }

    /// Delivers a pending transport reset event into the event queue; returns chains used.
    pub fn send_events(&mut self) -> Result<usize, VsockError> {
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        if !self.reset_event_pending {
            return Ok(0);
        }
        let Some(chain) = queue::pop(&mut a.queues[EVQ], &a.mem)? else {
            return Ok(0);
        };
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let n = queue::scatter(&a.mem, &chain.writable, 0, &event)?;
        queue::add_used(&mut a.queues[EVQ], &a.mem, chain.head, n as u32)?;
        self.reset_event_pending = false;
        self.awaiting_reset_ack = true;
        Ok(1)
    }

    /// Handles guest TX packets; returns how many were consumed.
    pub fn process_tx(&mut self) -> Result<usize, VsockError> {
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        let mut n = 0;
        while n < MAX_CHAINS_PER_EVENT {
            let Some(chain) = queue::pop(&mut a.queues[TXQ], &a.mem)? else {
                break;
            };
            let mut hdr = [0u8; HDR_SIZE];
            let got = queue::gather(&a.mem, &chain.readable, 0, &mut hdr)?;
            let h = Header::parse(&hdr[..got])?;
            check_structure(&h, chain.readable_len() - HDR_SIZE as u64)?;
            let len = h.len as usize;
            queue::gather(
                &a.mem,
                &chain.readable,
                HDR_SIZE as u64,
                &mut self.buf[..len],
            )?;
            self.muxer.handle_guest_packet(&h, &self.buf[..len]);
            queue::add_used(&mut a.queues[TXQ], &a.mem, chain.head, 0)?;
            n += 1;
        }
        self.core.rekick_if_capped(TXQ, n);
        Ok(n)
    }

    /// Fills guest RX buffers with pending packets; returns how many were delivered.
    pub fn process_rx(&mut self) -> Result<usize, VsockError> {
        if self.awaiting_reset_ack {
            return Ok(0);
        }
        let Some(a) = self.core.active_mut() else {
            return Ok(0);
        };
        let mut n = 0;
        while n < MAX_CHAINS_PER_EVENT && self.muxer.has_work() {
            let q = &mut a.queues[RXQ];
            let Some(chain) = queue::pop(q, &a.mem)? else {
                break;
            };
            let room = chain
                .writable_len()
                .checked_sub(HDR_SIZE as u64)
                .ok_or(VsockError::SmallRxBuffer)?;
            let cap = (room.min(u64::from(MAX_PKT_PAYLOAD))) as usize;
            let Some((h, len)) = self.muxer.next_packet(&mut self.buf[..cap]) else {
                // Nothing after all: give the buffer back.
                q.set_next_avail(q.next_avail().wrapping_sub(1));
                break;
            };
            queue::scatter(&a.mem, &chain.writable, 0, &h.encode())?;
            queue::scatter(&a.mem, &chain.writable, HDR_SIZE as u64, &self.buf[..len])?;
            queue::add_used(q, &a.mem, chain.head, (HDR_SIZE + len) as u32)?;
            n += 1;
        }
        if self.muxer.has_work() {
            self.core.rekick_if_capped(RXQ, n);
        }
        Ok(n)
    }

    /// Ends one event's work: interrupts the guest when something was used, or fails the
    /// device (and drops its host connections) on a malformed ring or packet.
    fn complete(&mut self, served: Result<usize, VsockError>) {
        if !self.core.complete("virtio-vsock", served) {
            self.muxer.reset();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
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
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        self.core.activate(mem, queues)?;
        // Deliver anything that arrived before the driver was ready.
        self.core.kick(RXQ);
        Ok(())
    }
    fn reset(&mut self) {
        self.core.deactivate();
        self.muxer.reset();
        self.reset_event_pending = false;
        self.awaiting_reset_ack = false;
    }
    /// After a restore: the guest's connections belong to the old process (and maybe the old
    /// CID), so it gets `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (it then drops its connections and
    /// re-reads the CID from the configuration space).
    fn restored(&mut self) -> bool {
        // Host ports of this process's connections must not collide with those of the
        // snapshotted process that the guest may still name before it handles the reset.
        self.muxer.set_port_base(std::process::id());
        // TX and RX pick up what the guest left in the rings; the event queue is not kicked
        // here: its next notification is the guest's sign that it handled the reset.
        self.core.kick(TXQ);
        self.core.kick(RXQ);
        self.reset_event_pending = true;
        let sent = self.send_events();
        self.complete(sent);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const CID: u64 = 3;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Vsock,
        _dir: tempfile::TempDir,
        uds: std::path::PathBuf,
    }

    /// RX ring at 0x1000.., TX ring at 0x11000.. (separate tables).
    fn rig() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mmap");
        let dir = tempfile::tempdir().expect("dir");
        let uds = dir.path().join("v.sock");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let mut dev = Vsock::new(CID, &uds, irq).expect("vsock");
        let mk = |off: u64| {
            let mut q = Queue::new(256).expect("queue");
            q.set_size(16);
            q.set_desc_table_address(Some((DESC + off) as u32), Some(0));
            q.set_avail_ring_address(Some((AVAIL + off) as u32), Some(0));
            q.set_used_ring_address(Some((USED + off) as u32), Some(0));
            q.set_ready(true);
            q
        };
        dev.activate(
            mem.clone(),
            vec![mk(0), mk(0x10000), mk(0x20000)],
            VIRTIO_F_VERSION_1,
        )
        .expect("activate");
        Rig {
            mem,
            dev,
            _dir: dir,
            uds,
        }
    }

    fn write_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + u64::from(i) * 16))
            .expect("desc");
    }

    fn publish(mem: &GuestMemoryMmap, avail: u64, idx: u16, head: u16) {
        mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % 16)))
            .expect("ring");
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .expect("idx");
    }

    fn guest_tx(r: &mut Rig, idx: u16, h: Header, payload: &[u8]) -> Result<usize, VsockError> {
        let buf = 0x200000 + u64::from(idx) * 0x1000;
        r.mem
            .write_slice(&h.encode(), GuestAddress(buf))
            .expect("hdr");
        r.mem
            .write_slice(payload, GuestAddress(buf + HDR_SIZE as u64))
            .expect("payload");
        let slot = idx % 16;
        write_desc(
            &r.mem,
            DESC + 0x10000,
            slot,
            buf,
            (HDR_SIZE + payload.len()) as u32,
            0,
            0,
        );
        publish(&r.mem, AVAIL + 0x10000, idx, slot);
        r.dev.process_tx()
    }

    fn guest_rx(r: &mut Rig, idx: u16) -> Option<(Header, Vec<u8>)> {
        let buf = 0x300000 + u64::from(idx % 16) * 0x2000;
        let slot = idx % 16;
        write_desc(
            &r.mem,
            DESC,
            slot,
            buf,
            (HDR_SIZE + 4096) as u32,
            F_WRITE,
            0,
        );
        publish(&r.mem, AVAIL, idx, slot);
        let n = r.dev.process_rx().expect("rx");
        if n == 0 {
            return None;
        }
        let mut hdr = [0u8; HDR_SIZE];
        r.mem.read_slice(&mut hdr, GuestAddress(buf)).expect("read");
        let h = Header::parse(&hdr).expect("parse");
        let mut data = vec![0u8; h.len as usize];
        r.mem
            .read_slice(&mut data, GuestAddress(buf + HDR_SIZE as u64))
            .expect("read");
        Some((h, data))
    }

    fn from_guest(op: u16, src: u32, dst: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn end_to_end_over_rings() {
        let mut r = rig();
        let mut client = UnixStream::connect(&r.uds).expect("connect");
        client.write_all(b"CONNECT 1024\n").expect("write");
        r.dev.muxer.accept();
        let fd = r.dev.muxer.take_added()[0];
        r.dev.muxer.on_fd(fd, EventSet::IN);
        let (req, _) = guest_rx(&mut r, 0).expect("request");
        assert_eq!(req.op, OP_REQUEST);
        guest_tx(&mut r, 0, from_guest(OP_RESPONSE, 1024, req.src_port), &[]).expect("tx");
        let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
        client.read_exact(&mut line).expect("ok");
        let payload = vec![0xabu8; 3000];
        guest_tx(
            &mut r,
            1,
            Header {
                len: 3000,
                ..from_guest(OP_RW, 1024, req.src_port)
            },
            &payload,
        )
        .expect("tx");
        let mut got = vec![0u8; 3000];
        client.read_exact(&mut got).expect("data");
        assert_eq!(got, payload);
        client.write_all(b"pong").expect("write");
        r.dev.muxer.on_fd(fd, EventSet::IN);
        let (h, d) = guest_rx(&mut r, 1).expect("rw");
        assert_eq!((h.op, d.as_slice()), (OP_RW, &b"pong"[..]));
    }

    /// After a restore the guest gets TRANSPORT_RESET in an event buffer, and nothing is sent to
    /// it until it has refilled the event queue (handled the reset).
    #[test]
    fn restore_sends_transport_reset_and_holds_rx_until_it_is_handled() {
        let mut r = rig();
        let (evq_desc, evq_avail, evq_used) = (DESC + 0x20000, AVAIL + 0x20000, USED + 0x20000);
        r.mem
            .write_obj(0xffff_ffffu32, GuestAddress(0x380000))
            .expect("poison");
        write_desc(&r.mem, evq_desc, 0, 0x380000, 4, F_WRITE, 0);
        publish(&r.mem, evq_avail, 0, 0);
        assert!(r.dev.restored(), "config generation bumps");
        let mut client = UnixStream::connect(&r.uds).expect("connect");
        client.write_all(b"CONNECT 1024\n").expect("write");
        r.dev.muxer.accept();
        let fd = r.dev.muxer.take_added()[0];
        r.dev.muxer.on_fd(fd, EventSet::IN);
        let used: u16 = r
            .mem
            .read_obj(GuestAddress(evq_used + 2))
            .expect("used idx");
        assert_eq!(used, 1);
        let len: u32 = r
            .mem
            .read_obj(GuestAddress(evq_used + 8))
            .expect("used len");
        assert_eq!(len, 4);
        let id: u32 = r.mem.read_obj(GuestAddress(0x380000)).expect("event");
        assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
        assert!(
            guest_rx(&mut r, 0).is_none(),
            "RX held until the guest handled the reset"
        );
        r.dev.event_queue_kicked().expect("kick");
        assert_eq!(
            r.dev.process_rx().expect("rx"),
            1,
            "the request goes out now"
        );
        let mut hdr = [0u8; HDR_SIZE];
        r.mem
            .read_slice(&mut hdr, GuestAddress(0x300000))
            .expect("read");
        let h = Header::parse(&hdr).expect("parse");
        assert_eq!(h.op, OP_REQUEST);
        assert_eq!(h.dst_port, 1024);
        assert!(
            h.src_port > 1 << 30 | 0xffff,
            "restored port window: {:#x}",
            h.src_port
        );
    }

    #[test]
    fn truncated_header_and_lying_length_fail_the_device() {
        let mut r = rig();
        let buf = 0x200000;
        write_desc(&r.mem, DESC + 0x10000, 0, buf, 20, 0, 0);
        publish(&r.mem, AVAIL + 0x10000, 0, 0);
        assert!(matches!(
            r.dev.process_tx(),
            Err(VsockError::Packet(PacketError::Truncated))
        ));

        let mut r = rig();
        let h = Header {
            len: 60000,
            ..from_guest(OP_RW, 1, 2)
        };
        assert!(matches!(
            guest_tx(&mut r, 0, h, b"short"),
            Err(VsockError::Packet(PacketError::BadLength(60000)))
        ));
    }

    #[test]
    fn tiny_rx_buffer_fails_the_device() {
        let mut r = rig();
        r.dev
            .muxer
            .handle_guest_packet(&from_guest(OP_RW, 1, 2), &[]); // queues a reset
        write_desc(&r.mem, DESC, 0, 0x300000, 10, F_WRITE, 0);
        publish(&r.mem, AVAIL, 0, 0);
        assert!(matches!(r.dev.process_rx(), Err(VsockError::SmallRxBuffer)));
    }

    /// The device-thread spin from the review: a hostile guest keeps re-publishing the same TX
    /// descriptors (a reset-provoking packet each) as fast as it can, so the device always has a
    /// full batch. The device loop stays within its CPU share, and the budget is what holds it.
    #[test]
    fn a_guest_flooding_the_tx_ring_gets_at_most_the_device_share() {
        use crate::devices::pace;
        use event_manager::{MutEventSubscriber, SubscriberOps};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Mutex;
        use std::time::{Duration, Instant};
        let r = rig();
        let pkt = 0x200000;
        r.mem
            .write_slice(&from_guest(OP_RW, 7, 9).encode(), GuestAddress(pkt))
            .expect("hdr");
        for slot in 0..16 {
            write_desc(&r.mem, DESC + 0x10000, slot, pkt, HDR_SIZE as u32, 0, 0);
            r.mem
                .write_obj(
                    slot,
                    GuestAddress(AVAIL + 0x10000 + 4 + 2 * u64::from(slot)),
                )
                .expect("ring");
        }
        let kick = r.dev.queue_events()[TXQ].try_clone().expect("eventfd");
        let mem = r.mem.clone();
        let dev: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(r.dev));
        let mut events =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .expect("event manager");
        events.add_subscriber(dev);
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let guest = {
            let (stop, published) = (stop.clone(), published.clone());
            std::thread::spawn(move || {
                let mut avail: u16 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let used: u16 = mem
                        .read_obj(GuestAddress(USED + 0x10000 + 2))
                        .expect("used idx");
                    let next = used.wrapping_add(16);
                    published.fetch_add(u64::from(next.wrapping_sub(avail)), Ordering::Relaxed);
                    avail = next;
                    mem.write_obj(avail, GuestAddress(AVAIL + 0x10000 + 2))
                        .expect("avail idx");
                    let _ = kick.write(1);
                }
            })
        };
        let window = Duration::from_millis(1500);
        let started = Instant::now();
        let cpu0 = pace::thread_cpu();
        let pacer = pace::device_loop(&mut events, 10, || started.elapsed() < window);
        let cpu = (pace::thread_cpu() - cpu0).as_secs_f64();
        let wall = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        guest.join().expect("guest thread");
        let chains = published.load(Ordering::Relaxed);
        eprintln!(
            "device thread: {:.0} % of a core over {wall:.2} s, {chains} chains, throttled {:?}",
            100.0 * cpu / wall,
            pacer.throttled
        );
        assert!(chains > 10_000, "the flood ran ({chains} chains)");
        assert!(
            pacer.throttled > Duration::ZERO,
            "the budget held the device thread"
        );
        assert!(
            cpu / wall <= pace::DEVICE_CPU_SHARE + 0.1,
            "device thread used {:.2} of a core",
            cpu / wall
        );
    }
}
