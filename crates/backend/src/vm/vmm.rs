//! `cloude-vmm` driver: KVM, agent over hybrid vsock (Firecracker-style Unix socket).

use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::net::CHILD_TAP_FD;
use super::{
    channels, cmdline, during_boot, read_line, spawn, wait_ready, AgentIo, Driver, JailProfile,
    Paths, Slot, Vm, VmError, VmSpec,
};

/// cloude-vmm's cgroup and rlimits on top of the guest. Measured (README, Jail): RSS excluding
/// guest memory 1.9 MiB, threads = main + device loop + one per vCPU (+ the jailer); the memory
/// headroom also covers KVM's own per-VM kernel allocations charged to the cgroup.
pub(crate) const JAIL_PROFILE: JailProfile = JailProfile {
    overhead_mib: 64,
    extra_pids: 8,
    device_cpu_millis: 500,
    max_files: 128,
};

/// What cloude-vmm needs in its jail besides the kernel, the image and its directory.
pub(crate) fn jail(j: &mut cloude_jail::Spec) {
    j.device("/dev/kvm", "/dev/kvm");
}

/// What `cloude-vmm` adds to the shared command line (its own defaults: no PCI, no i8042 probing).
const VMM_CMDLINE_EXTRA: &str =
    "pci=off i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable random.trust_cpu=on";

pub(crate) fn args(spec: &VmSpec, slot: &Slot, paths: &Paths) -> Vec<String> {
    let mut a = vec![
        "--kernel".into(),
        paths.kernel.display().to_string(),
        "--initrd".into(),
        paths.initrd.display().to_string(),
        "--cmdline".into(),
        cmdline(slot, VMM_CMDLINE_EXTRA),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--vsock-cid".into(),
        slot.cid.to_string(),
        "--vsock-uds".into(),
        paths.file("vsock.sock").display().to_string(),
    ];
    if let Some(ms) = test_seccomp_violation() {
        a.extend(["--test-seccomp-violation-after-ms".into(), ms]);
    }
    if let Some(tap) = &slot.tap {
        a.extend([
            "--tap-fd".into(),
            CHILD_TAP_FD.to_string(),
            "--guest-mac".into(),
            tap.mac_string(),
        ]);
    }
    a
}

pub(crate) async fn boot(driver: &Driver, spec: &VmSpec, mut slot: Slot) -> Result<Vm, VmError> {
    let uds = slot.path("vsock.sock");
    let ready_path = format!("{}_{}", uds.display(), cloude_protocol::READY_VSOCK_PORT);
    let listener = UnixListener::bind(&ready_path).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let console = slot
        .start_console(driver.console_bytes)
        .map_err(VmError::RuntimeDir)?;
    let paths = driver.paths(spec, &slot);
    let mut child = spawn(
        driver,
        spec,
        &slot,
        args(spec, &slot, &paths),
        console.try_clone().map_err(VmError::RuntimeDir)?.into(),
        console.into(),
    )?;
    let io = during_boot(child.child(), &slot, spec, started, async {
        let (mut ready, _) = listener.accept().await.map_err(VmError::Channel)?;
        wait_ready(&mut ready).await?;
        channels(&slot, ready, |_| async {
            let mut s = UnixStream::connect(&uds).await.map_err(VmError::Channel)?;
            s.write_all(format!("CONNECT {}\n", cloude_protocol::AGENT_VSOCK_PORT).as_bytes())
                .await
                .map_err(VmError::Channel)?;
            let ok = read_line(&mut s, 64).await.map_err(VmError::Channel)?;
            if !ok.starts_with("OK ") {
                return Err(VmError::Handshake(ok));
            }
            Ok(Box::new(s) as Box<dyn AgentIo>)
        })
        .await
    })
    .await?;
    drop(listener);
    let _ = std::fs::remove_file(&ready_path);
    Ok(Vm::ready(child, slot, io, started))
}

/// Test hook (`CLOUDE_TEST_SECCOMP_VIOLATION_MS`, read from the server's own environment, which
/// neither a client nor a guest can set): makes cloude-vmm issue a forbidden system call that
/// many ms after its filters are installed, so that a test can watch the seccomp kill end to end.
fn test_seccomp_violation() -> Option<String> {
    std::env::var("CLOUDE_TEST_SECCOMP_VIOLATION_MS")
        .ok()
        .filter(|v| v.parse::<u64>().is_ok())
}
