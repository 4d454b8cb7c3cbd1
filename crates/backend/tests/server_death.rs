//! No VM outlives its server: a server killed with SIGKILL takes its jailers and hypervisors
//! with it (the jailer's parent-death signal, re-armed after it drops its uid), a starting
//! server kills what a dead one left in its cgroups, and SIGTERM with VMs running ends within
//! the grace period. Real server, real jailed QEMU VMs.

use cloude_testkit as support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::Server;

/// Kernel build plus the bash image when nothing is cached yet.
const FIRST_START: Duration = Duration::from_secs(3600);

/// The runtime directory's name (`cloude-*` under the harness directory): it names the
/// server's cgroups and appears in every jailer's command line.
fn runtime_name(server: &Server) -> String {
    std::fs::read_dir(server.runtime_dir())
        .expect("harness runtime dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("cloude-"))
        .expect("the server made its runtime directory")
}

/// Processes in the server's cgroups or whose command line names its runtime directory, with
/// their command lines.
fn vm_processes(name: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != std::process::id())
        .filter_map(|p| {
            // A zombie has ended; its parent (init, for orphans) only has not reaped it yet.
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                return None;
            }
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let cg = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
            (cmd.contains(name) || cg.contains(&format!("/cloude/{name}")))
                .then(|| format!("{p}: {}", cmd.chars().take(100).collect::<String>()))
        })
        .collect()
}

fn post_in_background(addr: std::net::SocketAddr, body: serde_json::Value) {
    std::thread::spawn(move || {
        let client = cloude_api::client::Client::with_timeout(
            &format!("http://{addr}"),
            Some(Duration::from_secs(120)),
        );
        let _ = client.raw(
            "POST",
            "/v1/executions",
            Some(&serde_json::to_vec(&body).expect("json")),
        );
    });
}

/// Requests in flight, a warm pool and a template being made, then SIGKILL: within 2 s no
/// jailer or hypervisor of the server is left; the next server removes its cgroups at once.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn a_killed_server_leaves_no_vm_behind() {
    let config = "[limits]\nmax_concurrent_vms = 4\n[vm]\nprebuild = [\"bash\"]\n\
                  [pool]\nsize = 1\nlanguages = [\"bash\"]\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("server: {e}"));
    let name = runtime_name(&server);
    for i in 0..2 {
        post_in_background(
            server.addr,
            json!({"language": "bash", "code": format!("echo {i}; sleep 100"), "timeout_ms": 60000}),
        );
    }
    // A sandbox (a VM kept across calls) dies with the server too.
    let sb = server.post("/v1/sandboxes", &json!({"template": "bash"}));
    assert_eq!(sb.status, 201, "{}", sb.text());
    // Python is not prebuilt: its first request boots cold and makes its snapshot's template
    // in the background.
    post_in_background(
        server.addr,
        json!({"language": "python", "code": "import time; time.sleep(100)", "timeout_ms": 60000}),
    );
    let t = Instant::now();
    let jailers = loop {
        let n = server.children().len();
        if n >= 4 || t.elapsed() > Duration::from_secs(90) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        jailers >= 3,
        "pool VM and two requests' VMs expected, saw {jailers} jailers"
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = vm_processes(&name);
    // At least the pool's VM and the two requests' (a template may have come and gone).
    assert!(before.len() >= 6, "jailers and hypervisors: {before:#?}");
    eprintln!(
        "{} VM processes ({jailers} jailers) before SIGKILL",
        before.len()
    );
    server.kill();
    let t = Instant::now();
    let left = loop {
        let left = vm_processes(&name);
        if left.is_empty() || t.elapsed() > Duration::from_secs(2) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        left.is_empty(),
        "2 s after SIGKILL these are still running: {left:#?}"
    );
    eprintln!("every VM process gone {:?} after SIGKILL", t.elapsed());
    assert!(
        !support::server_cgroup_dirs(&name).is_empty(),
        "a killed server cannot remove its cgroups"
    );
    // The next server removes the dead server's cgroups at start (not after minutes).
    let next = Server::start(
        &["--hypervisor", "qemu", "--lazy", "--no-build"],
        None,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("next server: {e}"));
    assert_eq!(
        support::server_cgroup_dirs(&name),
        Vec::<std::path::PathBuf>::new(),
        "the dead server's cgroups"
    );
    drop(next);
}

/// A process left in the VM cgroup of a server that is gone (here: made by hand, as a server
/// that died before its jailer could follow would leave it) is killed by the next server's
/// start-up sweep, and the directories removed.
#[test]
fn a_starting_server_kills_what_dead_servers_left_in_their_cgroups() {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/self/ns/pid")
        .expect("pid namespace")
        .ino();
    // A pid that no longer runs: a reaped child.
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let dead_pid = gone.id();
    gone.wait().expect("reap");
    let name = format!("cloude-deadtest{}.{ns}-{dead_pid}-1", std::process::id());
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let roots: Vec<&str> = if v2 {
        vec!["/sys/fs/cgroup"]
    } else {
        vec![
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/cpu",
        ]
    };
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    let vm_dirs: Vec<_> = roots
        .iter()
        .map(|r| Path::new(r).join("cloude").join(&name).join("vm-1"))
        .collect();
    for d in &vm_dirs {
        std::fs::create_dir_all(d).expect("cgroup dir");
        std::fs::write(d.join("cgroup.procs"), sleeper.id().to_string()).expect("join");
    }
    let server = Server::start(
        &["--hypervisor", "qemu", "--lazy", "--no-build"],
        None,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("server: {e}"));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = sleeper.try_wait().expect("wait") {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(5) {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left: Vec<_> = vm_dirs.iter().filter(|d| d.exists()).collect();
    for d in &vm_dirs {
        let _ = std::fs::remove_dir(d);
        if let Some(p) = d.parent() {
            let _ = std::fs::remove_dir(p);
        }
    }
    drop(server);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(libc::SIGKILL),
        "the process left in a dead server's cgroup is killed by the next server's sweep"
    );
    assert!(
        left.is_empty(),
        "dead server's cgroups still there: {left:?}"
    );
}

/// SIGTERM with pooled VMs running and idle connections open, no request in flight: the server
/// exits within a few seconds (idle connections are closed at once, pooled VMs killed). With a
/// request in flight it exits within the grace period plus the cancelled answer's grace.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn sigterm_with_vms_running_ends_within_the_grace() {
    use std::io::Write;
    let config = "[limits]\nshutdown_grace_ms = 3000\n[vm]\nprebuild = [\"bash\"]\n\
                  [pool]\nsize = 2\nlanguages = [\"bash\"]\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("server: {e}"));
    let t = Instant::now();
    while server.get("/healthz").json()["pool_ready"]
        .as_u64()
        .unwrap_or(0)
        < 2
    {
        assert!(t.elapsed() < Duration::from_secs(120), "pool did not fill");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut idle = std::net::TcpStream::connect(server.addr).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("half a header");
    let _keepalive = std::net::TcpStream::connect(server.addr).expect("connect");
    let t = Instant::now();
    let status = server.stop(Duration::from_secs(30)).expect("exits");
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(5),
        "no request in flight: SIGTERM took {took:?}"
    );
    eprintln!("SIGTERM with 2 pooled VMs and 2 idle connections: exited in {took:?}");

    let config = "[limits]\nshutdown_grace_ms = 3000\n[vm]\nprebuild = [\"bash\"]\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("server: {e}"));
    let addr = server.addr;
    let req = std::thread::spawn(move || {
        let client = cloude_api::client::Client::with_timeout(
            &format!("http://{addr}"),
            Some(Duration::from_secs(60)),
        );
        client.raw(
            "POST",
            "/v1/executions",
            Some(
                &serde_json::to_vec(
                    &json!({"language": "bash", "code": "echo hi; sleep 100", "timeout_ms": 60000}),
                )
                .expect("json"),
            ),
        )
    });
    let t = Instant::now();
    while server.get("/healthz").json()["vms_running"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        assert!(t.elapsed() < Duration::from_secs(60), "request's VM");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let status = server.stop(Duration::from_secs(30)).expect("exits");
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    // Grace 3 s + at most 5 s for the cancelled request's answer + slack.
    assert!(
        took < Duration::from_secs(10),
        "with a request in flight: SIGTERM took {took:?}"
    );
    let answer = req
        .join()
        .expect("request thread")
        .expect("the request was answered, not cut");
    let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("json answer");
    eprintln!("SIGTERM with a request in flight: exited in {took:?}; the request got {body}");
    assert_eq!(body["status"], "internal_error", "{body}");
}
