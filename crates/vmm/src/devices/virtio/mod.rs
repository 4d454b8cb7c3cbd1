//! virtio over MMIO: the transport, the device trait, the state every device shares
//! (`device`), and the devices (block, rng, net, vsock), each with its request processing in
//! `<dev>.rs` and its event-loop glue in `<dev>/event_handler.rs`.

pub mod block;
pub mod device;
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use device::DeviceCore;

/// Feature bit: modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Most chains a device handles per queue per event before yielding (it re-kicks itself for the
/// rest; the device thread's CPU budget, `devices/pace.rs`, bounds the total).
pub const MAX_CHAINS_PER_EVENT: usize = 256;
/// Device ids.
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The interrupt line of one device, shared by the transport (status/ack) and the device.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// Wraps an irqfd registered with KVM.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Signals "used buffers available".
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        // A failed eventfd write only loses an interrupt the guest's next kick recovers.
        let _ = self.irqfd.write(1);
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the guest.
    pub fn fail(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        let _ = self.irqfd.write(1);
    }

    /// True after [`Interrupt::fail`] until the device is reset.
    pub fn failed(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Interrupt status and the needs-reset flag, for a snapshot.
    pub fn save(&self) -> (u32, bool) {
        (self.status(), self.failed())
    }

    /// Puts back saved status bits and re-raises the line if any is set (the guest may not have
    /// seen the interrupt before the snapshot; a spurious one is harmless).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0 {
            let _ = self.irqfd.write(1);
        }
    }
}

/// Activation failures.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver configured {0} queues, the device needs {1}")]
    QueueCount(usize, usize),
    #[error("device I/O setup failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A virtio device behind the MMIO transport. Request processing lives in the device; the
/// event-loop glue (its `MutEventSubscriber` impl, in `<dev>/event_handler.rs`) drives it; the
/// queue eventfds, activation and failure are [`device::DeviceCore`]'s.
pub trait VirtioDevice: Send {
    /// virtio device id.
    fn device_type(&self) -> u32;
    /// Offered feature bits.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The state every device shares (interrupt, queue eventfds, activation).
    fn core(&self) -> &DeviceCore;
    fn core_mut(&mut self) -> &mut DeviceCore;
    /// One eventfd per queue, signalled when the guest notifies that queue.
    fn queue_events(&self) -> &[EventFd] {
        self.core().queue_events()
    }
    /// Starts the device with the driver's queues and negotiated features.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        self.core_mut().activate(mem, queues)
    }
    /// Returns to the pre-activation state (drops queues, and a device's own connections).
    fn reset(&mut self) {
        self.core_mut().deactivate();
    }
    /// The active queues' state (None before activation or after a failure), for a snapshot.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.core().queue_states()
    }
    /// Called after a restore re-activated the device: picks up work the guest left in the
    /// rings (by default every queue is kicked). Returns true when the device's configuration
    /// differs from the snapshotted one (the transport then bumps the config generation).
    fn restored(&mut self) -> bool {
        self.core().kick_all();
        false
    }
}

/// States of a list of queues.
pub fn queue_states(queues: &[Queue]) -> Vec<virtio_queue::QueueState> {
    queues.iter().map(|q| q.state()).collect()
}

/// Reads `data.len()` bytes at `offset` of a config blob (zeros past its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
