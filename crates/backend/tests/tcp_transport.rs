//! The tcp transport end to end: `cloude-server` with `vm.transport = "tcp"` runs inside a
//! network namespace this test creates (reached over a veth pair), gives every VM its own tap and
//! /30, and talks to each agent over TCP on the VM's own address. Real QEMU VMs (the fallback
//! hypervisor here), real taps, real HTTP.
//!
//! Needs root (or CAP_NET_ADMIN), `/dev/net/tun` and `ip`; without them it says SKIPPED and why.

use cloude_testkit as support;

use std::process::Command;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use support::netns::{sh, skip_reason, Netns};
use support::Server;

/// Images may have to be built on first start (the e2e test usually built them already).
const FIRST_START: Duration = Duration::from_secs(3600);

fn exec(s: &Server, body: Value) -> (u16, Value) {
    let r = s.post("/v1/executions", &body);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!({ "raw": r.text() }));
    (r.status, v)
}

/// `POST /v1/executions` from a thread; joins to the answer (Null if it is not JSON).
fn exec_in_background(s: &Server, body: Value) -> thread::JoinHandle<Value> {
    let addr = s.addr;
    thread::spawn(move || {
        let body = serde_json::to_vec(&body).expect("json");
        let r = support::http(addr, "POST", "/v1/executions", Some(body));
        serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null)
    })
}

fn stdout(v: &Value) -> &str {
    v["stdout"].as_str().unwrap_or("")
}

#[test]
fn tcp_transport_in_a_netns() {
    if let Some(why) = skip_reason() {
        eprintln!("tcp_transport: SKIPPED: {why}");
        return;
    }
    let ns = Netns::create().unwrap_or_else(|e| panic!("cannot create the test namespace: {e}"));
    let config = "[vm]\ntransport = \"tcp\"\nprebuild = [\"bash\", \"python\"]\n\
                  [network]\nallow = true\n\
                  [limits]\nmax_concurrent_vms = 4\n";
    let server = Server::start_in(
        Some(&ns.name),
        &format!("{}:0", ns.inner_ip),
        &["--hypervisor", "qemu"],
        Some(config),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("tcp_transport: {e}"));
    let listen = server.addr;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, ok: bool, detail: &Value| {
        if ok {
            eprintln!("tcp_transport: ok   {name}");
        } else {
            let d: String = detail.to_string().chars().take(800).collect();
            eprintln!("tcp_transport: FAIL {name}: {d}");
            failures.push(name.to_string());
        }
    };

    // Plain requests over TCP to the agent.
    let (st, v) = exec(
        &server,
        json!({"language": "bash", "code": "echo tcp-hello"}),
    );
    check(
        "bash over tcp",
        st == 200 && v["status"] == "ok" && stdout(&v) == "tcp-hello\n",
        &v,
    );
    let (st, v) = exec(
        &server,
        json!({"language": "python", "stdin": "from stdin\n", "args": ["a1"],
               "code": "import sys\nprint(input(), sys.argv[1])\nsys.exit(3)",
               "timeout_ms": 30000}),
    );
    check(
        "python over tcp: stdin, args, exit code",
        st == 200 && stdout(&v) == "from stdin a1\n" && v["exit_code"] == 3,
        &v,
    );

    // Offline by default: the program cannot reach the host side of its tap, nor the server,
    // even though the VM itself has an address.
    let probe = format!(
        "for t in 10.201.0.1/{port} {ip}/{port}; do \
           if (exec 3<>/dev/tcp/${{t%/*}}/${{t#*/}}) 2>/dev/null; then echo REACHED $t; else echo blocked; fi; \
         done; cat /sys/class/net/eth0/address",
        port = listen.port(),
        ip = listen.ip()
    );
    let (st, v) = exec(&server, json!({"language": "bash", "code": probe}));
    check(
        "offline program reaches nothing (own network namespace)",
        st == 200
            && stdout(&v).starts_with("blocked\nblocked\n")
            && !stdout(&v).contains("REACHED"),
        &v,
    );

    // network: true gives the program the VM's link: it reaches the server's address.
    let fetch = format!(
        "exec 3<>/dev/tcp/{}/{} && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
        listen.ip(),
        listen.port()
    );
    let (st, v) = exec(
        &server,
        json!({"language": "bash", "network": true, "code": fetch}),
    );
    check(
        "network: true reaches a host in the namespace",
        st == 200 && stdout(&v).contains("200 OK") && stdout(&v).contains("\"hypervisor\""),
        &v,
    );

    // Four at once: each VM has its own tap and address, and each answer is its own.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let addr = server.addr;
            thread::spawn(move || {
                let body = json!({"language": "bash", "network": true,
                    "code": format!("echo token-{i}; cat /sys/class/net/eth0/address")});
                let r = support::http(
                    addr,
                    "POST",
                    "/v1/executions",
                    Some(serde_json::to_vec(&body).expect("json")),
                );
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                (i, r.status, v)
            })
        })
        .collect();
    let mut macs = std::collections::HashSet::new();
    for h in handles {
        let (i, st, v) = h.join().expect("request thread");
        let out = stdout(&v).to_string();
        let mut lines = out.lines();
        let ok = st == 200 && lines.next() == Some(format!("token-{i}").as_str());
        if let Some(mac) = lines.next() {
            macs.insert(mac.to_string());
        }
        check(
            &format!("concurrent request {i} got its own output"),
            ok,
            &v,
        );
    }
    check(
        "four concurrent VMs had four different addresses",
        macs.len() == 4,
        &json!(macs.iter().collect::<Vec<_>>()),
    );

    // Another VM, through the host: with forwarding on in the namespace (as on many real hosts),
    // the host-side rules still let nothing open a connection into a VM's tap (before them, the
    // SYN got through and only the agent's own gateway check refused it). B idles while networked A probes the addresses below its own for an agent that answers.
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
    ])
    .expect("enable forwarding in the test namespace (/proc/sys/net is per namespace)");
    let b = exec_in_background(
        &server,
        json!({"language": "bash", "code": "sleep 12; echo b-done", "timeout_ms": 30000}),
    );
    thread::sleep(Duration::from_millis(1500));
    // Blocks are handed out round robin, so B holds one of the eight blocks below A's. Each probe
    // is bounded: SYNs to addresses nobody holds get rate-limited ICMP errors at best.
    let scan = r#"[[ $(</proc/cmdline) =~ ip=([0-9.]+): ]] && own=${BASH_REMATCH[1]}
probe='exec 3<>/dev/tcp/$1/8080 || exit; echo "CONNECTED $1"
  printf "GET /v1/health HTTP/1.0\r\n\r\n" >&3; resp=$(cat <&3); [[ $resp == *HTTP/* ]] && echo "REACHED $1"'
last=${own##*.}
for k in 1 2 3 4 5 6 7 8; do
  [ $((last - 4 * k)) -ge 2 ] || break
  timeout 8 bash -c "$probe" _ "10.201.0.$((last - 4 * k))" 2>/dev/null &
done; wait; echo scanned"#;
    let (st, a) = exec(
        &server,
        json!({"language": "bash", "network": true, "code": scan, "timeout_ms": 30000}),
    );
    let b = b.join().expect("request B");
    let out = stdout(&a).to_string();
    check(
        "another VM is unreachable through the host (host rules)",
        st == 200
            && !out.contains("CONNECTED")
            && !out.contains("REACHED")
            && out.ends_with("scanned\n")
            && stdout(&b) == "b-done\n",
        &json!({"scanner": a, "idle": b}),
    );

    // Fault paths with taps: a timeout, and `kill -9` of the hypervisor mid-run.
    let (st, v) = exec(
        &server,
        json!({"language": "bash", "code": "echo started; sleep 60", "timeout_ms": 2000}),
    );
    check(
        "timeout over tcp",
        st == 200 && v["status"] == "timeout" && stdout(&v) == "started\n",
        &v,
    );
    let victim = exec_in_background(
        &server,
        json!({"language": "bash", "code": "sleep 60", "timeout_ms": 30000}),
    );
    let t = std::time::Instant::now();
    let mut killed = false;
    let mut kill_at = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(60) && !killed {
        // Wait until the VM runs the program (its tap exists and the request is in flight).
        if let (Some(pid), false) = (server.children().first().copied(), ns.taps().is_empty()) {
            thread::sleep(Duration::from_millis(2500));
            killed = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            kill_at = std::time::Instant::now();
        } else {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let v = victim.join().expect("victim request");
    let answered = kill_at.elapsed();
    // A dead VM sends no FIN over TCP: the server must notice the hypervisor's exit itself.
    check(
        "kill -9 of the hypervisor over tcp -> internal_error within seconds",
        killed
            && v["status"] == "internal_error"
            && v["message"]
                .as_str()
                .unwrap_or("")
                .contains("stopped unexpectedly")
            && answered < Duration::from_secs(10),
        &json!({"answer": v, "answered_after_ms": answered.as_millis()}),
    );

    // Nothing left: no taps, no hypervisors, no VM directories.
    thread::sleep(Duration::from_millis(500));
    let taps = ns.taps();
    check(
        "no tap left after the requests",
        taps.is_empty(),
        &json!(taps),
    );
    let kids = server.children();
    check("no hypervisor left", kids.is_empty(), &json!(kids));
    let status = server.stop(Duration::from_secs(30));
    check(
        "SIGTERM: clean exit",
        matches!(&status, Ok(s) if s.success()),
        &json!(format!("{status:?}")),
    );
    let taps = ns.taps();
    check("no tap left after shutdown", taps.is_empty(), &json!(taps));
    let tables =
        sh(&["ip", "netns", "exec", &ns.name, "nft", "list", "tables"]).unwrap_or_default();
    check(
        "no nftables table left after shutdown",
        !tables.contains("cloude_"),
        &json!(tables),
    );
    assert!(failures.is_empty(), "tcp_transport failures: {failures:?}");
}

/// The uid a process runs as (`/proc/PID/status`).
fn uid_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("Uid")
}

/// The guest address QEMU hands its kernel (`ip=<guest>::<host>:…`).
fn guest_ip_of(qemu: u32) -> Option<String> {
    support::cmdline_args(qemu).iter().find_map(|a| {
        a.split_ascii_whitespace()
            .find_map(|w| w.strip_prefix("ip="))
            .and_then(|v| v.split(':').next())
            .map(str::to_string)
    })
}

/// Runs `script` under bash (its `/dev/tcp`) with a time limit; returns (success, stdout).
fn bash(prefix: &[&str], script: &str) -> (bool, String) {
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .args(["timeout", "5", "bash", "-c", script]);
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// An escaped hypervisor of VM A (its uid, in its namespaces) reaches neither VM B's agent nor
/// the server; with the host's network and A's uid the host rules drop it (only the server's
/// uid may open connections to agents); and even root on the host, without B's secret, gets no
/// answer from B's agent. Both VMs' programs still finish normally.
#[test]
fn an_escaped_hypervisor_reaches_no_agent() {
    if let Some(why) = skip_reason() {
        eprintln!("tcp_transport: SKIPPED: {why}");
        return;
    }
    let ns = Netns::create().unwrap_or_else(|e| panic!("cannot create the test namespace: {e}"));
    let config = "[vm]\ntransport = \"tcp\"\nprebuild = [\"bash\"]\n\
                  [limits]\nmax_concurrent_vms = 4\n";
    let server = Server::start_in(
        Some(&ns.name),
        &format!("{}:0", ns.inner_ip),
        &["--hypervisor", "qemu"],
        Some(config),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("tcp_transport: {e}"));
    let runs: Vec<_> = (0..2)
        .map(|i| {
            exec_in_background(
                &server,
                json!({"language": "bash", "code": format!("sleep 12; echo run-{i}"), "timeout_ms": 60000}),
            )
        })
        .collect();
    // Both jailers' hypervisors, booted far enough to have their agents listening.
    let t = std::time::Instant::now();
    let qemus: Vec<u32> = loop {
        let q: Vec<u32> = server
            .children()
            .into_iter()
            .filter_map(|j| support::children_of(j).first().copied())
            .filter(|&q| guest_ip_of(q).is_some())
            .collect();
        if q.len() == 2 {
            break q;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "two VMs: {q:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(4));
    let (a, b) = (qemus[0], qemus[1]);
    let ua = uid_of(a).to_string();
    let b_ip = guest_ip_of(b).expect("B's address");
    let to_b = format!("exec 3<>/dev/tcp/{b_ip}/8080 && echo CONNECTED");
    let to_server = format!(
        "exec 3<>/dev/tcp/{}/{} && echo CONNECTED",
        server.addr.ip(),
        server.addr.port()
    );
    let a_pid = a.to_string();
    let as_a = [
        "setpriv",
        "--reuid",
        &ua,
        "--regid",
        &ua,
        "--clear-groups",
        "--",
    ];
    // 1. In A's own namespaces (its network namespace is empty) with A's uid.
    let in_a: Vec<&str> = ["nsenter", "-t", &a_pid, "-n", "--"]
        .into_iter()
        .chain(as_a)
        .collect();
    for (what, script) in [("B's agent", &to_b), ("the server", &to_server)] {
        let (ok, out) = bash(&in_a, script);
        assert!(
            !ok && !out.contains("CONNECTED"),
            "from A's namespaces as A's uid, {what} was reached: {out}"
        );
    }
    // 2. With the server's network (as if A kept it) and A's uid: the host rules drop it.
    let netns = format!("--net=/run/netns/{}", ns.name);
    let host_as_a: Vec<&str> = ["nsenter", netns.as_str(), "--"]
        .into_iter()
        .chain(as_a)
        .collect();
    let (ok, out) = bash(&host_as_a, &to_b);
    assert!(
        !ok && !out.contains("CONNECTED"),
        "A's uid on the server's network reached B's agent: {out}"
    );
    // 3. Root on the server's network, without B's secret: the agent answers nothing.
    let (_, out) = bash(
        &["nsenter", netns.as_str(), "--"],
        &format!(
            "exec 3<>/dev/tcp/{b_ip}/8080 && printf 'GET /v1/health HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        ),
    );
    assert!(
        !out.contains("HTTP/1"),
        "B's agent answered a peer without its secret: {out}"
    );
    // The server itself still reaches both (with their secrets).
    for (i, r) in runs.into_iter().enumerate() {
        let v = r.join().expect("run");
        assert_eq!(stdout(&v), format!("run-{i}\n"), "{v}");
    }
    eprintln!("tcp_transport: an escaped hypervisor reached nothing; both runs answered");
}
