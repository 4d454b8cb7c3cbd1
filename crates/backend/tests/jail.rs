//! The jail around every hypervisor, on the QEMU fallback here (cloude-vmm's side runs in the
//! KVM lab: `vmm_lab.rs`). Real server, real requests, real VMs; the facts come from `/proc`.

use cloude_testkit as support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{as_uid, children_of, cmdline_args, jail_facts, Server};

/// Kernel build plus the bash image when nothing is cached yet.
const FIRST_START: Duration = Duration::from_secs(3600);

/// `--flag VALUE` from a command line.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The cgroup v1 memory limit of the process whose `/proc/PID/cgroup` is `cg`.
fn v1_memory_limit(cg: &str) -> Option<u64> {
    let path = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))?;
    std::fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn cloude_cgroups(server_rt: &str) -> Vec<String> {
    cloude_testkit::server_cgroup_dirs(server_rt)
        .iter()
        .map(|d| d.display().to_string())
        .collect()
}

/// Two requests at once on the QEMU fallback: each hypervisor runs under its own uid, with no
/// capabilities, no_new_privs, QEMU's seccomp sandbox, its own mount/pid/ipc/uts/net
/// namespaces, a root without the host's files and a cgroup of its own with a finite memory
/// limit; neither uid can read the other VM's files, write the image or list the server's
/// runtime directory; both programs still give their output; nothing is left afterwards.
#[test]
fn jailed_qemu_hypervisors_are_unprivileged_and_apart() {
    let config = "[limits]\nmax_concurrent_vms = 4\n[vm]\nprebuild = [\"bash\"]\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("jail: {e}"));
    let h = server.get("/healthz").json();
    assert_eq!(h["jail"], true, "{h}");
    assert!(
        h["jail_detail"].as_str().unwrap_or("").contains("cgroup v"),
        "{h}"
    );
    let addr = server.addr;
    let reqs: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                support::http(
                    addr,
                    "POST",
                    "/v1/executions",
                    Some(
                        serde_json::to_vec(&json!({
                            "language": "bash",
                            "code": format!("echo started-{i}; sleep 25"),
                            "timeout_ms": 60000
                        }))
                        .expect("json"),
                    ),
                )
            })
        })
        .collect();
    // Both jailers and their hypervisors.
    let t = Instant::now();
    let pairs: Vec<(u32, u32)> = loop {
        let pairs: Vec<(u32, u32)> = server
            .children()
            .into_iter()
            .filter_map(|j| children_of(j).first().map(|&h| (j, h)))
            .collect();
        if pairs.len() == 2 {
            break pairs;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "two jailed hypervisors did not appear: {pairs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let both boot far enough to have opened everything (QEMU's sandbox is on from the start).
    std::thread::sleep(Duration::from_secs(3));
    let mut uids = Vec::new();
    let mut dirs = Vec::new();
    let mut images = Vec::new();
    for &(jailer, hv) in &pairs {
        let f = jail_facts(hv);
        assert_eq!(f.problems(false), None, "hypervisor {hv}: {f:?}");
        assert!(
            f.root.iter().all(|e| [
                "bin", "dev", "initrd", "kernel", "lib", "lib64", "root.img", "usr", "vm"
            ]
            .contains(&e.as_str())),
            "only QEMU's needs in its root: {:?}",
            f.root
        );
        let limit = v1_memory_limit(&f.cgroup)
            .or_else(|| {
                // cgroup v2 hosts.
                let p = f.cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
                std::fs::read_to_string(format!("/sys/fs/cgroup{p}/memory.max"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(u64::MAX);
        assert!(
            limit < 16 << 30,
            "finite memory limit, got {limit}: {}",
            f.cgroup
        );
        let args = cmdline_args(jailer);
        let root = flag(&args, "--root").expect("--root").to_string();
        dirs.push(root.trim_end_matches("/root").to_string());
        let ro: Vec<&String> = args
            .iter()
            .enumerate()
            .filter(|(i, a)| *i > 0 && args[i - 1] == "--bind-ro" && a.contains("images"))
            .map(|(_, a)| a)
            .collect();
        images.extend(ro.into_iter().cloned());
        uids.push(f.uids[0]);
    }
    assert_ne!(uids[0], uids[1], "a uid of its own per running VM");
    // Across the boundary: A's uid against B's directory, the image cache and the runtime dir.
    let b_console = format!("{}/console.log", dirs[1]);
    assert!(std::path::Path::new(&b_console).exists(), "{b_console}");
    let (ok, err) = as_uid(uids[0], &["cat", &b_console]);
    assert!(
        !ok && err.contains("Permission denied"),
        "read B's console: {err}"
    );
    let image = images.first().expect("the image is bound read-only");
    let (ok, err) = as_uid(uids[0], &["sh", "-c", &format!("echo x >> {image}")]);
    assert!(
        !ok && err.contains("Permission denied"),
        "write the image: {err}"
    );
    let server_dir = std::path::Path::new(&dirs[0])
        .parent()
        .expect("server runtime dir")
        .display()
        .to_string();
    let (ok, err) = as_uid(uids[0], &["ls", &server_dir]);
    assert!(
        !ok && err.contains("Permission denied"),
        "list the runtime dir: {err}"
    );
    // The jail's rlimits, as the kernel holds them for the running hypervisor.
    for &(_, hv) in &pairs {
        let limits = std::fs::read_to_string(format!("/proc/{hv}/limits")).expect("limits");
        let soft_hard = |name: &str| -> (String, String) {
            let l = limits
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in {limits}"));
            let f: Vec<&str> = l[name.len()..].split_whitespace().collect();
            (f[0].to_string(), f[1].to_string())
        };
        for (name, want) in [
            // QEMU's profile (`qemu.rs`): 256 files; 1 vCPU + 48 tasks; the console's size
            // (1 MiB default); no core dumps.
            ("Max open files", "256"),
            ("Max processes", "49"),
            ("Max file size", "1048576"),
            ("Max core file size", "0"),
        ] {
            assert_eq!(
                soft_hard(name),
                (want.to_string(), want.to_string()),
                "{name} of hypervisor {hv}: {limits}"
            );
        }
    }
    for &(_, hv) in &pairs {
        for host in [&server_dir, image, &dirs[1]] {
            let inside = format!("/proc/{hv}/root{host}");
            assert!(
                !std::path::Path::new(&inside).exists(),
                "{host} visible inside the jail of {hv}"
            );
        }
    }
    let mut outs: Vec<String> = reqs
        .into_iter()
        .map(|r| {
            let r = r.join().expect("thread");
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            assert_eq!(v["status"], "ok", "{v}");
            v["stdout"].as_str().unwrap_or("").to_string()
        })
        .collect();
    outs.sort();
    assert_eq!(outs, ["started-0\n", "started-1\n"]);
    let rt_name = std::path::Path::new(&server_dir)
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    // The VMs' cgroups go with them; the server's own with the server.
    let t = Instant::now();
    let vm_groups = || -> usize {
        cloude_cgroups(&rt_name)
            .iter()
            .map(|d| {
                std::fs::read_dir(d)
                    .map(|r| r.flatten().filter(|e| e.path().is_dir()).count())
                    .unwrap_or(0)
            })
            .sum()
    };
    while vm_groups() > 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        vm_groups(),
        0,
        "VM cgroups left: {:?}",
        cloude_cgroups(&rt_name)
    );
    let status = server.stop(Duration::from_secs(30)).expect("stop");
    assert!(status.success(), "{status}");
    assert!(
        cloude_cgroups(&rt_name).is_empty(),
        "server cgroups left: {:?}",
        cloude_cgroups(&rt_name)
    );
}

/// `[jail] enabled = false` is loud: `/healthz` says so.
#[test]
fn jail_off_shows_in_healthz() {
    let server = Server::start(
        &["--hypervisor", "qemu", "--lazy"],
        Some("[jail]\nenabled = false\n"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("jail: {e}"));
    let h = server.get("/healthz").json();
    assert_eq!(h["jail"], false, "{h}");
    assert_eq!(h["jail_detail"], Value::Null, "{h}");
}

/// A server that cannot jail (here: not root, so no cgroups, namespaces or uid changes) refuses
/// to start with one sentence saying what is missing and how to fix it.
#[test]
fn a_host_that_cannot_jail_refuses_to_start() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root to run the server as another, unprivileged user");
        return;
    }
    let rt = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(
        rt.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    // A copy of the server where the unprivileged user can reach it (the checkout may sit in a
    // directory only root can enter).
    let bin_dir = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(
        bin_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let server = bin_dir.path().join("cloude-server");
    std::fs::copy(env!("CARGO_BIN_EXE_cloude-server"), &server).expect("copy the server");
    let out = std::process::Command::new(&server)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--hypervisor",
            "qemu",
            "--no-build",
        ])
        .env("CLOUDE_JAIL_BIN", bin_dir.path().join("cloude-jail"))
        .env("CLOUDE_RUNTIME_DIR", rt.path())
        .env("CLOUDE_HOME", rt.path())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started unjailed: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("root") && last.contains("[jail] enabled = false"),
        "one clear sentence: {last}"
    );
    // Nothing left behind: no cgroup directories of this attempt (it made none), no runtime
    // entries.
    let left: Vec<_> = std::fs::read_dir(rt.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The documented non-root set-up: a server running as an ordinary uid that holds exactly the
/// capabilities the README lists (ambient, so that its jailer inherits them), with a delegated
/// `cloude` cgroup directory. It jails QEMU under a VM uid of its own, with no capability left,
/// and serves a request.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn a_non_root_server_with_the_documented_capabilities_jails() {
    const USER: u32 = 4242;
    const CAPS: &str = "+sys_admin,+setuid,+setgid,+setpcap,+chown,+fowner,+kill";
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // On cgroup v2 moving a process needs write access to the common ancestor's
        // cgroup.procs: a non-root server must itself run inside its delegated subtree (as a
        // systemd unit with Delegate=yes does), which this test does not set up.
        eprintln!("non-root server: SKIPPED: cgroup v2 host (needs the server inside a delegated subtree)");
        return;
    }
    // Delegate each controller's `cloude` directory to the server's uid.
    let tops: Vec<std::path::PathBuf> = ["memory", "pids", "cpu"]
        .iter()
        .map(|c| {
            std::path::Path::new("/sys/fs/cgroup")
                .join(c)
                .join("cloude")
        })
        .collect();
    for t in &tops {
        std::fs::create_dir_all(t).expect("cloude cgroup");
        std::os::unix::fs::chown(t, Some(USER), Some(USER)).expect("delegate");
    }
    let home = cloude_image::paths::cloude_home();
    let wrapper: Vec<String> = [
        "setpriv",
        &format!("--reuid={USER}"),
        &format!("--regid={USER}"),
        "--clear-groups",
        &format!("--inh-caps={CAPS}"),
        &format!("--ambient-caps={CAPS}"),
        "--",
        "env",
        &format!("CLOUDE_HOME={}", home.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let config = "[vm]\nprebuild = [\"bash\"]\n[snapshot]\nenabled = false\n\
                  [judge0]\nenabled = false\n";
    let started = Server::start_wrapped(
        &wrapper,
        Some(USER),
        "127.0.0.1:0",
        &["--hypervisor", "qemu", "--no-build"],
        Some(config),
        Duration::from_secs(120),
    );
    let restore = || {
        for t in &tops {
            let _ = std::os::unix::fs::chown(t, Some(0), Some(0));
        }
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            restore();
            panic!("non-root server: {e}");
        }
    };
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
    let line = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    assert!(
        line("Uid:").starts_with(&USER.to_string()),
        "server uid: {status}"
    );
    assert_ne!(
        line("CapEff:"),
        "0000000000000000",
        "the server holds capabilities"
    );
    let h = server.get("/healthz").json();
    assert_eq!(h["jail"], true, "{h}");
    let addr = server.addr;
    let req = std::thread::spawn(move || {
        support::http(
            addr,
            "POST",
            "/v1/executions",
            Some(
                serde_json::to_vec(&json!({"language": "bash", "code": "echo non-root; sleep 3", "timeout_ms": 30000}))
                    .expect("json"),
            ),
        )
    });
    let t = Instant::now();
    let hv = loop {
        if let Some(h) = server
            .children()
            .into_iter()
            .find_map(|j| children_of(j).first().copied())
        {
            break h;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no jailed hypervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let f = jail_facts(hv);
    assert_eq!(f.problems(false), None, "hypervisor {hv}: {f:?}");
    assert!(
        f.uids.iter().all(|&u| u != USER && u != 0),
        "the hypervisor runs under a VM uid: {:?}",
        f.uids
    );
    let r = req.join().expect("request");
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    drop(server);
    restore();
    assert_eq!(v["stdout"], "non-root\n", "{v}");
}
