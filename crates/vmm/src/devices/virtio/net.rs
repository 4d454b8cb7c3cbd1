//! placeholder
use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::Arc;
pub struct Net;
impl Net {
    pub fn new<A, B>(_a: A, _b: B, _irq: Arc<Interrupt>) -> std::io::Result<Self> {
        Err(std::io::Error::other("not yet"))
    }
}
impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        0
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }
    fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        &[]
    }
    fn read_config(&self, _o: u64, _d: &mut [u8]) {}
    fn activate(
        &mut self,
        _m: vm_memory::GuestMemoryMmap,
        _q: Vec<virtio_queue::Queue>,
        _a: u64,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}
impl MutEventSubscriber for Net {
    fn init(&mut self, _o: &mut EventOps) {}
    fn process(&mut self, _e: Events, _o: &mut EventOps) {}
}
