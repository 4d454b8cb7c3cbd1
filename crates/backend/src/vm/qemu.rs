//! QEMU `-M microvm` driver: agent over virtio-serial and no network device (vsock transport), or
//! virtio-net on the slot's tap with the agent over TCP (tcp transport).

use std::time::Instant;

use tokio::net::UnixListener;

use super::net::CHILD_TAP_FD;
use super::{
    channels, cmdline, during_boot, spawn, wait_ready, AgentIo, Driver, JailProfile, Paths, Slot,
    Vm, VmError, VmSpec,
};

/// QEMU's cgroup and rlimits on top of the guest. Measured under TCG (README, Jail): RSS beyond
/// guest memory up to ~100 MiB (the translation cache grows with the code the guest runs), ~8
/// threads plus a worker pool QEMU grows on demand.
pub(crate) const JAIL_PROFILE: JailProfile = JailProfile {
    overhead_mib: 256,
    extra_pids: 48,
    device_cpu_millis: 500,
    max_files: 256,
};

/// The seccomp sandbox QEMU applies to itself (on top of the jail).
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// What QEMU needs in its jail besides the kernel, the image and its directory: its own binary's
/// libraries and firmware (the host's `/usr`, read-only) and, with KVM, `/dev/kvm`.
pub(crate) fn jail(driver: &Driver, j: &mut cloude_jail::Spec) {
    j.bind_ro("/usr", "/usr");
    // Debian's merged /usr: /lib, /lib64 and /bin are links into it (bound as directories where
    // a host has them apart).
    for d in ["lib", "lib64", "bin"] {
        let host = std::path::Path::new("/").join(d);
        match std::fs::read_link(&host) {
            Ok(target) => {
                j.symlink(target, &host);
            }
            Err(_) if host.is_dir() => {
                j.bind_ro(&host, &host);
            }
            Err(_) => {}
        }
    }
    if driver.qemu_kvm {
        j.device("/dev/kvm", "/dev/kvm");
    }
}

/// The QEMU command line for one VM (pure; unit-tested).
pub(crate) fn args(driver: &Driver, spec: &VmSpec, slot: &Slot, paths: &Paths) -> Vec<String> {
    let accel = if driver.qemu_kvm { "kvm" } else { "tcg" };
    let sock = paths.file("agent.sock");
    let mut a: Vec<String> = vec![
        "-M".into(),
        // No ACPI in the guest kernel: QEMU then adds virtio_mmio.device= to the command line.
        "microvm,acpi=off,rtc=on".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        if driver.qemu_kvm {
            "host".into()
        } else {
            "max".into()
        },
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        paths.kernel.display().to_string(),
        "-initrd".into(),
        paths.initrd.display().to_string(),
        "-append".into(),
        cmdline(slot, ""),
        // The console goes to stdout, a pipe into the bounded console.log (`console.rs`).
        "-serial".into(),
        "stdio".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=agent,path={}", sock.display()),
        "-device".into(),
        format!(
            "virtserialport,chardev=agent,name={}",
            cloude_protocol::SERIAL_PORT_NAME
        ),
        "-device".into(),
        "virtio-rng-device".into(),
    ];
    if driver.jail.is_some() {
        a.extend(["-sandbox".into(), SANDBOX.into()]);
    }
    match &slot.tap {
        // tcp transport: virtio-net on the tap we created and pass as an inherited fd.
        Some(tap) => a.extend([
            "-netdev".into(),
            format!("tap,id=net0,fd={CHILD_TAP_FD}"),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", tap.mac_string()),
        ]),
        None => a.extend(["-nic".into(), "none".into()]),
    }
    a.shrink_to_fit();
    a
}

pub(crate) async fn boot(driver: &Driver, spec: &VmSpec, mut slot: Slot) -> Result<Vm, VmError> {
    let sock = slot.path("agent.sock");
    let listener = UnixListener::bind(&sock).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let stderr = std::fs::File::create(slot.path("qemu.stderr")).map_err(VmError::RuntimeDir)?;
    let console = slot
        .start_console(driver.console_bytes)
        .map_err(VmError::RuntimeDir)?;
    let paths = driver.paths(spec, &slot);
    let mut child = spawn(
        driver,
        spec,
        &slot,
        args(driver, spec, &slot, &paths),
        console.into(),
        stderr.into(),
    )?;
    let io = during_boot(child.child(), &slot, spec, started, async {
        let (mut stream, _) = listener.accept().await.map_err(VmError::Channel)?;
        wait_ready(&mut stream).await?;
        channels(&slot, stream, |s| async move {
            Ok(Box::new(s) as Box<dyn AgentIo>)
        })
        .await
    })
    .await;
    let io = match io {
        Ok(io) => io,
        Err(VmError::ExitedDuringBoot { status, console }) => {
            let err = std::fs::read_to_string(slot.path("qemu.stderr")).unwrap_or_default();
            let console = if err.trim().is_empty() {
                console
            } else {
                format!("{console}\nqemu: {}", err.trim())
            };
            return Err(VmError::ExitedDuringBoot { status, console });
        }
        Err(e) => return Err(e),
    };
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    Ok(Vm::ready(child, slot, io, started))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{Kind, Runtime};

    #[test]
    fn command_line_has_no_network_and_uses_serial_channel() {
        let rt = Runtime::new().expect("runtime");
        let slot = rt.slot().expect("slot");
        let d = Driver {
            kind: Kind::Qemu,
            binary: "qemu-system-x86_64".into(),
            qemu_kvm: false,
            jail: None,
            console_bytes: crate::vm::console::DEFAULT_CONSOLE_BYTES,
        };
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            memory_mib: 256,
            vcpus: 1,
            boot_timeout: std::time::Duration::from_secs(1),
        };
        let a = args(&d, &spec, &slot, &d.paths(&spec, &slot)).join(" ");
        assert!(a.contains("-nic none"), "{a}");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("name=cloude.agent"), "{a}");
        assert!(a.contains("-no-reboot"), "{a}");
        assert!(!a.contains("server"), "QEMU connects to our socket: {a}");
    }
}
