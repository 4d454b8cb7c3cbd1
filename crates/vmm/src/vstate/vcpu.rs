//! vCPU configuration and the per-vCPU run loop (one thread each).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::vm::Vm;
use super::VmExit;
use crate::arch::x86_64::boot::EntryPoint;
use crate::arch::x86_64::{cpuid, regs};
use crate::devices::Bus;
use crate::stats::ExitKind;

/// KVM's internal error sub-code for an instruction it could not emulate.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// Errors while configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
}

/// One configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio: Bus,
    mmio: Bus,
    exit: Sender<VmExit>,
    /// Set by the serial console when the guest printed its final power-off line.
    powered_off: Arc<AtomicBool>,
    /// Called once right before the first KVM_RUN (start-up measurements).
    pub before_first_run: Option<Box<dyn FnOnce() + Send>>,
}

impl Vcpu {
    /// Creates and configures vCPU `index` of `count`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &Vm,
        index: u8,
        count: u8,
        entry: EntryPoint,
        pio: Bus,
        mmio: Bus,
        exit: Sender<VmExit>,
        powered_off: Arc<AtomicBool>,
    ) -> Result<Self, VcpuError> {
        let k = |what| move |source| VcpuError::Kvm { what, source };
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(k("create a vCPU"))?;
        let mut c = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(k("report its supported CPUID"))?;
        cpuid::adjust(&mut c, index, count)?;
        fd.set_cpuid2(&c).map_err(k("set the vCPU CPUID"))?;
        regs::setup_msrs(&fd)?;
        if index == 0 {
            regs::setup_regs(&fd, entry)?;
            regs::setup_sregs(&vm.mem, &fd, entry)?;
        }
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        Ok(Self {
            fd,
            index,
            pio,
            mmio,
            exit,
            powered_off,
            before_first_run: None,
        })
    }

    /// Runs the guest until it stops or fails; reports the outcome on the exit channel.
    pub fn run(mut self) {
        if let Some(f) = self.before_first_run.take() {
            f();
        }
        let outcome = loop {
            if let Some(exit) = self.run_once() {
                break exit;
            }
        };
        // The main thread may already be exiting.
        let _ = self.exit.send(outcome);
    }

    fn run_once(&mut self) -> Option<VmExit> {
        let result = self.fd.run();
        crate::stats::count_exit(match &result {
            Ok(VcpuExit::IoIn(..)) => ExitKind::IoIn,
            Ok(VcpuExit::IoOut(..)) => ExitKind::IoOut,
            Ok(VcpuExit::MmioRead(..)) => ExitKind::MmioRead,
            Ok(VcpuExit::MmioWrite(..)) => ExitKind::MmioWrite,
            Ok(VcpuExit::Hlt) => ExitKind::Hlt,
            Ok(VcpuExit::Intr) | Err(_) => ExitKind::Intr,
            Ok(_) => ExitKind::Other,
        });
        match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                if self.powered_off.load(Ordering::Relaxed) {
                    return Some(VmExit::Stopped("the guest powered off"));
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmExit::Stopped("the guest shut down (triple fault or reset)")),
            Ok(VcpuExit::Hlt) => Some(VmExit::Stopped("the guest halted")),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    Some(VmExit::Stopped("the guest asked for shutdown or reset"))
                }
                other => Some(VmExit::Failed(format!("the guest raised system event {other}"))),
            },
            Ok(VcpuExit::InternalError) => Some(VmExit::Failed(self.internal_error())),
            Ok(VcpuExit::FailEntry(reason, _)) => Some(VmExit::Failed(format!(
                "KVM could not enter vCPU {} (hardware entry failure reason {reason:#x}): this host's KVM cannot run the guest",
                self.index
            ))),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(other) => Some(VmExit::Failed(format!(
                "vCPU {} stopped on an unexpected KVM exit ({other:?})",
                self.index
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Failed(format!("KVM_RUN failed on vCPU {}: {e}", self.index))),
        }
    }

    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the exit union for KVM_EXIT_INTERNAL_ERROR,
        // which is the exit we are handling; it is plain integers.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        let what = if suberror == KVM_INTERNAL_ERROR_EMULATION {
            "an instruction it could not emulate".to_string()
        } else {
            format!("internal error {suberror}")
        };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        format!(
            "the guest cannot run on this host's KVM (vCPU {} stopped on {what} at {rip:#x}; kvm_pvm and similar backends cannot boot Linux, use a host with VT-x/AMD-V or the KVM lab)",
            self.index
        )
    }
}
