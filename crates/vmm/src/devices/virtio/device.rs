//! What every virtio device shares, in one place: its interrupt line, one eventfd per queue, and
//! its activation (guest memory and the driver's queues, from `activate` until a reset or a
//! failure). Devices keep only their own request processing; the transport-facing half of
//! [`super::VirtioDevice`] (`queue_events`, `activate`, `reset`, `queue_states`) delegates here.

use std::fmt::Display;
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Interrupt, MAX_CHAINS_PER_EVENT};

/// Guest memory and the queues the driver configured, held while the device is active.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
}

/// The shared part of a device: the transport-facing half of [`super::VirtioDevice`]
/// (`queue_events`, `activate`, `reset`, `queue_states`, `restored`) is this type's by default.
pub struct DeviceCore {
    irq: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    active: Option<Activation>,
}

impl DeviceCore {
    /// An inactive device on `irq` with `queues` fresh (non-blocking) queue eventfds.
    pub fn new(irq: Arc<Interrupt>, queues: usize) -> std::io::Result<Self> {
        let queue_evts = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            irq,
            queue_evts,
            active: None,
        })
    }

    /// The interrupt line.
    pub fn irq(&self) -> &Interrupt {
        &self.irq
    }

    /// One eventfd per queue (for the transport and the event loop).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Takes the driver's queues; refuses any other number than the device has.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_evts.len() {
            return Err(ActivateError::QueueCount(
                queues.len(),
                self.queue_evts.len(),
            ));
        }
        self.active = Some(Activation { mem, queues });
        Ok(())
    }

    /// Drops memory and queues (a reset, or a failure).
    pub fn deactivate(&mut self) {
        self.active = None;
    }

    /// True from activation until a reset or a failure.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Memory and queues, while active.
    pub fn active_mut(&mut self) -> Option<&mut Activation> {
        self.active.as_mut()
    }

    /// The active queues' state (None when inactive), for a snapshot.
    pub fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|a| super::queue_states(&a.queues))
    }

    /// Makes queue `q` look notified (the event loop then serves it).
    pub fn kick(&self, q: usize) {
        // A failed eventfd write only delays work until the guest's next notification.
        let _ = self.queue_evts[q].write(1);
    }

    /// Kicks every queue (after a restore: work the guest left in the rings).
    pub fn kick_all(&self) {
        for q in 0..self.queue_evts.len() {
            self.kick(q);
        }
    }

    /// Clears queue `q`'s notification before serving it.
    pub fn take_kick(&self, q: usize) {
        let _ = self.queue_evts[q].read();
    }

    /// After serving `served` chains of queue `q` in one event: at the per-event cap
    /// ([`MAX_CHAINS_PER_EVENT`]) the queue re-kicks itself so the rest is served after other
    /// devices had their turn.
    pub fn rekick_if_capped(&self, q: usize, served: usize) {
        if served >= MAX_CHAINS_PER_EVENT {
            self.kick(q);
        }
    }

    /// Ends one event's work: interrupts the guest when something was used; on an error (a
    /// malformed ring or chain) stops the device and tells the guest it needs a reset. Returns
    /// false when the device was failed.
    pub fn complete<E: Display>(&mut self, device: &str, served: Result<usize, E>) -> bool {
        match served {
            Ok(0) => true,
            Ok(_) => {
                self.irq.signal_used();
                true
            }
            Err(e) => {
                self.fail(device, &e);
                false
            }
        }
    }

    /// Stops the device (memory and queues dropped) and raises DEVICE_NEEDS_RESET.
    pub fn fail(&mut self, device: &str, why: &dyn Display) {
        eprintln!("cloude-vmm: {device} stopped: {why}");
        self.active = None;
        self.irq.fail();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    fn core(queues: usize) -> DeviceCore {
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        DeviceCore::new(irq, queues).expect("core")
    }

    #[test]
    fn activation_checks_the_queue_count_and_reset_drops_it() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("mmap");
        let mut c = core(2);
        assert_eq!(c.queue_events().len(), 2);
        let one = vec![Queue::new(16).expect("q")];
        assert!(matches!(
            c.activate(mem.clone(), one),
            Err(ActivateError::QueueCount(1, 2))
        ));
        assert!(!c.is_active() && c.queue_states().is_none());
        let two = vec![Queue::new(16).expect("q"), Queue::new(16).expect("q")];
        c.activate(mem, two).expect("activate");
        assert_eq!(c.queue_states().map(|s| s.len()), Some(2));
        c.deactivate();
        assert!(!c.is_active());
    }

    #[test]
    fn rekick_only_at_the_cap_and_failure_raises_needs_reset() {
        let mut c = core(1);
        c.rekick_if_capped(0, MAX_CHAINS_PER_EVENT - 1);
        assert!(c.queue_events()[0].read().is_err(), "no kick below the cap");
        c.rekick_if_capped(0, MAX_CHAINS_PER_EVENT);
        assert_eq!(c.queue_events()[0].read().expect("kicked"), 1);
        assert!(c.complete("test", Ok::<_, String>(0)));
        assert!(!c.irq().failed());
        assert!(!c.complete("test", Err::<usize, _>("bad ring")));
        assert!(c.irq().failed());
    }
}
