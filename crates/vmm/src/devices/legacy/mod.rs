//! Legacy PC devices: the COM1 UART and the i8042 reset line.

pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A `vm_superio::Trigger` backed by an eventfd (an irqfd or the reset event).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
