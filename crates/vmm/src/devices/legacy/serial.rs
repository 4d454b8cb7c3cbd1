//! The 8250/16550 UART on COM1 (vm-superio); output goes to our stdout byte for byte.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::BusDevice;

/// Console lines after which the guest has halted or powered off for good (no ACPI, so
/// `poweroff -f` ends in a halt loop the VMM cannot otherwise see).
const POWER_OFF_LINES: [&[u8]; 2] = [b"reboot: Power down", b"reboot: System halted"];
/// Longest console line the power-off watcher remembers.
const LINE_CAP: usize = 64;

/// Writer that forwards to an inner writer and watches for the power-off line.
pub struct Console<W: Write> {
    out: W,
    line: Vec<u8>,
    powered_off: Arc<AtomicBool>,
}

impl<W: Write> Console<W> {
    /// Wraps `out`.
    pub fn new(out: W, powered_off: Arc<AtomicBool>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(LINE_CAP),
            powered_off,
        }
    }
}

impl<W: Write> Write for Console<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            if *b == b'\n' || *b == b'\r' {
                let l = &self.line;
                if POWER_OFF_LINES.iter().any(|p| l.ends_with(p)) {
                    self.powered_off.store(true, Ordering::Relaxed);
                }
                self.line.clear();
            } else if self.line.len() < LINE_CAP {
                self.line.push(*b);
            }
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// COM1 on the port I/O bus.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Console<W>>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// `irq` is the interrupt eventfd (an irqfd for GSI 4).
    /// `powered_off` is set once the guest printed its final power-off line.
    pub fn new(irq: EventFdTrigger, out: W, powered_off: Arc<AtomicBool>) -> Self {
        Self {
            uart: Serial::new(irq, Console::new(out, powered_off)),
        }
    }
}

/// The 8250 registers and receive FIFO, as saved in a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// At most [`crate::snapshot::MAX_SERIAL_FIFO`] bytes.
    pub in_buffer: Vec<u8>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// The registers, for a snapshot.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with saved registers (raising the interrupt they say is pending).
    pub fn restored(
        st: &SerialState,
        irq: EventFdTrigger,
        out: W,
        powered_off: Arc<AtomicBool>,
    ) -> Result<Self, String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &s,
            irq,
            vm_superio::serial::NoEvents,
            Console::new(out, powered_off),
        )
        .map_err(|e| format!("the saved serial state is invalid: {e:?}"))?;
        Ok(Self { uart })
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // Output errors (closed stdout) must not stop the guest.
            let _ = self.uart.write(off, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn bytes_pass_through_and_power_off_is_seen() {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let off = Arc::new(AtomicBool::new(false));
        let mut dev = SerialDevice::new(EventFdTrigger(irq), Vec::new(), off.clone());
        for b in b"hi\n[ 1.0] reboot: Power down\r\n" {
            dev.write(0, &[*b]);
        }
        assert!(off.load(Ordering::Relaxed));
        assert!(dev.uart.writer().out.starts_with(b"hi\n[ 1.0] reboot"));
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
    }
}
