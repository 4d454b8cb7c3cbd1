//! Turns a validated [`VmConfig`] into a running VM: memory, kernel, devices, vCPU threads and
//! the device event loop; then waits for the guest to stop.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{self, BootInfo, EntryPoint};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable;
use crate::config::{ip_arg, Boot, VmConfig};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::{Block, DiskState};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::Bus;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, Refusal};
use crate::stats;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{Vm, VmError};
use crate::vstate::{ExitTrigger, VmExit};

/// Set-up failures (each one sentence).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open the {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("could not set up {what}: {source}")]
    Device {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::BusError),
    #[error(transparent)]
    Slots(#[from] crate::devices::slots::SlotsExhausted),
    #[error("could not start the {0} thread")]
    Thread(&'static str),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Disk(#[from] crate::config::ConfigError),
    #[error("the disk {0} changed size since the command line was checked")]
    DiskChanged(String),
    #[error("snapshot refused: {0}")]
    Refused(#[from] Refusal),
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// Creates one virtio device (as transport target and event subscriber) for its interrupt.
type MakeDevice<'a> =
    &'a dyn Fn(Arc<Interrupt>) -> Result<(Arc<Mutex<dyn VirtioDevice>>, Subscriber), BuildError>;

fn open(what: &'static str, path: &std::path::Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn dev_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Device { what, source }
}

/// A snapshot to resume: its state and its memory file (open read-only).
struct Restore {
    state: crate::snapshot::VmState,
    memory: File,
}

/// Reads and checks the snapshot in `dir` against the configuration (refusals only).
fn load_snapshot(dir: &std::path::Path, cfg: &VmConfig) -> Result<Restore, Refusal> {
    let state = snapshot::read_state(dir)?;
    let path = dir.join("memory");
    let memory =
        File::open(&path).map_err(|e| Refusal::Read(path.display().to_string(), e.to_string()))?;
    let len = memory
        .metadata()
        .map_err(|e| Refusal::Read(path.display().to_string(), e.to_string()))?
        .len();
    let mut devices = vec![crate::devices::virtio::TYPE_BLOCK; cfg.disks.len()];
    devices.push(crate::devices::virtio::TYPE_RNG);
    if cfg.vsock.is_some() {
        devices.push(crate::devices::virtio::TYPE_VSOCK);
    }
    if cfg.net.is_some() {
        devices.push(crate::devices::virtio::TYPE_NET);
    }
    let expect = snapshot::Expect {
        mem_size: cfg.mem_size,
        vcpus: usize::from(cfg.vcpus),
        devices,
        disks: disk_states(cfg),
        tag: cfg.snapshot_tag.clone(),
    };
    snapshot::check_shape(&state, &expect, len)?;
    Ok(Restore { state, memory })
}

/// The disks' shapes, as a snapshot records them.
fn disk_states(cfg: &VmConfig) -> Vec<DiskState> {
    cfg.disks
        .iter()
        .map(|d| DiskState {
            size: d.size,
            read_only: d.read_only,
        })
        .collect()
}

/// Binds the snapshot control socket (replacing a stale socket file).
fn bind_control(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, BuildError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(BuildError::Device {
                what: "the snapshot control socket",
                source: e,
            })
        }
        _ => {}
    }
    std::os::unix::net::UnixListener::bind(path).map_err(dev_err("the snapshot control socket"))
}

/// Builds and runs the VM (a fresh boot or a restore); returns how it ended.
pub fn run(cfg: &VmConfig, started: Instant) -> Result<VmExit, BuildError> {
    seccomp::prepare_allocator();
    let restore = match &cfg.boot {
        Boot::Restore(dir) => Some(load_snapshot(dir, cfg)?),
        Boot::Kernel { .. } => None,
    };
    let vm = Arc::new(Vm::with_memory(
        cfg.mem_size,
        restore.as_ref().map(|r| &r.memory),
    )?);
    let loaded = match &cfg.boot {
        Boot::Kernel { kernel, initrd } => {
            let mut kernel_file = open("kernel", kernel)?;
            let mut initrd_file = open("initrd", initrd)?;
            if cfg.huge_pages {
                vm.advise_huge_pages();
            }
            let kernel = boot::load_kernel(&vm.mem, &mut kernel_file)?;
            let low_end = cfg.mem_size.min(MMIO_GAP_START);
            let initrd = boot::load_initrd(&vm.mem, &mut initrd_file, &kernel, low_end)?;
            Some((kernel, initrd))
        }
        Boot::Restore(_) => None,
    };

    let (exit_tx, exit_rx) = mpsc::channel::<VmExit>();
    let powered_off = Arc::new(AtomicBool::new(false));
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let kvm_err = |what| move |source| BuildError::Kvm { what, source };

    let com1_irq = EventFd::new(EFD_NONBLOCK).map_err(dev_err("the serial interrupt"))?;
    vm.fd
        .register_irqfd(&com1_irq, COM1_IRQ)
        .map_err(kvm_err("route the serial interrupt"))?;
    let serial = match &restore {
        Some(r) => SerialDevice::restored(
            &r.state.devices.serial,
            EventFdTrigger(com1_irq),
            std::io::stdout(),
            powered_off.clone(),
        )
        .map_err(BuildError::Restore)?,
        None => SerialDevice::new(
            EventFdTrigger(com1_irq),
            std::io::stdout(),
            powered_off.clone(),
        ),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;
    let reset = ExitTrigger(
        exit_tx.clone(),
        VmExit::Stopped("the guest reset the CPU (i8042)"),
    );
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset))),
        u64::from(I8042_PORT),
        5,
    )?;

    let mut event_manager = EventManager::<Subscriber>::new().map_err(|e| BuildError::Device {
        what: "the event loop",
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let mut cmdline = cfg.cmdline.clone();
    let mut slots = crate::devices::slots::SlotAllocator::default();
    let mut transports: Vec<Arc<Mutex<MmioTransport>>> = Vec::new();
    let mut add_virtio =
        |make: MakeDevice, mmio: &mut Bus, cmdline: &mut String| -> Result<(), BuildError> {
            let slot = slots.allocate()?;
            let (base, irq) = (slot.base, slot.irq);
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(dev_err("a virtio interrupt"))?;
            vm.fd
                .register_irqfd(&irqfd, irq)
                .map_err(kvm_err("route a virtio interrupt"))?;
            let interrupt = Arc::new(Interrupt::new(irqfd));
            let (dev, sub) = make(interrupt.clone())?;
            for (i, evt) in crate::devices::bus::lock(&dev)
                .queue_events()
                .iter()
                .enumerate()
            {
                vm.fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), i as u32)
                    .map_err(kvm_err("register a queue notification"))?;
            }
            event_manager.add_subscriber(sub);
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                dev,
                interrupt,
                vm.mem.clone(),
            )));
            transports.push(transport.clone());
            mmio.insert(transport, base, slot.size)?;
            cmdline.push(' ');
            cmdline.push_str(&slot.cmdline_arg());
            Ok(())
        };
    // Disks first, in command-line order: the first is always /dev/vda whatever else the VM has.
    for (index, disk) in cfg.disks.iter().enumerate() {
        let (file, size) = crate::config::open_disk(&disk.path, disk.read_only)?;
        if size != disk.size {
            return Err(BuildError::DiskChanged(disk.path.display().to_string()));
        }
        let file = std::cell::Cell::new(Some(file));
        add_virtio(
            &|irq| {
                let file = file.take().ok_or_else(|| BuildError::Device {
                    what: "virtio-blk",
                    source: std::io::Error::other("the disk was opened for another device"),
                })?;
                let d = Block::new(index, file, size, disk.read_only, irq)
                    .map_err(dev_err("virtio-blk"))?;
                let d = Arc::new(Mutex::new(d));
                Ok((d.clone(), d))
            },
            &mut mmio,
            &mut cmdline,
        )?;
    }
    add_virtio(
        &|irq| {
            let d = Arc::new(Mutex::new(Rng::new(irq).map_err(dev_err("virtio-rng"))?));
            Ok((d.clone(), d))
        },
        &mut mmio,
        &mut cmdline,
    )?;
    if let Some((cid, uds)) = &cfg.vsock {
        add_virtio(
            &|irq| {
                let d = Arc::new(Mutex::new(
                    Vsock::new(u64::from(*cid), uds, irq).map_err(dev_err("virtio-vsock"))?,
                ));
                Ok((d.clone(), d))
            },
            &mut mmio,
            &mut cmdline,
        )?;
    }
    if let Some(net) = &cfg.net {
        add_virtio(
            &|irq| {
                let d = Arc::new(Mutex::new(
                    Net::from_source(&net.tap, net.mac, irq).map_err(dev_err("virtio-net"))?,
                ));
                Ok((d.clone(), d))
            },
            &mut mmio,
            &mut cmdline,
        )?;
        if let Some((addr, prefix, host)) = net.ip {
            cmdline.push(' ');
            cmdline.push_str(&ip_arg(addr, prefix, host));
        }
    }

    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    match (&loaded, &restore) {
        (Some((kernel, initrd)), _) => {
            boot::write_cmdline(&vm.mem, &cmdline)?;
            let info = BootInfo {
                initrd: *initrd,
                cmdline_len: cmdline.len() + 1,
                mem_size: cfg.mem_size,
            };
            match kernel.entry {
                EntryPoint::Pvh(_) => boot::write_pvh_info(&vm.mem, &info)?,
                EntryPoint::Linux64(_) => {
                    boot::write_zero_page(&vm.mem, &info, kernel.setup_header)?
                }
            }
            mptable::setup(&vm.mem, cfg.vcpus)?;
            for i in 0..cfg.vcpus {
                vcpus.push(Vcpu::new(
                    &vm,
                    i,
                    cfg.vcpus,
                    kernel.entry,
                    pio.clone(),
                    mmio.clone(),
                    exit_tx.clone(),
                    powered_off.clone(),
                )?);
            }
        }
        (None, Some(r)) => {
            // KVM's order: the interrupt controllers (the local APICs need them), each vCPU
            // (CPUID first), then the devices (which may raise interrupts), the clock last.
            vm.restore_chips(&r.state.vm).map_err(BuildError::Restore)?;
            for (i, st) in r.state.vcpus.iter().enumerate() {
                let v = Vcpu::create(
                    &vm,
                    i as u8,
                    pio.clone(),
                    mmio.clone(),
                    exit_tx.clone(),
                    powered_off.clone(),
                )?;
                v.restore(&vm, st).map_err(BuildError::Restore)?;
                vcpus.push(v);
            }
            for (t, st) in transports.iter().zip(&r.state.devices.virtio) {
                crate::devices::bus::lock(t)
                    .restore(st)
                    .map_err(BuildError::Restore)?;
            }
            vm.restore_clock(&r.state.vm).map_err(BuildError::Restore)?;
        }
        (None, None) => unreachable!("a boot loads a kernel, a restore has a snapshot"),
    }
    drop(restore);

    // The snapshot control socket and the vCPUs' pause hooks.
    let snapshot_parts = match &cfg.snapshot_control {
        None => None,
        Some(path) => {
            let listener = bind_control(path)?;
            crate::vstate::vcpu::install_kick_handler().map_err(dev_err("the vCPU kick signal"))?;
            let msr_index = Arc::new(crate::vstate::vcpu::msr_index_list(&vm.kvm)?);
            let pause = Arc::new(AtomicBool::new(false));
            let (saved_tx, saved_rx) = mpsc::channel();
            for v in &mut vcpus {
                v.pause = Some(crate::vstate::vcpu::PauseHook {
                    requested: pause.clone(),
                    saved: saved_tx.clone(),
                    msr_index: msr_index.clone(),
                });
            }
            let xsave_problem = crate::vstate::vcpu::xsave_too_large(&vm).map(|size| {
                format!("this host's KVM uses a {size}-byte XSAVE area; snapshots hold 4 KiB")
            });
            Some((listener, pause, saved_rx, xsave_problem))
        }
    };
    if stats::enabled() {
        let starts: Vec<u64> = vm
            .mem
            .iter()
            .filter_map(|r| vm.mem.get_host_address(r.start_addr()).ok())
            .map(|p| p as u64)
            .collect();
        if let Some(v) = vcpus.first_mut() {
            v.before_first_run = Some(Box::new(move || stats::report_first_run(started, &starts)));
        }
    }
    if cfg.seccomp {
        seccomp::install_reporter()?;
    } else {
        eprintln!("cloude-vmm: WARNING: seccomp filters are off (--no-seccomp); debugging only");
    }
    let filtered = cfg.seccomp;
    // The device loop installs its filter before it handles any guest event; the vCPUs start
    // only after that.
    let (dev_ready_tx, dev_ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("cloude-devices".into())
        .spawn(move || {
            if filtered {
                let r = seccomp::install(ThreadKind::Devices).map_err(|e| e.to_string());
                let failed = r.is_err();
                let _ = dev_ready_tx.send(r);
                if failed {
                    return;
                }
            } else {
                let _ = dev_ready_tx.send(Ok(()));
            }
            crate::devices::pace::device_loop(&mut event_manager, -1, || true);
        })
        .map_err(|_| BuildError::Thread("device event loop"))?;
    match dev_ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(BuildError::Seccomp(seccomp::SeccompError::Install(
                ThreadKind::Devices,
                e,
            )))
        }
        Err(_) => return Err(BuildError::Thread("device event loop")),
    }
    let mut vcpu_threads = Vec::with_capacity(vcpus.len());
    for (i, mut v) in vcpus.into_iter().enumerate() {
        let stats_hook = v.before_first_run.take();
        v.before_first_run = Some(Box::new(move || {
            if let Some(f) = stats_hook {
                f();
            }
            if filtered {
                if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
                    // Never run guest code unfiltered.
                    eprintln!("cloude-vmm: {e}");
                    std::process::exit(1);
                }
            }
        }));
        let handle = std::thread::Builder::new()
            .name(format!("cloude-vcpu{i}"))
            .spawn(move || v.run())
            .map_err(|_| BuildError::Thread("vCPU"))?;
        vcpu_threads.push(handle);
    }
    if let Some((listener, pause, saved, xsave_problem)) = snapshot_parts {
        use std::os::unix::thread::JoinHandleExt;
        let snapshotter = snapshot::control::Snapshotter {
            listener,
            vm: vm.clone(),
            tag: cfg.snapshot_tag.clone(),
            exit: exit_tx.clone(),
            pause,
            saved,
            vcpu_threads: vcpu_threads.iter().map(|h| h.as_pthread_t()).collect(),
            serial: serial.clone(),
            transports: transports.clone(),
            disks: disk_states(cfg),
            xsave_problem,
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        std::thread::Builder::new()
            .name("cloude-snapshot".into())
            .spawn(move || {
                if filtered {
                    let r = seccomp::install(ThreadKind::Snapshot).map_err(|e| e.to_string());
                    let failed = r.is_err();
                    let _ = ready_tx.send(r);
                    if failed {
                        return;
                    }
                } else {
                    let _ = ready_tx.send(Ok(()));
                }
                snapshotter.serve();
            })
            .map_err(|_| BuildError::Thread("snapshot control"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(BuildError::Seccomp(seccomp::SeccompError::Install(
                    ThreadKind::Snapshot,
                    e,
                )))
            }
            Err(_) => return Err(BuildError::Thread("snapshot control")),
        }
    }
    drop(exit_tx);
    // SIGTERM (and SIGINT) end the VM cleanly: sockets removed, statistics printed.
    let terminate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, terminate.clone())
            .map_err(|_| BuildError::Thread("signal handler"))?;
    }
    // Every other thread runs now: the main thread's own filter comes last (threads inherit
    // their creator's filter, and the others need calls the main thread does not).
    if filtered {
        seccomp::install(ThreadKind::Main)?;
    }
    let violation_at = cfg
        .test_seccomp_violation_after_ms
        .map(|ms| Instant::now() + std::time::Duration::from_millis(ms));
    let outcome = loop {
        match exit_rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(exit) => break exit,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break VmExit::Failed("every vCPU thread ended without a reason".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if terminate.load(std::sync::atomic::Ordering::Relaxed) {
                    break VmExit::Stopped("terminated by a signal");
                }
                if violation_at.is_some_and(|t| Instant::now() >= t) {
                    // Test hook: what a compromised VMM trying to reach the network would do.
                    // SAFETY: a plain system call with constant arguments.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                }
            }
        }
    };
    if stats::enabled() {
        eprintln!("{}", stats::exits_json());
    }
    if let Some((_, uds)) = &cfg.vsock {
        // The process exits without running destructors; do not leave the socket file behind.
        let _ = std::fs::remove_file(uds);
    }
    if let Some(path) = &cfg.snapshot_control {
        let _ = std::fs::remove_file(path);
    }
    // Guest memory, KVM objects and the (never joined) threads are torn down by process exit.
    std::mem::forget(vm);
    std::mem::forget(vcpu_threads);
    Ok(outcome)
}
