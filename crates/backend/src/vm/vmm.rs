//! `cloude-vmm` driver: KVM, agent over hybrid vsock (Firecracker-style Unix socket).

use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::net::CHILD_TAP_FD;
use super::{
    channels, cmdline, during_boot, read_line, spawn, wait_ready, AgentIo, Driver, Slot, Vm,
    VmError, VmSpec,
};

/// What `cloude-vmm` adds to the shared command line (its own defaults: no PCI, no i8042 probing).
const VMM_CMDLINE_EXTRA: &str =
    "pci=off i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable random.trust_cpu=on";

pub(crate) fn args(spec: &VmSpec, slot: &Slot) -> Vec<String> {
    let mut a = vec![
        "--kernel".into(),
        spec.kernel.display().to_string(),
        "--initrd".into(),
        spec.initrd.display().to_string(),
        "--cmdline".into(),
        cmdline(slot, VMM_CMDLINE_EXTRA),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--vsock-cid".into(),
        slot.cid.to_string(),
        "--vsock-uds".into(),
        slot.path("vsock.sock").display().to_string(),
    ];
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

pub(crate) async fn boot(driver: &Driver, spec: &VmSpec, slot: Slot) -> Result<Vm, VmError> {
    let uds = slot.path("vsock.sock");
    let ready_path = format!("{}_{}", uds.display(), cloude_protocol::READY_VSOCK_PORT);
    let listener = UnixListener::bind(&ready_path).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let console = std::fs::File::create(slot.console_path()).map_err(VmError::RuntimeDir)?;
    let mut child = spawn(
        driver,
        &slot,
        args(spec, &slot),
        console.try_clone().map_err(VmError::RuntimeDir)?.into(),
        console.into(),
    )?;
    let io = during_boot(&mut child, &slot, spec, started, async {
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
