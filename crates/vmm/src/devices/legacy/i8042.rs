//! i8042 keyboard controller: only the CPU reset command (0xFE to port 0x64) matters.

use crate::devices::BusDevice;
use vm_superio::{I8042Device, Trigger};

/// The i8042 at ports 0x60..=0x64.
pub struct I8042<T: Trigger> {
    dev: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// `reset` is signalled when the guest asks for a CPU reset.
    pub fn new(reset: T) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A failing reset eventfd cannot be reported to the guest; the exit path logs it.
            let _ = self.dev.write(off, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::EventFdTrigger;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().expect("clone")));
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "data port write is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().expect("reset"), 1);
    }
}
