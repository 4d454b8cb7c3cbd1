//! QEMU `-M microvm` driver: agent over virtio-serial and no network device (vsock transport), or
//! virtio-net on the slot's tap with the agent over TCP (tcp transport).

use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncReadExt as _;
use tokio::net::UnixListener;

use super::launch::{
    channels, cmdline, during_boot, seal, spawn, wait_ready, wake, within_snapshot_timeout, Extras,
};
use super::net::CHILD_TAP_FD;
use super::qmp::Qmp;
use super::snapshot::Snapshot;
use super::{AgentIo, Driver, JailProfile, Paths, Slot, Vm, VmError, VmSpec};

/// How a QEMU process starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A cold boot.
    Boot,
    /// A cold boot of a snapshot template: with a QMP monitor to stop and migrate it.
    Template,
    /// A clone: the template's machine, its state read from fd [`INCOMING_FD`].
    Clone,
}

/// The descriptor a clone reads its migration stream from.
const INCOMING_FD: i32 = 4;
/// Bytes of migration stream beyond guest RAM accepted from QEMU (device state, headers).
const STREAM_SLACK_BYTES: u64 = 64 << 20;

/// TCG's translation cache, MiB (`-accel tcg,tb-size=`). QEMU's default is 1 GiB, filled as the
/// guest runs new code: a sandbox that starts node a dozen times (each process JIT-compiles its
/// code at new addresses) grew QEMU past guest memory + 700 MiB and its cgroup killed it. With a
/// cap, a full cache is flushed and refilled instead; the cap fits in [`JAIL_PROFILE`]'s overhead.
pub(crate) const TCG_CACHE_MIB: u64 = 128;

/// QEMU's cgroup and rlimits on top of the guest. Measured under TCG (README, Jail): RSS beyond
/// guest memory up to the translation cache ([`TCG_CACHE_MIB`]) plus ~60 MiB of QEMU itself, ~8
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
    if driver.kind.accel() == "kvm" {
        j.device("/dev/kvm", "/dev/kvm");
    }
}

/// The QEMU command line for one VM (pure; unit-tested).
pub(crate) fn args(
    driver: &Driver,
    spec: &VmSpec,
    slot: &Slot,
    paths: &Paths,
    mode: Mode,
) -> Vec<String> {
    let accel = driver.kind.accel();
    let append = match mode {
        Mode::Boot => {
            let ip = slot.tap.as_ref().map(|t| t.kernel_ip_arg());
            let token = slot
                .tap
                .as_ref()
                .map(|t| cloude_protocol::agent_token_arg(&t.token));
            cmdline(
                spec,
                &[ip.as_deref().unwrap_or(""), token.as_deref().unwrap_or("")],
            )
        }
        Mode::Template | Mode::Clone => driver.snapshot_cmdline(spec),
    };
    let sock = paths.file("agent.sock");
    let mut a: Vec<String> = vec![
        "-M".into(),
        // No ACPI in the guest kernel: QEMU then adds virtio_mmio.device= to the command line.
        "microvm,acpi=off,rtc=on".into(),
        "-accel".into(),
        if accel == "kvm" {
            accel.into()
        } else {
            format!("{accel},tb-size={TCG_CACHE_MIB}")
        },
        "-cpu".into(),
        if accel == "kvm" {
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
        append,
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
    if let Some(root) = &paths.root {
        // The language's root, read-only and shared by every VM of the language (one copy in
        // the host's page cache); the first virtio-blk device, so the guest's /dev/vda.
        a.extend([
            "-drive".into(),
            format!(
                "id=root,file={},if=none,format=raw,readonly=on",
                root.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
    }
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
    if mode != Mode::Boot {
        // The template's run state is not recorded, so a clone runs as soon as it has loaded.
        a.extend(["-global".into(), "migration.store-global-state=off".into()]);
    }
    match mode {
        Mode::Boot => {}
        Mode::Template => a.extend([
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                paths.file("qmp.sock").display()
            ),
        ]),
        Mode::Clone => a.extend(["-incoming".into(), format!("fd:{INCOMING_FD}")]),
    }
    a.shrink_to_fit();
    a
}

/// Adds QEMU's own stderr to an exit-during-boot error.
fn with_stderr(slot: &Slot, e: VmError) -> VmError {
    match e {
        VmError::ExitedDuringBoot { status, console } => {
            let err = slot.stderr_tail();
            let console = if err.trim().is_empty() {
                console
            } else {
                format!("{console}\nqemu: {}", err.trim())
            };
            VmError::ExitedDuringBoot { status, console }
        }
        e => e,
    }
}

pub(crate) async fn boot(
    driver: &Driver,
    spec: &VmSpec,
    mut slot: Slot,
    mode: Mode,
) -> Result<Vm, VmError> {
    let sock = slot.path("agent.sock");
    let listener = UnixListener::bind(&sock).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let stderr = slot
        .stderr_file("qemu.stderr")
        .map_err(VmError::RuntimeDir)?;
    let console = slot
        .start_console(driver.console_bytes)
        .map_err(VmError::RuntimeDir)?;
    let paths = driver.paths(spec, &slot);
    let mut child = spawn(
        driver,
        spec,
        &slot,
        args(driver, spec, &slot, &paths, mode),
        console.into(),
        stderr.into(),
        &Extras::default(),
    )?;
    let io = during_boot(child.child(), &slot, spec, started, async {
        let (mut stream, _) = listener.accept().await.map_err(VmError::Channel)?;
        wait_ready(&mut stream).await?;
        channels(spec.transport, &slot, stream, |s| async move {
            Ok(Box::new(s) as Box<dyn AgentIo>)
        })
        .await
    })
    .await;
    let io = io.map_err(|e| with_stderr(&slot, e))?;
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    Ok(Vm::ready(child, slot, io, started))
}

/// Boots a template, seals its agent, stops it and migrates it into `out/state` (QEMU's
/// migration stream with the guest's RAM: QEMU 7.2 cannot map a read-only file copy-on-write,
/// so QEMU clones load their RAM instead of sharing it).
pub(crate) async fn snapshot(
    driver: &Driver,
    spec: &VmSpec,
    slot: Slot,
    out: &Path,
) -> Result<(Vec<&'static str>, Duration), VmError> {
    let paths = driver.paths(spec, &slot);
    let qmp_path = slot.path("qmp.sock");
    let mig_path = slot.path("migrate.sock");
    let mig_uri = format!("unix:{}", paths.file("migrate.sock").display());
    let mut vm = boot(driver, spec, slot, Mode::Template).await?;
    let booted = vm.boot;
    let snap_err =
        |what: &str, e: &dyn std::fmt::Display| VmError::Snapshot(format!("{what}: {e}"));
    let work = async {
        // The agent answers and stays on this connection, idle between two requests: that is
        // the state every clone starts from (the clone's host then sends the wake on it).
        let agent = seal(&mut vm, spec).await?;
        let mut qmp = Qmp::connect(
            &qmp_path,
            vm.jail().map(|(uid, _)| uid),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| snap_err("monitor", &e))?;
        qmp.execute("stop", json!({}))
            .await
            .map_err(|e| snap_err("stop", &e))?;
        let listener =
            bind_for(&mig_path, vm.jail().map(|(uid, _)| uid)).map_err(VmError::RuntimeDir)?;
        let mut file = tokio::fs::File::create(out.join("state"))
            .await
            .map_err(VmError::RuntimeDir)?;
        let cap = (spec.memory_mib << 20) + STREAM_SLACK_BYTES;
        let copy = async {
            let (s, _) = listener.accept().await.map_err(VmError::Channel)?;
            let n = tokio::io::copy(&mut s.take(cap + 1), &mut file)
                .await
                .map_err(VmError::Channel)?;
            if n > cap {
                return Err(VmError::Snapshot(format!(
                    "QEMU's migration stream exceeds {cap} bytes"
                )));
            }
            file.sync_all().await.map_err(VmError::RuntimeDir)?;
            Ok(n)
        };
        let migrate = async {
            qmp.execute("migrate", json!({ "uri": mig_uri }))
                .await
                .map_err(|e| snap_err("migrate", &e))?;
            loop {
                let r = qmp
                    .execute("query-migrate", json!({}))
                    .await
                    .map_err(|e| snap_err("query-migrate", &e))?;
                match r.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => return Ok(()),
                    Some(s @ ("failed" | "cancelled")) => {
                        let why = r.get("error-desc").and_then(|d| d.as_str()).unwrap_or(s);
                        return Err(VmError::Snapshot(format!("migration {s}: {why}")));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        let (bytes, ()) = tokio::try_join!(copy, migrate)?;
        tracing::debug!(bytes, "QEMU migration stream written");
        drop(agent);
        Ok::<_, VmError>(())
    };
    let r = within_snapshot_timeout(work).await;
    vm.shutdown(Duration::ZERO).await;
    r.map(|()| (vec!["state"], booted))
}

/// Starts a clone of `snap` (its migration stream handed to QEMU as fd [`INCOMING_FD`]) and
/// wakes its agent over the serial channel, which the template left idle between two requests.
pub(crate) async fn restore(
    driver: &Driver,
    spec: &VmSpec,
    snap: &Snapshot,
    mut slot: Slot,
) -> Result<Vm, VmError> {
    let sock = slot.path("agent.sock");
    let listener = UnixListener::bind(&sock).map_err(VmError::RuntimeDir)?;
    let started = Instant::now();
    let stderr = slot
        .stderr_file("qemu.stderr")
        .map_err(VmError::RuntimeDir)?;
    let console = slot
        .start_console(driver.console_bytes)
        .map_err(VmError::RuntimeDir)?;
    let state = std::fs::File::open(snap.file("state"))
        .map_err(|e| VmError::Snapshot(format!("cannot open the snapshot: {e}")))?;
    let paths = driver.paths(spec, &slot);
    let extras = Extras {
        fds: vec![(state.as_raw_fd(), INCOMING_FD)],
        ..Extras::default()
    };
    let mut child = spawn(
        driver,
        spec,
        &slot,
        args(driver, spec, &slot, &paths, Mode::Clone),
        console.into(),
        stderr.into(),
        &extras,
    )?;
    drop(state);
    let client = during_boot(child.child(), &slot, spec, started, async {
        let (stream, _) = listener.accept().await.map_err(VmError::Channel)?;
        wake(Box::new(stream) as Box<dyn AgentIo>).await
    })
    .await
    .map_err(|e| with_stderr(&slot, e))?;
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    Ok(Vm::restored(child, slot, client, started))
}

/// Binds a Unix socket at `path` (in the VM's directory) that the hypervisor of `uid` may
/// connect to. The socket is bound and handed to `uid` in the server's own runtime directory
/// (which no hypervisor can reach), then renamed into place: the server never changes an owner
/// through a path the hypervisor controls (a symlink swapped in there would hand it any host
/// file), and a rename replaces whatever entry is at the target without following it.
fn bind_for(path: &Path, uid: Option<u32>) -> std::io::Result<UnixListener> {
    let Some(uid) = uid else {
        return UnixListener::bind(path);
    };
    let vm_dir = path.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
    let runtime = vm_dir.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
    let name = path.file_name().ok_or(std::io::ErrorKind::InvalidInput)?;
    let private = runtime.join(format!(
        ".{}-{}",
        vm_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        name.to_string_lossy()
    ));
    let _ = std::fs::remove_file(&private);
    let listener = UnixListener::bind(&private)?;
    let handed = std::os::unix::fs::lchown(&private, Some(uid), Some(uid))
        .and_then(|()| std::fs::rename(&private, path));
    if let Err(e) = handed {
        let _ = std::fs::remove_file(&private);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs QEMU (not jailed: only its own seccomp sandbox) with `sandbox`, asks it over QMP
    /// to migrate to `exec:` a command that would create `marker`; returns how QEMU ended and
    /// whether the marker exists.
    fn spawn_through_qmp(sandbox: Option<&str>, marker: &Path) -> (std::process::ExitStatus, bool) {
        use std::io::Write as _;
        let mut cmd = std::process::Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "microvm",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-accel",
            "tcg",
        ]);
        if let Some(s) = sandbox {
            cmd.args(["-sandbox", s]);
        }
        let mut child = cmd
            .args(["-qmp", "stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu");
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = writeln!(
            stdin,
            r#"{{"execute":"qmp_capabilities"}}
{{"execute":"migrate","arguments":{{"uri":"exec:touch {}"}}}}"#,
            marker.display()
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
        drop(stdin);
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if marker.exists() || t.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                break child.wait().expect("wait");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        (status, marker.exists())
    }

    /// QEMU's `-sandbox` as the driver passes it refuses a forbidden call for real: asked to
    /// spawn a program (migration to `exec:`), QEMU dies by SIGSYS and nothing runs; without
    /// the sandbox the same request runs the program (the control).
    #[test]
    fn qemus_sandbox_refuses_to_spawn() {
        use std::os::unix::process::ExitStatusExt as _;
        if std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("qemu sandbox test: SKIPPED: qemu-system-x86_64 is not installed");
            return;
        }
        let d = tempfile::tempdir().expect("tmp");
        let (status, ran) = spawn_through_qmp(Some(SANDBOX), &d.path().join("sandboxed"));
        assert!(!ran, "QEMU spawned a program under its sandbox");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
        let (_, ran) = spawn_through_qmp(None, &d.path().join("control"));
        assert!(ran, "without the sandbox the control spawns");
    }
    use crate::vm::{Kind, Runtime};

    #[test]
    fn command_line_has_no_network_and_uses_serial_channel() {
        let rt = Runtime::new().expect("runtime");
        let slot = rt.slot().expect("slot");
        let d = Driver {
            kind: Kind::Qemu { kvm: false },
            binary: "qemu-system-x86_64".into(),
            jail: None,
            console_bytes: crate::vm::console::DEFAULT_CONSOLE_BYTES,
        };
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            root: None,
            warm_up: None,
            memory_mib: 256,
            vcpus: 1,
            boot_timeout: std::time::Duration::from_secs(1),
            transport: crate::vm::Transport::Vsock,
        };
        let a = args(&d, &spec, &slot, &d.paths(&spec, &slot), Mode::Boot).join(" ");
        assert!(a.contains("-nic none"), "{a}");
        assert!(a.contains("-accel tcg,tb-size=128"), "{a}");
        assert!(a.contains("name=cloude.agent"), "{a}");
        assert!(a.contains("-no-reboot"), "{a}");
        assert!(!a.contains("server"), "QEMU connects to our socket: {a}");
        assert!(!a.contains("-incoming") && !a.contains("-qmp"), "{a}");
        let t = args(&d, &spec, &slot, &d.paths(&spec, &slot), Mode::Template).join(" ");
        let c = args(&d, &spec, &slot, &d.paths(&spec, &slot), Mode::Clone).join(" ");
        assert!(t.contains("-qmp unix:") && !t.contains("-incoming"), "{t}");
        assert!(c.contains("-incoming fd:4") && !c.contains("-qmp"), "{c}");
        // A clone is the template's machine: everything but the monitor and -incoming agrees.
        let strip = |s: &str, from: &str| s.split(from).next().unwrap_or("").to_string();
        assert_eq!(strip(&t, " -qmp"), strip(&c, " -incoming"));
        assert!(
            t.contains("init_on_free=1") && !a.contains("init_on_free"),
            "{t}"
        );
        assert!(!a.contains("cloude.root") && !a.contains("-drive"), "{a}");

        // A block root: the first virtio-blk device, read-only, named on the command line of
        // cold boots and templates alike.
        let block = VmSpec {
            root: Some("/images/python.erofs".into()),
            ..spec
        };
        for mode in [Mode::Boot, Mode::Template, Mode::Clone] {
            let b = args(&d, &block, &slot, &d.paths(&block, &slot), mode).join(" ");
            assert!(
                b.contains(
                    "-drive id=root,file=/images/python.erofs,if=none,format=raw,readonly=on"
                ),
                "{b}"
            );
            assert!(b.contains("-device virtio-blk-device,drive=root"), "{b}");
            assert!(
                b.contains("cloude.root=/dev/vda cloude.rootfstype=erofs"),
                "{b}"
            );
        }
    }
}
