//! KVM state: the VM (memory, irqchip, PIT) and the vCPUs with their run loops.

pub mod vcpu;
pub mod vm;

/// Why the VM stopped. Sent by vCPU threads and devices to the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted, powered off or triple-faulted: a normal end (exit status 0).
    Stopped(&'static str),
    /// The guest cannot continue (one sentence for stderr, non-zero exit).
    Failed(String),
}

/// Sends a [`VmExit`] when triggered (used as the i8042 reset line).
pub struct ExitTrigger(pub std::sync::mpsc::Sender<VmExit>, pub VmExit);

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        // The receiver only disappears when the process is exiting anyway.
        let _ = self.0.send(self.1.clone());
        Ok(())
    }
}
