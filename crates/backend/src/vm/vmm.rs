//! `cloude-vmm` driver: KVM, agent over hybrid vsock (Firecracker-style Unix socket).

use std::process::Stdio;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;

use super::{during_boot, read_line, wait_ready, Driver, Slot, Vm, VmError, VmSpec, BASE_CMDLINE};

/// What `cloude-vmm` adds to the shared command line (its own defaults: no PCI, no i8042 probing).
const VMM_CMDLINE_EXTRA: &str =
    "pci=off i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable random.trust_cpu=on";

pub(crate) fn args(spec: &VmSpec, slot: &Slot) -> Vec<String> {
    vec![
        "--kernel".into(),
        spec.kernel.display().to_string(),
        "--initrd".into(),
        spec.initrd.display().to_string(),
        "--cmdline".into(),
        format!("{BASE_CMDLINE} {VMM_CMDLINE_EXTRA}"),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--vsock-cid".into(),
        slot.cid.to_string(),
        "--vsock-uds".into(),
        slot.path("vsock.sock").display().to_string(),
    ]
}

pub(crate) async fn boot(driver: &Driver, spec: &VmSpec, slot: Slot) -> Result<Vm, VmError> {
    let uds = slot.path("vsock.sock");
    let ready_path = format!("{}_{}", uds.display(), cloude_protocol::READY_VSOCK_PORT);
    let listener = UnixListener::bind(&ready_path).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let console = std::fs::File::create(slot.console_path()).map_err(VmError::RuntimeDir)?;
    let mut child = Command::new(&driver.binary)
        .args(args(spec, &slot))
        .stdin(Stdio::null())
        .stdout(console.try_clone().map_err(VmError::RuntimeDir)?)
        .stderr(console)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| VmError::Spawn(driver.binary.display().to_string(), e))?;
    slot.register_pid(child.id());
    let io = during_boot(&mut child, &slot, spec, started, async {
        let (mut ready, _) = listener.accept().await.map_err(VmError::Channel)?;
        wait_ready(&mut ready).await?;
        let mut s = UnixStream::connect(&uds).await.map_err(VmError::Channel)?;
        s.write_all(format!("CONNECT {}\n", cloude_protocol::AGENT_VSOCK_PORT).as_bytes())
            .await
            .map_err(VmError::Channel)?;
        let ok = read_line(&mut s, 64).await.map_err(VmError::Channel)?;
        if !ok.starts_with("OK ") {
            return Err(VmError::Handshake(ok));
        }
        Ok(s)
    })
    .await?;
    drop(listener);
    let _ = std::fs::remove_file(&ready_path);
    Ok(Vm {
        child: Some(child),
        slot,
        io: Some(Box::new(io)),
        started,
        boot: started.elapsed(),
    })
}
