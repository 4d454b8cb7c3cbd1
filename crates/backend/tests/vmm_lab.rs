//! The `cloude-vmm` driver against a real KVM: boots a VM through `Driver::boot`, does the
//! hybrid-vsock handshake and runs a program through the agent. Needs a Linux-capable
//! `/dev/kvm`, so it runs inside the KVM lab:
//!
//! ```sh
//! cargo xtask lab --copy TEST_EXE --copy KERNEL --copy INITRD --copy VMM -- env \
//!   CLOUDE_VMM_LAB_TESTS=1 CLOUDE_KERNEL=KERNEL CLOUDE_INITRD=INITRD CLOUDE_VMM_BIN=VMM TEST_EXE --nocapture
//! ```
//! Elsewhere it prints `SKIPPED` (it cannot run on this host's kvm_pvm).

use cloude_testkit as support;

use std::path::PathBuf;
use std::time::Duration;

use cloude_protocol::{FileSpec, RunRequest, StageStatus, PROTOCOL_VERSION};
use cloude_server::agent::AgentClient;
use cloude_server::vm::jail::Jailer;
use cloude_server::vm::{Driver, Kind, Runtime, VmSpec};

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} must be set")))
}

/// The `cloude-vmm` driver and a 256 MiB, 1-vCPU spec for `initrd` (kernel and VMM from the
/// environment).
fn driver_and_spec(initrd: PathBuf, boot_timeout: Duration) -> (Driver, VmSpec) {
    let driver = Driver {
        kind: Kind::CloudeVmm,
        binary: env_path("CLOUDE_VMM_BIN"),
        jail: None,
        console_bytes: cloude_server::vm::console::DEFAULT_CONSOLE_BYTES,
    };
    let spec = VmSpec {
        kernel: env_path("CLOUDE_KERNEL"),
        initrd,
        root: None,
        warm_up: None,
        memory_mib: 256,
        vcpus: 1,
        boot_timeout,
        transport: cloude_server::vm::Transport::Vsock,
    };
    (driver, spec)
}

/// Boots `initrd` with `cloude-vmm` in a fresh runtime.
async fn boot(
    initrd: PathBuf,
    boot_timeout: Duration,
    jailed: bool,
) -> (Runtime, cloude_server::vm::Vm) {
    let (mut driver, spec) = driver_and_spec(initrd, boot_timeout);
    let rt = Runtime::new().expect("runtime dir");
    if jailed {
        driver.jail = Some(jailer(&rt));
    }
    let vm = driver
        .boot(&spec, rt.slot().expect("slot"))
        .await
        .expect("boot");
    (rt, vm)
}

#[tokio::test]
async fn cloude_vmm_driver_runs_a_program() {
    if std::env::var_os("CLOUDE_VMM_LAB_TESTS").is_none() {
        eprintln!("SKIPPED: cloude-vmm driver test needs a Linux-capable KVM (run it in the KVM lab with CLOUDE_VMM_LAB_TESTS=1)");
        return;
    }
    let started = std::time::Instant::now();
    // Unjailed: the baseline the jailed tests below compare with.
    let (rt, mut vm) = boot(env_path("CLOUDE_INITRD"), Duration::from_secs(60), false).await;
    eprintln!(
        "cloude-vmm VM ready in {} ms (cid {})",
        vm.boot.as_millis(),
        vm.cid()
    );
    let mut client = AgentClient::handshake(vm.take_io().expect("agent channel"))
        .await
        .expect("handshake");
    let req = RunRequest {
        protocol_version: PROTOCOL_VERSION,
        files: vec![FileSpec {
            name: "main.sh".into(),
            content: "echo hello from cloude-vmm; read x; echo \"got $x\"".into(),
            encoding: Default::default(),
        }],
        compile: None,
        run: vec!["bash".into(), "main.sh".into()],
        args: vec![],
        stdin: "stdin-line\n".into(),
        env: vec![],
        compile_timeout_ms: 10_000,
        run_timeout_ms: 10_000,
        output_limit_bytes: 1 << 20,
        memory_limit_mib: None,
        pids_limit: None,
        poweroff_after: true,
        network: false,
        run_as_root: false,
        cpu_limit_ms: None,
        stack_limit_kib: None,
        file_size_limit_kib: None,
        merge_stderr: false,
        tests: vec![],
        tty: None,
    };
    let resp = client.run(&req).await.expect("run");
    let run = resp.run.expect("run stage");
    assert_eq!(run.status, StageStatus::Ok, "{run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout.0),
        "hello from cloude-vmm\ngot stdin-line\n"
    );
    eprintln!("request done in {} ms total", started.elapsed().as_millis());
    vm.shutdown(Duration::from_secs(5)).await;
    drop(rt);
}

fn python(code: &str, timeout_ms: u64) -> RunRequest {
    RunRequest {
        protocol_version: PROTOCOL_VERSION,
        files: vec![FileSpec {
            name: "main.py".into(),
            content: code.into(),
            encoding: Default::default(),
        }],
        compile: None,
        run: vec!["python3".into(), "main.py".into()],
        args: vec![],
        stdin: Default::default(),
        env: vec![],
        compile_timeout_ms: 10_000,
        run_timeout_ms: timeout_ms,
        output_limit_bytes: 1 << 20,
        memory_limit_mib: Some(64),
        pids_limit: Some(32),
        poweroff_after: false,
        network: false,
        run_as_root: false,
        cpu_limit_ms: None,
        stack_limit_kib: None,
        file_size_limit_kib: None,
        merge_stderr: false,
        tests: vec![],
        tty: None,
    }
}

/// The python block root on a jailed `cloude-vmm`, as the server boots it: the agent from the
/// boot initramfs mounts the read-only disk under its overlay, Python runs from it, the root is
/// read-only to the program and the overlay is the root.
#[tokio::test]
async fn cloude_vmm_boots_a_block_root_jailed() {
    let (Some(boot_initrd), Some(root)) = (
        std::env::var_os("CLOUDE_BOOT_INITRD"),
        std::env::var_os("CLOUDE_PYTHON_ROOT"),
    ) else {
        eprintln!("SKIPPED: needs CLOUDE_BOOT_INITRD, CLOUDE_PYTHON_ROOT and a Linux-capable KVM (cargo xtask test runs it in the KVM lab)");
        return;
    };
    let (mut driver, mut spec) =
        driver_and_spec(PathBuf::from(boot_initrd), Duration::from_secs(120));
    spec.root = Some(PathBuf::from(root));
    let rt = Runtime::new().expect("runtime dir");
    driver.jail = Some(jailer(&rt));
    let mut vm = driver
        .boot(&spec, rt.slot().expect("slot"))
        .await
        .expect("boot from the block root");
    eprintln!("block-root VM ready in {} ms", vm.boot.as_millis());
    let mut client = AgentClient::handshake(vm.take_io().expect("agent channel"))
        .await
        .expect("handshake");
    let code = "import sys\nprint(open('/proc/mounts').readline().split()[:3])\nprint(open('/sys/block/vda/ro').read().strip())\ntry:\n    open('/dev/vda', 'wb')\n    print('opened')\nexcept OSError as e:\n    print(type(e).__name__)\nprint(sys.version.split()[0])";
    let mut req = python(code, 30_000);
    req.poweroff_after = true;
    let r = client.run(&req).await.expect("run").run.expect("run stage");
    assert_eq!(r.status, StageStatus::Ok, "{r:?}");
    let out = String::from_utf8_lossy(&r.stdout.0).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"['overlay', '/', 'overlay']"), "{out}");
    assert_eq!(lines.get(1), Some(&"1"), "a read-only disk: {out}");
    assert_ne!(lines.get(2), Some(&"opened"), "{out}");
    assert!(lines.get(3).is_some_and(|v| v.starts_with("3.")), "{out}");
    vm.shutdown(Duration::from_secs(5)).await;
    drop(rt);
}

/// The python image on a jailed `cloude-vmm`: a program runs, then hostile ones (timeout with an escaped
/// child, fork bomb, memory hog) each get their status and the agent stays reachable in the
/// same VM.
#[tokio::test]
async fn cloude_vmm_runs_python_and_survives_hostile_programs() {
    let Some(initrd) = std::env::var_os("CLOUDE_PYTHON_INITRD") else {
        eprintln!("SKIPPED: needs CLOUDE_PYTHON_INITRD and a Linux-capable KVM (cargo xtask test runs it in the KVM lab)");
        return;
    };
    // Jailed, as the server runs it: the hostile programs meet the seccomp-filtered VMM too.
    let (rt, mut vm) = boot(PathBuf::from(initrd), Duration::from_secs(90), true).await;
    eprintln!("python VM ready in {} ms", vm.boot.as_millis());
    let mut client = AgentClient::handshake(vm.take_io().expect("agent channel"))
        .await
        .expect("handshake");

    let run = |r: cloude_protocol::RunResponse| r.run.expect("run stage");
    let hello = run(client
        .run(&python("print('hello from python')", 20_000))
        .await
        .expect("run"));
    assert_eq!(hello.status, StageStatus::Ok, "{hello:?}");
    assert_eq!(
        String::from_utf8_lossy(&hello.stdout.0),
        "hello from python\n"
    );

    let escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\ntime.sleep(1000)\n";
    let r = run(client
        .run(&python(escape, 2_000))
        .await
        .expect("timeout run"));
    assert_eq!(r.status, StageStatus::Timeout, "{r:?}");

    let bomb =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let r = run(client
        .run(&python(bomb, 3_000))
        .await
        .expect("fork bomb run"));
    assert_eq!(r.status, StageStatus::Timeout, "fork bomb: {r:?}");

    let hog = "x = []\nwhile True:\n    x.append(b'x' * (1 << 20))\n";
    let r = run(client
        .run(&python(hog, 20_000))
        .await
        .expect("memory hog run"));
    assert_eq!(r.status, StageStatus::MemoryLimit, "memory hog: {r:?}");

    // Nothing of the earlier programs survived, and the agent still answers.
    let count = "import os\nprint(sum(1 for p in os.listdir('/proc') if p.isdigit() and os.stat('/proc/' + p).st_uid == os.getuid()))";
    let mut last = python(count, 20_000);
    last.poweroff_after = true;
    let r = run(client.run(&last).await.expect("final run"));
    assert_eq!(r.status, StageStatus::Ok, "{r:?}");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout.0),
        "1\n",
        "only the counting program itself"
    );
    vm.shutdown(Duration::from_secs(5)).await;
    drop(rt);
}

/// The tcp transport on `cloude-vmm`: this test's thread moves into a network namespace of its
/// own (the taps the runtime creates, the VMM it spawns and the TCP connection all live there),
/// the VM gets a tap as an inherited fd and its own /30, and the agent is reached over TCP.
#[tokio::test]
async fn cloude_vmm_driver_over_tcp_in_a_netns() {
    use cloude_server::vm::net::NetPlan;
    if std::env::var_os("CLOUDE_VMM_LAB_TESTS").is_none() {
        eprintln!("SKIPPED: cloude-vmm tcp transport test needs a Linux-capable KVM (run it in the KVM lab with CLOUDE_VMM_LAB_TESTS=1)");
        return;
    }
    // A current-thread runtime: everything below runs on this (unshared) thread.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let taps = || -> Vec<String> {
        nix::net::if_::if_nameindex()
            .expect("if_nameindex")
            .iter()
            .map(|i| i.name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cld"))
            .collect()
    };
    let (driver, mut spec) = driver_and_spec(env_path("CLOUDE_INITRD"), Duration::from_secs(60));
    let plan = NetPlan::parse("10.201.0.0/16").expect("plan");
    let rt = Runtime::with_network(Some(plan)).expect("runtime");
    spec.transport = rt.transport();
    assert_eq!(spec.transport, cloude_server::vm::Transport::Tcp);
    let slot = rt.slot().expect("slot with a tap");
    let tap = slot.tap.as_ref().expect("tap").name.clone();
    assert_eq!(taps(), vec![tap.clone()], "the slot's tap exists");
    let mut vm = driver.boot(&spec, slot).await.expect("boot over tcp");
    eprintln!("cloude-vmm VM ready over tcp in {} ms", vm.boot.as_millis());
    let mut client = AgentClient::handshake(vm.take_io().expect("agent channel"))
        .await
        .expect("handshake over tcp");
    let mut req = python("", 10_000);
    req.files[0] = FileSpec {
        name: "main.sh".into(),
        content: "echo over-tcp; cat /sys/class/net/eth0/address; \
                  (exec 3<>/dev/tcp/10.201.0.1/9) 2>/dev/null && echo REACHED || echo blocked"
            .into(),
        encoding: Default::default(),
    };
    req.run = vec!["bash".into(), "main.sh".into()];
    req.poweroff_after = true;
    let resp = client.run(&req).await.expect("run over tcp");
    let run = resp.run.expect("run stage");
    assert_eq!(run.status, StageStatus::Ok, "{run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout.0),
        "over-tcp\n06:00:0a:c9:00:02\nblocked\n",
        "output, the guest MAC of 10.201.0.2, and no reach to the host side when offline"
    );
    vm.shutdown(Duration::from_secs(5)).await;
    // The tap goes with the VMM's fd and ours.
    let t = std::time::Instant::now();
    while !taps().is_empty() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taps().is_empty(), "tap left behind: {:?}", taps());
    drop(rt);
}

/// A jailer for this runtime (the lab mounts cgroup v2; `CLOUDE_JAIL_BIN` points at the binary).
fn jailer(rt: &Runtime) -> std::sync::Arc<Jailer> {
    Jailer::start(&cloude_server::config::Config::embedded().jail, rt.dir())
        .expect("the lab can jail")
}

/// The process whose parent is `pid` (the hypervisor under its jailer).
fn child_of(pid: u32) -> u32 {
    let t = std::time::Instant::now();
    loop {
        if let Some(k) = support::children_of(pid).first() {
            return *k;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no hypervisor under jailer {pid}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts everything the jail promises about the hypervisor `pid`; returns its uid.
fn assert_jailed(pid: u32, cgroup_dirs: &[PathBuf]) -> u32 {
    let f = support::jail_facts(pid);
    assert_eq!(f.problems(false), None, "{f:?}");
    assert_eq!(
        f.root,
        ["dev", "initrd", "kernel", "vm"],
        "only what the VMM needs"
    );
    let dev: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/dev"))
        .expect("dev")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dev, ["kvm"]);
    let dir = cgroup_dirs.first().expect("a cgroup");
    assert!(
        f.cgroup
            .contains(&*dir.file_name().expect("name").to_string_lossy()),
        "{} vs {dir:?}",
        f.cgroup
    );
    let max = std::fs::read_to_string(dir.join("memory.max")).expect("memory.max");
    assert!(
        max.trim().parse::<u64>().is_ok(),
        "finite memory limit, got {max}"
    );
    let cpu = std::fs::read_to_string(dir.join("cpu.max")).expect("cpu.max");
    assert!(!cpu.starts_with("max"), "finite CPU limit, got {cpu}");
    f.uids[0]
}

/// Runs busybox `args` as `uid` on the host; returns (success, stderr).
fn as_uid(uid: u32, args: &[&str]) -> (bool, String) {
    let mut cmd = vec!["/bin/busybox"];
    cmd.extend_from_slice(args);
    support::as_uid(uid, &cmd)
}

/// Two jailed cloude-vmm VMs at once: each runs unprivileged, filtered, namespaced, in a root of
/// its own and a cgroup v2 of its own; neither uid can reach the other VM's files, the image or
/// the server's runtime directory; a program still runs; everything is removed afterwards.
#[tokio::test]
async fn cloude_vmm_jailed_twice_unprivileged_and_apart() {
    if std::env::var_os("CLOUDE_VMM_LAB_TESTS").is_none() {
        eprintln!("SKIPPED: the jailed cloude-vmm test needs a Linux-capable KVM (run it in the KVM lab with CLOUDE_VMM_LAB_TESTS=1)");
        return;
    }
    let rt = Runtime::new().expect("runtime dir");
    let j = jailer(&rt);
    assert_eq!(j.cgroup_version(), 2, "the lab mounts cgroup v2");
    let (mut driver, spec) = driver_and_spec(env_path("CLOUDE_INITRD"), Duration::from_secs(90));
    driver.jail = Some(j.clone());
    let mut a = driver
        .boot(&spec, rt.slot().expect("slot"))
        .await
        .expect("jailed boot");
    let b = driver
        .boot(&spec, rt.slot().expect("slot"))
        .await
        .expect("second jailed boot");
    eprintln!(
        "jailed VMs ready in {} and {} ms",
        a.boot.as_millis(),
        b.boot.as_millis()
    );
    let (ua, cga) = a.jail().expect("jailed");
    let (ub, cgb) = b.jail().expect("jailed");
    let ha = child_of(a.pid().expect("pid"));
    let hb = child_of(b.pid().expect("pid"));
    assert_eq!(assert_jailed(ha, &cga), ua);
    assert_eq!(assert_jailed(hb, &cgb), ub);
    assert_ne!(ua, ub, "a uid per running VM");
    // A's uid against B's files, the image and the server's runtime directory (host paths).
    let b_dir = rt.dir().join(format!("vm-{}", b.cid()));
    let b_sock = b_dir.join("vsock.sock");
    assert!(b_sock.exists(), "B's socket exists");
    let ua_s = ua;
    let (ok, err) = as_uid(
        ua_s,
        &["cat", &b_dir.join("console.log").display().to_string()],
    );
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_uid(ua_s, &["ls", &rt.dir().display().to_string()]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let img = spec.initrd.display().to_string();
    let (ok, err) = as_uid(ua_s, &["sh", "-c", &format!("echo x >> {img}")]);
    assert!(!ok, "the image is writable by a jailed uid: {err}");
    // And inside A's root, none of those paths exist at all.
    for p in [&b_dir, rt.dir(), spec.initrd.parent().expect("cache dir")] {
        let inside =
            PathBuf::from(format!("/proc/{ha}/root")).join(p.strip_prefix("/").expect("abs"));
        assert!(!inside.exists(), "{} visible in the jail", p.display());
    }
    let mut client = AgentClient::handshake(a.take_io().expect("agent channel"))
        .await
        .expect("handshake");
    let mut req = python("", 10_000);
    req.files[0] = FileSpec {
        name: "main.sh".into(),
        content: "echo jailed-ok".into(),
        encoding: Default::default(),
    };
    req.run = vec!["bash".into(), "main.sh".into()];
    req.poweroff_after = true;
    let run = client.run(&req).await.expect("run").run.expect("run stage");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout.0),
        "jailed-ok\n",
        "{run:?}"
    );
    a.shutdown(Duration::from_secs(5)).await;
    drop(b);
    let t = std::time::Instant::now();
    while (cga.iter().chain(&cgb).any(|d| d.exists())) && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !cga.iter().chain(&cgb).any(|d| d.exists()),
        "VM cgroups removed"
    );
    j.shutdown();
    drop(rt);
}

/// The seccomp kill end to end: the test hook makes the jailed cloude-vmm call socket(AF_INET)
/// from its main thread; the process dies by SIGSYS and the server's description of the exit
/// (what a request's internal_error quotes) names the seccomp filter and the system call.
#[tokio::test]
async fn cloude_vmm_seccomp_violation_kills_by_sigsys() {
    if std::env::var_os("CLOUDE_VMM_LAB_TESTS").is_none() {
        eprintln!("SKIPPED: the seccomp kill test needs a Linux-capable KVM (run it in the KVM lab with CLOUDE_VMM_LAB_TESTS=1)");
        return;
    }
    let rt = Runtime::new().expect("runtime dir");
    let j = jailer(&rt);
    let (mut driver, spec) = driver_and_spec(env_path("CLOUDE_INITRD"), Duration::from_secs(90));
    driver.jail = Some(j.clone());
    // Read when the VM's arguments are built; this test binary runs its tests one at a time.
    std::env::set_var("CLOUDE_TEST_SECCOMP_VIOLATION_MS", "8000");
    let booted = driver.boot(&spec, rt.slot().expect("slot")).await;
    std::env::remove_var("CLOUDE_TEST_SECCOMP_VIOLATION_MS");
    let described = match booted {
        // Slow boot: the violation came first.
        Err(e) => e.to_string(),
        Ok(mut vm) => {
            let mut client = AgentClient::handshake(vm.take_io().expect("agent channel"))
                .await
                .expect("handshake");
            let mut req = python("", 60_000);
            req.files[0] = FileSpec {
                name: "main.sh".into(),
                content: "sleep 60".into(),
                encoding: Default::default(),
            };
            req.run = vec!["bash".into(), "main.sh".into()];
            let r = client.run(&req).await;
            assert!(
                r.is_err(),
                "the agent channel breaks when the VMM dies: {r:?}"
            );
            vm.exit_status_within(Duration::from_secs(10))
                .await
                .expect("the VMM exited")
        }
    };
    eprintln!("seccomp kill described as: {described}");
    assert!(
        described.contains("seccomp") && described.contains("SIGSYS") && described.contains(" 41"),
        "{described}"
    );
    j.shutdown();
    drop(rt);
}

/// Prints what must differ between clones, and the guest's clock.
const IDENTITY_PROGRAM: &str = "import os, uuid, random, time, json
print(json.dumps({'urandom': os.urandom(16).hex(), 'uuid': str(uuid.uuid4()),
  'random': random.getrandbits(64), 'time': time.time()}))";

#[tokio::test]
async fn cloude_vmm_snapshot_clones_are_distinct_machines() {
    if std::env::var_os("CLOUDE_VMM_LAB_TESTS").is_none() {
        eprintln!("SKIPPED: cloude-vmm snapshot test needs a Linux-capable KVM (run it in the KVM lab with CLOUDE_VMM_LAB_TESTS=1)");
        return;
    }
    use cloude_server::vm::snapshot::{self, Identity};
    let (mut driver, spec) =
        driver_and_spec(env_path("CLOUDE_PYTHON_INITRD"), Duration::from_secs(120));
    let rt = Runtime::new().expect("runtime dir");
    driver.jail = Some(jailer(&rt));
    let root = tempfile::tempdir().expect("snapshot root");
    let identity = Identity {
        driver: "cloude-vmm".into(),
        hypervisor_sha256: "lab".into(),
        accel: "kvm".into(),
        kernel_sha256: "lab".into(),
        image_sha256: "lab".into(),
        root_sha256: None,
        warm_up_sha256: "none".into(),
        language: "python".into(),
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        cmdline: driver.snapshot_cmdline(&spec),
        protocol_version: PROTOCOL_VERSION,
    };
    let staging = snapshot::staging(root.path()).expect("staging");
    let t = std::time::Instant::now();
    let (files, boot) = driver
        .snapshot(
            &spec,
            rt.slot().expect("slot"),
            &identity.key()[..16],
            staging.path(),
        )
        .await
        .expect("snapshot");
    eprintln!(
        "cloude-vmm template ready in {} ms, snapshot written after {} ms",
        boot.as_millis(),
        t.elapsed().as_millis()
    );
    let snap = snapshot::publish(root.path(), staging, &identity, &files, 0).expect("publish");
    let sizes: Vec<_> = snap.meta.files.iter().map(|f| (&f.name, f.bytes)).collect();
    eprintln!("snapshot files: {sizes:?}");

    // Eight jailed clones at once, each woken and running the identity program.
    let clones = futures_util::future::join_all((0..8).map(|_| {
        let (driver, spec, snap, slot) = (&driver, &spec, &snap, rt.slot().expect("slot"));
        async move {
            let before = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs_f64();
            let mut vm = driver.restore(spec, snap, slot).await.expect("restore");
            let restore_ms = vm.boot.as_millis();
            let mut client = vm.agent().await.expect("agent");
            let resp = client
                .run(&python(IDENTITY_PROGRAM, 20_000))
                .await
                .expect("run");
            let host = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs_f64();
            vm.shutdown(Duration::from_secs(2)).await;
            (restore_ms, resp, before, host)
        }
    }))
    .await;
    let mut seen = std::collections::HashSet::new();
    for (restore_ms, resp, before, host) in clones {
        let run = resp.run.expect("run stage");
        assert_eq!(run.status, StageStatus::Ok, "{run:?}");
        let out: serde_json::Value = serde_json::from_slice(&run.stdout.0).expect("identity json");
        eprintln!("cloude-vmm clone restored to woken in {restore_ms} ms: {out}");
        for k in ["urandom", "uuid", "random"] {
            assert!(
                seen.insert(out[k].to_string()),
                "two clones share {k}: {out}"
            );
        }
        let guest = out["time"].as_f64().expect("time");
        // The program read the clock while its request ran: between the restore's start and
        // the answer on the host's clock, give or take 1 s.
        assert!(
            guest >= before - 1.0 && guest <= host + 1.0,
            "clone clock {guest} outside the host's [{before}, {host}]"
        );
    }
    drop(rt);
}
