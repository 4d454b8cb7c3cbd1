//! `cloude-vmm` driver: KVM, agent over hybrid vsock (Firecracker-style Unix socket).

use std::path::Path;
use std::time::{Duration, Instant};

use cloude_protocol::vmm_wire;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::launch::{
    channels, cmdline, during_boot, read_line, seal, spawn, wait_ready, wake,
    within_snapshot_timeout, Extras,
};
use super::net::CHILD_TAP_FD;
use super::snapshot::Snapshot;
use super::{AgentIo, Driver, JailProfile, Paths, Slot, Vm, VmError, VmSpec};

/// The snapshot directory of a restore, inside the jail.
const JAIL_SNAPSHOT: &str = "/snapshot";
/// The directory a template writes its snapshot into, under its own directory.
const SNAPSHOT_OUT: &str = "snapshot";

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
pub(crate) const VMM_CMDLINE_EXTRA: &str =
    "pci=off i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable random.trust_cpu=on";

/// How a cloude-vmm process starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode<'a> {
    Boot,
    /// A snapshot template with its tag: listens on `snapshot.ctl` for the order.
    Template(&'a str),
    /// A clone of the snapshot (bound at [`JAIL_SNAPSHOT`]) with its tag.
    Clone(&'a Path, &'a str),
}

pub(crate) fn args(
    driver: &Driver,
    spec: &VmSpec,
    slot: &Slot,
    paths: &Paths,
    mode: Mode,
) -> Vec<String> {
    let mut a: Vec<String> = match mode {
        Mode::Boot => vec![
            "--kernel".into(),
            paths.kernel.display().to_string(),
            "--initrd".into(),
            paths.initrd.display().to_string(),
            "--cmdline".into(),
            cmdline(
                spec,
                &[
                    VMM_CMDLINE_EXTRA,
                    &slot
                        .tap
                        .as_ref()
                        .map(|t| cloude_protocol::agent_token_arg(&t.token))
                        .unwrap_or_default(),
                ],
            ),
        ],
        Mode::Template(tag) => vec![
            "--kernel".into(),
            paths.kernel.display().to_string(),
            "--initrd".into(),
            paths.initrd.display().to_string(),
            "--cmdline".into(),
            driver.snapshot_cmdline(spec),
            "--snapshot-control".into(),
            paths.file("snapshot.ctl").display().to_string(),
            "--snapshot-tag".into(),
            tag.into(),
        ],
        Mode::Clone(dir, tag) => vec![
            "--restore".into(),
            if driver.jail.is_some() {
                JAIL_SNAPSHOT.into()
            } else {
                dir.display().to_string()
            },
            "--snapshot-tag".into(),
            tag.into(),
        ],
    };
    if let Some(root) = &paths.root {
        // Read-only (cloude-vmm's default for --disk): the guest sees VIRTIO_BLK_F_RO.
        a.extend(["--disk".into(), root.display().to_string()]);
    }
    a.extend([
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--vsock-cid".into(),
        slot.cid.to_string(),
        "--vsock-uds".into(),
        paths.file("vsock.sock").display().to_string(),
    ]);
    if let Some(ms) = test_seccomp_violation() {
        a.extend(["--test-seccomp-violation-after-ms".into(), ms]);
    }
    if let Some(tap) = &slot.tap {
        a.extend([
            "--tap-fd".into(),
            CHILD_TAP_FD.to_string(),
            "--guest-mac".into(),
            tap.mac_string(),
            // cloude-vmm writes the guest's `ip=` itself.
            "--guest-ip".into(),
            tap.guest_cidr(),
            "--host-ip".into(),
            tap.host.to_string(),
        ]);
    }
    a
}

pub(crate) async fn boot(
    driver: &Driver,
    spec: &VmSpec,
    mut slot: Slot,
    template: Option<&str>,
) -> Result<Vm, VmError> {
    let mode = template.map_or(Mode::Boot, Mode::Template);
    let uds = slot.path("vsock.sock");
    let ready_path = format!("{}_{}", uds.display(), cloude_protocol::READY_VSOCK_PORT);
    let listener = UnixListener::bind(&ready_path).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let console = slot
        .start_console(driver.console_bytes)
        .map_err(VmError::RuntimeDir)?;
    let paths = driver.paths(spec, &slot);
    let extras = Extras {
        // A template writes the guest's memory (and a small state file) into its directory.
        max_file_bytes: template.map(|_| (spec.memory_mib << 20) + (16 << 20)),
        extra_memory_mib: template.map_or(0, |_| spec.memory_mib),
        ..Extras::default()
    };
    let mut child = spawn(
        driver,
        spec,
        &slot,
        args(driver, spec, &slot, &paths, mode),
        console.try_clone().map_err(VmError::RuntimeDir)?.into(),
        console.into(),
        &extras,
    )?;
    let owner = child.uid();
    let io = during_boot(child.child(), &slot, spec, started, async {
        let (mut ready, _) = listener.accept().await.map_err(VmError::Channel)?;
        wait_ready(&mut ready).await?;
        channels(spec.transport, &slot, ready, |_| async {
            let s = connect_agent(&uds, owner).await?;
            Ok(Box::new(s) as Box<dyn AgentIo>)
        })
        .await
    })
    .await?;
    drop(listener);
    let _ = std::fs::remove_file(&ready_path);
    Ok(Vm::ready(child, slot, io, started))
}

/// The hybrid-vsock handshake: a connection to the guest's agent port through `uds`, a socket
/// cloude-vmm (uid `owner`) made (`hostile::connect_socket`: never a symlink elsewhere).
async fn connect_agent(uds: &Path, owner: Option<u32>) -> Result<UnixStream, VmError> {
    let mut s = super::hostile::connect_socket(uds, owner)
        .await
        .map_err(VmError::Channel)?;
    s.write_all(vmm_wire::connect_line(cloude_protocol::AGENT_VSOCK_PORT).as_bytes())
        .await
        .map_err(VmError::Channel)?;
    let ok = read_line(&mut s, 64).await.map_err(VmError::Channel)?;
    if !vmm_wire::is_connected(&ok) {
        return Err(VmError::Handshake(ok));
    }
    Ok(s)
}

/// Boots a template, seals its agent and has cloude-vmm write `state` and `memory` (into its
/// own directory, then moved to `out`); cloude-vmm exits once they are written.
pub(crate) async fn snapshot(
    driver: &Driver,
    spec: &VmSpec,
    slot: Slot,
    tag: &str,
    out: &Path,
) -> Result<(Vec<&'static str>, Duration), VmError> {
    let paths = driver.paths(spec, &slot);
    let ctl = slot.path("snapshot.ctl");
    let host_out = slot.path(SNAPSHOT_OUT);
    let vmm_out = paths.file(SNAPSHOT_OUT);
    let mut vm = boot(driver, spec, slot, Some(tag)).await?;
    let booted = vm.boot;
    let snap_err =
        |what: &str, e: &dyn std::fmt::Display| VmError::Snapshot(format!("{what}: {e}"));
    let work = async {
        // The vsock connection goes with the clone's transport reset anyway.
        drop(seal(&mut vm, spec).await?);
        let owner = vm.jail().map(|(uid, _)| uid);
        super::hostile::mkdir_for(&host_out, owner).map_err(VmError::RuntimeDir)?;
        let mut s = super::hostile::connect_socket(&ctl, owner)
            .await
            .map_err(|e| snap_err("control socket", &e))?;
        s.write_all(vmm_wire::snapshot_line(&vmm_out).as_bytes())
            .await
            .map_err(VmError::Channel)?;
        let answer = read_line(&mut s, 512).await.map_err(VmError::Channel)?;
        if !vmm_wire::control_ok(&answer) {
            return Err(VmError::Snapshot(format!("cloude-vmm: {answer}")));
        }
        Ok::<_, VmError>(owner)
    };
    let r = within_snapshot_timeout(work).await;
    // cloude-vmm exits once its files are written. Only then, with nothing of the VM's uid
    // left running, take them: each must be a regular file it wrote (its uid, one link,
    // within its size), never a symlink to a host file or a FIFO; moved (or copied from the
    // checked descriptor across file systems) and sealed root-owned 0444. (Before the VM is
    // shut down: that removes its directory.)
    let r = match r {
        Ok(owner) => match vm.exit_status_within(VMM_EXIT_AFTER_SNAPSHOT).await {
            None => Err(VmError::Snapshot(format!(
                "cloude-vmm did not exit within {} s of writing its snapshot",
                VMM_EXIT_AFTER_SNAPSHOT.as_secs()
            ))),
            Some(_) => import_snapshot(&host_out, out, owner, spec.memory_mib),
        },
        Err(e) => Err(e),
    };
    // Say how cloude-vmm ended when the order failed (a kill, a seccomp trap, a refusal).
    let r = match r {
        Err(e) => match vm.exit_status_within(Duration::from_millis(500)).await {
            Some(status) => Err(VmError::Snapshot(format!(
                "{e}; cloude-vmm ended ({status}); console: {}",
                vm.console_tail()
            ))),
            None => Err(e),
        },
        ok => ok,
    };
    vm.shutdown(Duration::from_secs(2)).await;
    r.map(|()| (vec!["state", "memory"], booted))
}

/// How long cloude-vmm may take to exit after answering `OK` to its snapshot order.
const VMM_EXIT_AFTER_SNAPSHOT: Duration = Duration::from_secs(10);

/// Takes cloude-vmm's `state` and `memory` from its directory into `out` (see
/// `hostile::import`); `owner` is its uid when jailed.
fn import_snapshot(
    host_out: &Path,
    out: &Path,
    owner: Option<u32>,
    memory_mib: u64,
) -> Result<(), VmError> {
    let uid = owner.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    for (name, max_bytes) in [
        ("state", vmm_wire::SNAPSHOT_STATE_FILE_MAX_BYTES),
        ("memory", memory_mib << 20),
    ] {
        super::hostile::import(
            &host_out.join(name),
            &out.join(name),
            super::hostile::Expect { uid, max_bytes },
        )
        .map_err(|e| VmError::Snapshot(format!("cloude-vmm's {name} file: {e}")))?;
    }
    Ok(())
}

/// Starts a clone of `snap` (bound read-only into the jail; cloude-vmm maps its memory file
/// copy-on-write) and wakes its agent once the guest's vsock listener answers again.
pub(crate) async fn restore(
    driver: &Driver,
    spec: &VmSpec,
    snap: &Snapshot,
    mut slot: Slot,
) -> Result<Vm, VmError> {
    let uds = slot.path("vsock.sock");
    let started = Instant::now();
    let console = slot
        .start_console(driver.console_bytes)
        .map_err(VmError::RuntimeDir)?;
    let paths = driver.paths(spec, &slot);
    let tag = snap.tag();
    let extras = Extras {
        binds: vec![(snap.dir.clone(), JAIL_SNAPSHOT, false)],
        ..Extras::default()
    };
    let mut child = spawn(
        driver,
        spec,
        &slot,
        args(driver, spec, &slot, &paths, Mode::Clone(&snap.dir, &tag)),
        console.try_clone().map_err(VmError::RuntimeDir)?.into(),
        console.into(),
        &extras,
    )?;
    let owner = child.uid();
    let client = during_boot(child.child(), &slot, spec, started, async {
        // The socket appears once cloude-vmm has restored the devices; the guest answers once
        // it has handled the transport reset.
        let s = loop {
            match connect_agent(&uds, owner).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::trace!("restored VM not reachable yet: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        wake(Box::new(s) as Box<dyn AgentIo>).await
    })
    .await?;
    Ok(Vm::restored(child, slot, client, started))
}

/// Test hook (`CLOUDE_TEST_SECCOMP_VIOLATION_MS`, read from the server's own environment, which
/// neither a client nor a guest can set): makes cloude-vmm issue a forbidden system call that
/// many ms after its filters are installed, so that a test can watch the seccomp kill end to end.
fn test_seccomp_violation() -> Option<String> {
    std::env::var("CLOUDE_TEST_SECCOMP_VIOLATION_MS")
        .ok()
        .filter(|v| v.parse::<u64>().is_ok())
}
