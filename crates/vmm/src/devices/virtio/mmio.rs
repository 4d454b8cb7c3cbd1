//! The virtio-mmio transport (version 2 register layout).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::lock;
use crate::devices::BusDevice;

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554c_4344; // "DCLU"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Offset of the queue-notify register (the ioeventfd address).
pub const NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

/// Most queues a device may have in a snapshot.
pub const MAX_QUEUES: usize = 8;

/// One virtqueue's registers and ring positions, as saved in a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSnap {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The device's next available-ring index to read.
    pub next_avail: u16,
    /// The device's next used-ring index to write.
    pub next_used: u16,
}

impl From<virtio_queue::QueueState> for QueueSnap {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

impl QueueSnap {
    fn to_queue(self) -> Result<Queue, String> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("a saved virtqueue is invalid: {e}"))
    }
}

/// A virtio-mmio transport's registers and its device's queues, as saved in a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MmioState {
    pub device_type: u32,
    pub features_acked: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    /// The driver set DRIVER_OK and the device was started.
    pub activated: bool,
    /// The device was running (not failed) when saved; its queues are the live ones.
    pub device_active: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    /// At most [`MAX_QUEUES`].
    pub queues: Vec<QueueSnap>,
}

/// The transport: common registers and queue setup; forwards the rest to the device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        mem: GuestMemoryMmap,
    ) -> Self {
        let queues = Self::fresh_queues(&*lock(&device));
        Self {
            device,
            interrupt,
            mem,
            queues,
            features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn fresh_queues(dev: &dyn VirtioDevice) -> Vec<Queue> {
        dev.queue_max_sizes()
            .iter()
            .map(|s| Queue::new(*s).expect("device queue sizes are powers of two"))
            .collect()
    }

    /// The device behind this transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The transport's and device's state.
    pub fn save(&self) -> MmioState {
        let dev = lock(&self.device);
        self.save_with(&*dev)
    }

    /// Like [`MmioTransport::save`], with the device already locked by the caller (who keeps
    /// it locked to keep it quiescent).
    pub fn save_with(&self, dev: &dyn VirtioDevice) -> MmioState {
        let live = if self.activated {
            dev.queue_states()
        } else {
            None
        };
        let device_active = live.is_some();
        let queues = match live {
            Some(q) => q.into_iter().map(QueueSnap::from).collect(),
            None => super::queue_states(&self.queues)
                .into_iter()
                .map(QueueSnap::from)
                .collect(),
        };
        let (interrupt_status, needs_reset) = self.interrupt.save();
        MmioState {
            device_type: dev.device_type(),
            features_acked: self.features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            device_active,
            interrupt_status,
            needs_reset,
            queues,
        }
    }

    /// Puts saved registers back and, if the device was running, restarts it on the saved
    /// queues (checked against guest memory) and lets it pick up pending work
    /// ([`VirtioDevice::restored`]). Call on a fresh transport, before the device thread runs.
    pub fn restore(&mut self, st: &MmioState) -> Result<(), String> {
        let (device_type, max_sizes, offered) = {
            let dev = lock(&self.device);
            (
                dev.device_type(),
                dev.queue_max_sizes().to_vec(),
                dev.features(),
            )
        };
        if st.device_type != device_type {
            return Err(format!(
                "the saved device type {} is not this slot's {device_type}",
                st.device_type
            ));
        }
        if st.queues.len() != max_sizes.len()
            || st
                .queues
                .iter()
                .zip(&max_sizes)
                .any(|(q, m)| q.max_size != *m)
        {
            return Err(format!(
                "the saved queues of device type {device_type} do not match the device"
            ));
        }
        if st.features_acked & !offered != 0 {
            return Err(format!(
                "the saved features of device type {device_type} were never offered"
            ));
        }
        let queues = st
            .queues
            .iter()
            .map(|q| q.to_queue())
            .collect::<Result<Vec<_>, _>>()?;
        if st.activated && st.device_active {
            if queues.iter().any(|q| q.ready() && !q.is_valid(&self.mem)) {
                return Err("a saved virtqueue lies outside guest memory".into());
            }
            lock(&self.device)
                .activate(self.mem.clone(), queues, st.features_acked)
                .map_err(|e| format!("the device did not restart: {e}"))?;
        } else if !st.activated {
            self.queues = queues;
        }
        self.features = st.features_acked;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.queue_sel = st.queue_sel;
        self.status = st.status;
        self.config_generation = st.config_generation;
        self.activated = st.activated;
        self.interrupt.restore(
            st.interrupt_status,
            st.needs_reset || (st.activated && !st.device_active),
        );
        if st.activated && st.device_active {
            let mut dev = lock(&self.device);
            if dev.restored() {
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        }
        Ok(())
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.queues = Self::fresh_queues(&*lock(&self.device));
        self.features = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.interrupt.reset();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK != 0 && !self.activated {
            self.activated = true;
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            let res = if valid {
                let queues =
                    std::mem::replace(&mut self.queues, Self::fresh_queues(&*lock(&self.device)));
                lock(&self.device)
                    .activate(self.mem.clone(), queues, self.features)
                    .map_err(|e| e.to_string())
            } else {
                Err("a queue lies outside guest memory".into())
            };
            if let Err(e) = res {
                eprintln!("cloude-vmm: virtio device failed to start: {e}");
                self.interrupt.fail();
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let dev = lock(&self.device);
        let v = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => dev.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => dev.features() as u32,
                1 => (dev.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => dev
                .queue_max_sizes()
                .get(self.queue_sel as usize)
                .map_or(0, |s| u32::from(*s)),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready() || self.activated)),
            0x60 => self.interrupt.status(),
            0x70 => {
                let broken = if self.interrupt.failed() {
                    STATUS_NEEDS_RESET
                } else {
                    0
                };
                self.status | broken
            }
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            // No device has writable configuration.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => {
                let offered = lock(&self.device).features();
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.features =
                    (self.features & !mask) | ((u64::from(v) << shift) & offered & mask);
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            NOTIFY_OFFSET => {
                // Normally caught by the ioeventfd; this is the slow path.
                if let Some(e) = lock(&self.device).queue_events().get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => {
                if v & STATUS_FEATURES_OK != 0 && self.features & VIRTIO_F_VERSION_1 == 0 {
                    // Legacy drivers are not supported: refuse FEATURES_OK.
                    self.status = v & !STATUS_FEATURES_OK;
                    return;
                }
                let _ = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FAILED);
                self.set_status(v);
            }
            0x80 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::{AVAIL, DESC, USED};
    use crate::devices::virtio::rng::Rng;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn negotiates_and_activates() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let rng = Arc::new(Mutex::new(Rng::new(irq.clone()).expect("rng")));
        let mut t = MmioTransport::new(rng.clone(), irq.clone(), mem);
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 8), super::super::TYPE_RNG);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 offered");
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // A legacy driver (no VERSION_1) cannot set FEATURES_OK.
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 8);
        wr(&mut t, 0x80, DESC as u32);
        wr(&mut t, 0x90, AVAIL as u32);
        wr(&mut t, 0xa0, USED as u32);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        assert!(!irq.failed());
        assert!(lock(&rng).is_active());
        wr(&mut t, 0x70, 0);
        assert!(!lock(&rng).is_active());
    }

    /// A running device's transport saved and restored into a fresh transport and device: the
    /// registers read back the same, the device runs on the saved queues and ring positions.
    #[test]
    fn save_and_restore_round_trip() {
        use crate::devices::virtio::queue::testing::{RingBuilder, F_WRITE};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let rng = Arc::new(Mutex::new(Rng::new(irq.clone()).expect("rng")));
        let mut t = MmioTransport::new(rng.clone(), irq.clone(), mem.clone());
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, 0xb);
        wr(&mut t, 0x38, 8);
        wr(&mut t, 0x80, DESC as u32);
        wr(&mut t, 0x90, AVAIL as u32);
        wr(&mut t, 0xa0, USED as u32);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        let mut ring = RingBuilder::new(&mem, 8);
        ring.desc(0, 0x8000, 16, F_WRITE, 0);
        ring.publish(0);
        assert_eq!(lock(&rng).process_queue().expect("serve"), 1);
        irq.signal_used();
        let saved = t.save();
        assert!(saved.activated && saved.device_active);
        assert_eq!(saved.queues[0].next_avail, 1);
        assert_eq!(saved.interrupt_status, 1);

        let irq2 = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let rng2 = Arc::new(Mutex::new(Rng::new(irq2.clone()).expect("rng")));
        let mut t2 = MmioTransport::new(rng2.clone(), irq2.clone(), mem.clone());
        t2.restore(&saved).expect("restore");
        for off in [0x10u64, 0x44, 0x60, 0x70, 0xfc] {
            assert_eq!(rd(&mut t, off), rd(&mut t2, off), "register {off:#x}");
        }
        assert!(lock(&rng2).is_active());
        assert_eq!(t2.save(), saved);
        // The next request is served from the saved position.
        ring.desc(1, 0x9000, 16, F_WRITE, 0);
        ring.publish(1);
        assert_eq!(lock(&rng2).process_queue().expect("serve"), 1);
        let used_idx: u16 = vm_memory::Bytes::read_obj(&mem, GuestAddress(USED + 2)).expect("idx");
        assert_eq!(used_idx, 2);

        // A state for another device type, or with other queue sizes, is refused.
        let mut other = saved.clone();
        other.device_type = 19;
        let t3 = &mut MmioTransport::new(
            Arc::new(Mutex::new(Rng::new(irq2.clone()).expect("rng"))),
            irq2.clone(),
            mem.clone(),
        );
        assert!(t3.restore(&other).is_err());
        let mut other = saved.clone();
        other.queues[0].size = 3;
        assert!(t3.restore(&other).is_err());
        let mut other = saved;
        other.queues[0].desc_table = 0xffff_f000;
        assert!(t3.restore(&other).is_err());
    }

    #[test]
    fn queue_outside_memory_fails_device() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let rng = Arc::new(Mutex::new(Rng::new(irq.clone()).expect("rng")));
        let mut t = MmioTransport::new(rng, irq.clone(), mem);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, 0xb);
        wr(&mut t, 0x38, 8);
        wr(&mut t, 0x80, 0xffff_f000);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        assert!(irq.failed());
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }
}
