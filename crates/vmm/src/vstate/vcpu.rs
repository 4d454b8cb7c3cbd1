//! vCPU configuration and the per-vCPU run loop (one thread each).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

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

/// Everything KVM keeps about one vCPU, as saved in a snapshot (see `crate::snapshot`).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU ran with (set again, first, on restore).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists as saveable that could be read, `IA32_TSC` first.
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    /// The guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// What a vCPU thread does when asked to pause for a snapshot: completes its pending exit,
/// saves its state, sends it here, and then never runs the guest again.
pub struct PauseHook {
    pub requested: Arc<AtomicBool>,
    pub saved: Sender<(u8, Result<VcpuState, String>)>,
    /// MSRs to save (KVM_GET_MSR_INDEX_LIST, read before the seccomp filters).
    pub msr_index: Arc<Vec<u32>>,
}

/// `MSR_IA32_TSC`: restored first so that MSRs relative to it (TSC deadline) come after it.
const MSR_IA32_TSC: u32 = 0x10;

/// The MSR indices to save: KVM's saveable list (which includes the TSC and the kvm-clock
/// MSRs), with `IA32_TSC` moved first, capped at [`crate::snapshot::MAX_MSRS`].
pub fn msr_index_list(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, VcpuError> {
    let list = kvm.get_msr_index_list().map_err(|source| VcpuError::Kvm {
        what: "list its saveable MSRs",
        source,
    })?;
    let mut v: Vec<u32> = list.as_slice().to_vec();
    v.retain(|i| *i != MSR_IA32_TSC);
    v.insert(0, MSR_IA32_TSC);
    v.truncate(crate::snapshot::MAX_MSRS);
    Ok(v)
}

/// Size of the XSAVE area KVM uses, if it is larger than `struct kvm_xsave` (then neither
/// KVM_GET_XSAVE nor KVM_SET_XSAVE may be used with a `kvm_xsave`).
pub fn xsave_too_large(vm: &Vm) -> Option<usize> {
    let size = vm.fd.check_extension_int(Cap::Xsave2);
    let size = usize::try_from(size).unwrap_or(0);
    (size > std::mem::size_of::<kvm_xsave>()).then_some(size)
}

/// Reads every state KVM keeps for the vCPU (which must not be running).
pub fn save_state(fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &'static str| {
        move |err: kvm_ioctls::Error| format!("KVM could not save the {what}: {err}")
    };
    let mp_state = fd.get_mp_state().map_err(e("MP state"))?;
    let regs = fd.get_regs().map_err(e("registers"))?;
    let sregs = fd.get_sregs().map_err(e("special registers"))?;
    let xsave = fd.get_xsave().map_err(e("XSAVE state"))?;
    let xcrs = fd.get_xcrs().map_err(e("XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(e("debug registers"))?;
    let lapic = fd.get_lapic().map_err(e("local APIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok().filter(|k| *k != 0);
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("CPUID"))?
        .as_slice()
        .to_vec();
    let msrs = save_msrs(fd, msr_index)?;
    let events = fd.get_vcpu_events().map_err(e("vCPU events"))?;
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        mp_state,
        events,
        debug_regs,
        tsc_khz,
    })
}

/// Reads the MSRs in `index`; KVM stops a batch at the first one it cannot read, which is
/// skipped (some listed MSRs depend on CPU features the guest was not given).
fn save_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| format!("cannot build an MSR list: {e:?}"))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| format!("KVM could not save the MSRs: {e}"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(batch.len())]);
        // Skip the one that failed (if any) and go on after it.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Writes `state` into a fresh vCPU, in the order KVM needs: CPUID first (it decides which
/// registers and MSRs are valid), the TSC frequency, then MP state, registers, special
/// registers, XSAVE, XCRs, debug registers, the local APIC (after the special registers: the
/// APIC base MSR lives there), the MSRs (TSC first), and the pending events last.
pub fn restore_state(vm: &Vm, fd: &VcpuFd, state: &VcpuState) -> Result<(), String> {
    let e = |what: &'static str| {
        move |err: kvm_ioctls::Error| format!("KVM refused the saved {what}: {err}")
    };
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|err| format!("the saved CPUID cannot be used: {err:?}"))?;
    fd.set_cpuid2(&cpuid).map_err(e("CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(|err| {
                format!("the guest TSC ran at {khz} kHz and this host's KVM cannot scale it: {err}")
            })?;
        }
    }
    fd.set_mp_state(state.mp_state).map_err(e("MP state"))?;
    fd.set_regs(&state.regs).map_err(e("registers"))?;
    fd.set_sregs(&state.sregs).map_err(e("special registers"))?;
    if let Some(size) = xsave_too_large(vm) {
        return Err(format!(
            "this host's KVM uses a {size}-byte XSAVE area; snapshots hold 4 KiB"
        ));
    }
    // SAFETY: KVM reads `size_of::<kvm_xsave>()` bytes from the buffer unless its XSAVE area is
    // larger (KVM_CAP_XSAVE2), which was ruled out just above.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(e("XSAVE state"))?;
    fd.set_xcrs(&state.xcrs).map_err(e("XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(e("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(e("local APIC"))?;
    for batch in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(batch)
            .map_err(|err| format!("cannot build an MSR list: {err:?}"))?;
        let n = fd.set_msrs(&msrs).map_err(e("MSRs"))?;
        if n != batch.len() {
            return Err(format!(
                "KVM refused the saved MSR {:#x}",
                batch.get(n).map_or(0, |m| m.index)
            ));
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(e("vCPU events"))?;
    Ok(())
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (EINTR) for a snapshot.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_sig: libc::c_int) {}

/// Installs the (empty) handler for [`kick_signal`], without `SA_RESTART` so that `KVM_RUN`
/// returns EINTR. Process-wide; call before the vCPU threads start.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is an empty extern "C" function, which
    // is async-signal-safe.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
    /// Set when the VM may be snapshotted.
    pub pause: Option<PauseHook>,
}

impl Vcpu {
    /// Creates vCPU `index` without configuring it.
    pub fn create(
        vm: &Vm,
        index: u8,
        pio: Bus,
        mmio: Bus,
        exit: Sender<VmExit>,
        powered_off: Arc<AtomicBool>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                what: "create a vCPU",
                source,
            })?;
        Ok(Self {
            fd,
            index,
            pio,
            mmio,
            exit,
            powered_off,
            before_first_run: None,
            pause: None,
        })
    }

    /// Creates and configures vCPU `index` of `count` for a fresh boot.
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
        let v = Self::create(vm, index, pio, mmio, exit, powered_off)?;
        let fd = &v.fd;
        let mut c = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(k("report its supported CPUID"))?;
        cpuid::adjust(&mut c, index, count)?;
        fd.set_cpuid2(&c).map_err(k("set the vCPU CPUID"))?;
        regs::setup_msrs(fd)?;
        if index == 0 {
            regs::setup_regs(fd, entry)?;
            regs::setup_sregs(&vm.mem, fd, entry)?;
        }
        regs::setup_fpu(fd)?;
        regs::setup_lapic(fd)?;
        Ok(v)
    }

    /// Restores a saved state into this (fresh) vCPU.
    pub fn restore(&self, vm: &Vm, state: &VcpuState) -> Result<(), String> {
        restore_state(vm, &self.fd, state).map_err(|e| format!("vCPU {}: {e}", self.index))
    }

    /// Runs the guest until it stops or fails; reports the outcome on the exit channel.
    pub fn run(mut self) {
        if let Some(f) = self.before_first_run.take() {
            f();
        }
        let outcome = loop {
            if self
                .pause
                .as_ref()
                .is_some_and(|p| p.requested.load(Ordering::SeqCst))
            {
                self.pause_for_snapshot();
            }
            if let Some(exit) = self.run_once() {
                break exit;
            }
        };
        // The main thread may already be exiting.
        let _ = self.exit.send(outcome);
    }

    /// Completes the pending exit (KVM finishes an emulated IN or MMIO read only on the next
    /// KVM_RUN; with `immediate_exit` set it does that and returns EINTR without running the
    /// guest), saves the vCPU's state, hands it over and then waits for the process to exit.
    fn pause_for_snapshot(&mut self) -> ! {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        if let Some(p) = &self.pause {
            let state = save_state(&self.fd, &p.msr_index);
            let _ = p.saved.send((self.index, state));
        }
        loop {
            std::thread::park();
        }
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
