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
