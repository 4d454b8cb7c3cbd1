//! Host-side rules around the VMs' taps (`vm::fence`), driven for real: `cloude-server` with the
//! tcp transport runs in a network namespace this test creates; a program running as root in the
//! guest leaves the agent's offline namespace (setns into the VM's own) and then sends, on the
//! VM's eth0, plain TCP connects and UDP datagrams and raw Ethernet frames with a spoofed source
//! IP, a spoofed source MAC or both, to the host side of its tap and to the server's address. A
//! listener in the namespace counts what arrives: nothing may. The same probe against a server
//! with `[network] host_rules = false` does arrive (so the test can fail). Also: stale tables of a
//! gone server are swept at start, a VM's tables exist while it runs and go with it, none are
//! left after SIGTERM, and `/healthz` says whether the rules are on.
//!
//! Needs root, `/dev/net/tun`, `ip` and `nft`; without them it says SKIPPED and why.

use cloude_testkit as support;

use std::io::Read as _;
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::netns::{sh, skip_reason, Netns};
use support::Server;

/// Images may have to be built on first start.
const FIRST_START: Duration = Duration::from_secs(3600);
/// The port the listener in the namespace takes (TCP and UDP).
const LISTEN_PORT: u16 = 47_999;
/// Packets the probe sends: 2 TCP connects, 10 UDP datagrams, 2 x 4 x 10 raw frames.
const PROBE_PACKETS: usize = 2 + 10 + 80;
/// After the probe's answer, how long late packets may still arrive.
const LATE_PACKETS: Duration = Duration::from_millis(1500);

/// A root-run Python image for the probe (raw sockets, setns).
const TEST_CATALOG_EXTRA: &str = r#"
[[language]]
name = "python-root"
file = "main.py"
run = ["python3", "main.py"]
debian_packages = ["python3"]
memory_mib = 256
run_as_root = true
"#;

/// The guest side. argv: port, the server's address in the namespace, a spoofed source outside
/// the VM's /30. Prints what it did; the listener's count is the verdict.
const PROBE: &str = r#"
import ctypes, os, re, socket, struct, sys, time
PORT, INNER, FOREIGN = int(sys.argv[1]), sys.argv[2], sys.argv[3]
names = lambda: [n for _, n in socket.if_nameindex()]
if 'eth0' not in names():
    # The agent put this program in a namespace with only loopback; root walks out of it.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open('/proc/1/ns/net', os.O_RDONLY)
    print('setns', libc.setns(fd, 0x40000000), ctypes.get_errno())
print('ETH0' if 'eth0' in names() else 'NO-ETH0')
guest, host = re.search(r'ip=([0-9.]+)::([0-9.]+):', open('/proc/cmdline').read()).groups()
own_mac = open('/sys/class/net/eth0/address').read().strip()
sent = 0
for dst in (host, INNER):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((dst, PORT)); s.send(b'plain-tcp'); print('TCP-CONNECTED', dst)
    except Exception as e:
        print('tcp', dst, type(e).__name__)
    s.close(); sent += 1
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(5):
        try:
            u.sendto(b'plain-udp', (dst, PORT)); sent += 1
        except OSError as e:
            print('udp', dst, e)
time.sleep(0.5)
host_mac = 'ff:ff:ff:ff:ff:ff'
for line in open('/proc/net/arp').read().splitlines()[1:]:
    f = line.split()
    if f[0] == host and f[3] != '00:00:00:00:00:00':
        host_mac = f[3]
print('host mac', host_mac)
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s >> 16) + (s & 0xffff)
    return ~s & 0xffff
mac = lambda m: bytes.fromhex(m.replace(':', ''))
def frame(src_mac, src_ip, dst_ip, payload):
    ulen = 8 + len(payload)
    udp = struct.pack('!HHHH', 40000, PORT, ulen, 0) + payload
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack('!BBH', 0, 17, ulen)
    udp = udp[:6] + struct.pack('!H', csum(pseudo + udp) or 0xffff) + udp[8:]
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + ulen, 7, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
    return mac(host_mac) + mac(src_mac) + b'\x08\x00' + ip + udp
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(('eth0', 0))
fake_mac = '02:de:ad:be:ef:01'
other_vm = '.'.join(guest.split('.')[:3] + [str((int(guest.split('.')[3]) + 4) % 256)])
cases = [('spoof-ip-vm', own_mac, other_vm), ('spoof-ip-foreign', own_mac, FOREIGN),
         ('spoof-mac', fake_mac, guest), ('spoof-both', fake_mac, other_vm)]
for dst in (host, INNER):
    for tag, m, src in cases:
        for i in range(10):
            raw.send(frame(m, src, dst, ('%s-%d' % (tag, i)).encode())); sent += 1
print('SENT', sent)
"#;

/// Counts every TCP connection and UDP datagram on `LISTEN_PORT` inside the namespace.
struct Listener {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Listener {
    fn start(ns: &str) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (stop, seen, tx, ns) = (stop.clone(), seen.clone(), tx.clone(), ns.to_string());
            threads.push(thread::spawn(move || {
                // Only this thread moves into the namespace (setns is per thread for CLONE_NEWNET).
                let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                if udp {
                    let s = UdpSocket::bind(("0.0.0.0", LISTEN_PORT)).expect("udp bind");
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .expect("timeout");
                    tx.send(()).expect("ready");
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            let p = String::from_utf8_lossy(&buf[..n]).into_owned();
                            seen.lock().expect("lock").push(format!("udp {from} {p}"));
                        }
                    }
                } else {
                    let l = TcpListener::bind(("0.0.0.0", LISTEN_PORT)).expect("tcp bind");
                    l.set_nonblocking(true).expect("nonblocking");
                    tx.send(()).expect("ready");
                    while !stop.load(Ordering::SeqCst) {
                        match l.accept() {
                            Ok((mut c, from)) => {
                                let _ = c.set_nonblocking(false);
                                let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                                let mut buf = [0u8; 64];
                                let n = c.read(&mut buf).unwrap_or(0);
                                let p = String::from_utf8_lossy(&buf[..n]).into_owned();
                                seen.lock().expect("lock").push(format!("tcp {from} {p}"));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(20)),
                        }
                    }
                }
            }));
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("listener ready");
        }
        Listener {
            stop,
            seen,
            threads,
        }
    }

    fn finish(self) -> Vec<String> {
        thread::sleep(LATE_PACKETS);
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

/// `(family, name)` of the tables in the namespace.
fn tables(ns: &str) -> Vec<(String, String)> {
    let out = sh(&["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"]).unwrap_or_default();
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v["nftables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| {
                    let t = o.get("table")?;
                    Some((
                        t["family"].as_str()?.to_string(),
                        t["name"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn cloude_tables(ns: &str) -> Vec<String> {
    tables(ns)
        .into_iter()
        .filter(|(_, n)| n.starts_with("cloude_"))
        .map(|(f, n)| format!("{f} {n}"))
        .collect()
}

fn exec(s: &Server, body: &Value) -> (u16, Value) {
    let r = s.post("/v1/executions", body);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!({ "raw": r.text() }));
    (r.status, v)
}

fn stdout(v: &Value) -> String {
    v["stdout"].as_str().unwrap_or("").to_string()
}

struct ProbeResult {
    answer: Value,
    seen: Vec<String>,
    sent: usize,
    took: Duration,
}

/// Runs the guest probe with the listener open; returns what arrived.
fn probe(server: &Server, ns: &Netns) -> ProbeResult {
    let listener = Listener::start(&ns.name);
    let t = Instant::now();
    let body = json!({"language": "python-root", "code": PROBE, "timeout_ms": 30000,
                      "args": [LISTEN_PORT.to_string(), ns.inner_ip, ns.outer_ip]});
    let (_, answer) = exec(server, &body);
    let took = t.elapsed();
    let seen = listener.finish();
    let sent = stdout(&answer)
        .lines()
        .find_map(|l| l.strip_prefix("SENT "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    ProbeResult {
        answer,
        seen,
        sent,
        took,
    }
}

fn start(ns: &Netns, catalog: &str, host_rules: bool) -> Server {
    let config = format!(
        "[vm]\ntransport = \"tcp\"\nprebuild = [\"bash\", \"python-root\"]\n\
         [network]\nallow = true\nhost_rules = {host_rules}\n\
         [limits]\nmax_concurrent_vms = 3\n"
    );
    Server::start_in(
        Some(&ns.name),
        &format!("{}:0", ns.inner_ip),
        &["--hypervisor", "qemu", "--catalog", catalog],
        Some(&config),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("host_rules: {e}"))
}

#[test]
fn spoofed_packets_from_a_root_guest_reach_nothing() {
    if let Some(why) = skip_reason() {
        eprintln!("host_rules: SKIPPED: {why}");
        return;
    }
    if sh(&["nft", "--version"]).is_err() {
        eprintln!("host_rules: SKIPPED: no `nft` (the Debian package nftables)");
        return;
    }
    let (_catalog_file, catalog) = support::test_catalog(TEST_CATALOG_EXTRA);
    let ns = Netns::create().unwrap_or_else(|e| panic!("cannot create the test namespace: {e}"));
    // Forwarding on and no reverse-path filter, as on many real hosts: without the host rules,
    // spoofed sources are accepted and packets are routed between interfaces.
    for (key, val) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            &format!("{key}={val}"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // A table a killed server left (its owner's start time does not match pid 1's), and one that
    // is not ours: the first must be swept at start, the second kept.
    let plant = json!({"nftables": [
        {"add": {"table": {"family": "inet", "name": "cloude_1_999999999_cld9"}}},
        {"add": {"table": {"family": "inet", "name": "not_cloude"}}},
    ]});
    let plant_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(plant_file.path(), plant.to_string()).expect("write");
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "nft",
        "-j",
        "-f",
        plant_file.path().to_str().expect("utf-8"),
    ])
    .expect("plant the stale tables");

    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, ok: bool, detail: &Value| {
        if ok {
            eprintln!("host_rules: ok   {name}");
        } else {
            let d: String = detail.to_string().chars().take(1500).collect();
            eprintln!("host_rules: FAIL {name}: {d}");
            failures.push(name.to_string());
        }
    };

    let server = start(&ns, &catalog, true);
    let names = tables(&ns.name);
    check(
        "start-up swept the stale table and kept the foreign one",
        !names.iter().any(|(_, n)| n == "cloude_1_999999999_cld9")
            && names.iter().any(|(_, n)| n == "not_cloude"),
        &json!(names),
    );
    let h = server.get("/healthz").json();
    check(
        "/healthz says host_rules: true",
        h["host_rules"] == true && h["host_rules_detail"].is_string(),
        &h,
    );
    let (st, v) = exec(
        &server,
        &json!({"language": "bash", "code": "echo still-works"}),
    );
    check(
        "an ordinary request over tcp works",
        st == 200 && stdout(&v) == "still-works\n",
        &v,
    );

    // While a VM runs, its two tables exist; they go with it.
    let addr = server.addr;
    let bg = thread::spawn(move || {
        let body = serde_json::to_vec(&json!({"language": "bash", "code": "sleep 6; echo slept",
                                               "timeout_ms": 30000}))
        .expect("json");
        support::http(addr, "POST", "/v1/executions", Some(body))
    });
    let t = Instant::now();
    let mut during = Vec::new();
    while t.elapsed() < Duration::from_secs(60) && during.is_empty() {
        thread::sleep(Duration::from_millis(200));
        during = cloude_tables(&ns.name);
    }
    let slept = bg.join().expect("background request");
    let families: Vec<&str> = during.iter().filter_map(|t| t.split(' ').next()).collect();
    check(
        "a running VM has a netdev and an inet table of this server",
        families.contains(&"netdev")
            && families.contains(&"inet")
            && during
                .iter()
                .all(|t| t.contains(&format!("cloude_{}_", server.pid()))),
        &json!({"tables": during, "answer": slept.text()}),
    );

    let r = probe(&server, &ns);
    eprintln!(
        "host_rules: figures: rules on: {} of {} probe packets received by the listener, probe took {} ms",
        r.seen.len(),
        r.sent,
        r.took.as_millis()
    );
    let out = stdout(&r.answer);
    check(
        "the root probe left the offline namespace and sent everything",
        r.answer["status"] == "ok" && out.contains("ETH0\n") && r.sent == PROBE_PACKETS,
        &r.answer,
    );
    check(
        "rules on: nothing the guest sent reached the listener",
        r.seen.is_empty() && !out.contains("TCP-CONNECTED"),
        &json!({"seen": r.seen, "probe": out}),
    );

    // network: true opens the way out of the VM (not the spoofing): a plain connect arrives.
    let listener = Listener::start(&ns.name);
    let code = format!(
        "exec 3<>/dev/tcp/{}/{LISTEN_PORT} && printf net-ok >&3 && echo connected",
        ns.inner_ip
    );
    let (st, v) = exec(
        &server,
        &json!({"language": "bash", "network": true, "code": code}),
    );
    let seen = listener.finish();
    check(
        "network: true: the program's connection arrives",
        st == 200 && stdout(&v) == "connected\n" && seen.iter().any(|s| s.ends_with("net-ok")),
        &json!({"answer": v, "seen": seen}),
    );

    let settle = Instant::now();
    let mut left = cloude_tables(&ns.name);
    while !left.is_empty() && settle.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(100));
        left = cloude_tables(&ns.name);
    }
    check(
        "no table left once the VMs are gone",
        left.is_empty(),
        &json!(left),
    );
    let status = server.stop(Duration::from_secs(30));
    check(
        "SIGTERM: clean exit",
        matches!(&status, Ok(s) if s.success()),
        &json!(format!("{status:?}")),
    );
    let left = cloude_tables(&ns.name);
    check(
        "no table left after shutdown",
        left.is_empty(),
        &json!(left),
    );
    let taps = ns.taps();
    check("no tap left after shutdown", taps.is_empty(), &json!(taps));

    // The control: the same probe without the host rules does get through.
    let server = start(&ns, &catalog, false);
    let h = server.get("/healthz").json();
    check(
        "/healthz says host_rules: false",
        h["host_rules"] == false,
        &h,
    );
    let r = probe(&server, &ns);
    let spoofed = r.seen.iter().filter(|s| s.contains("spoof-")).count();
    eprintln!(
        "host_rules: figures: rules off (control): {} of {} probe packets received ({spoofed} of them spoofed), probe took {} ms",
        r.seen.len(),
        r.sent,
        r.took.as_millis()
    );
    check(
        "rules off: the same probe reaches the listener, spoofed packets included",
        !r.seen.is_empty()
            && spoofed > 0
            && r.seen.iter().any(|s| s.contains("spoof-mac"))
            && r.seen.iter().any(|s| s.contains("spoof-ip")),
        &json!({"seen": r.seen, "probe": stdout(&r.answer)}),
    );
    let left = cloude_tables(&ns.name);
    check("rules off: no table made", left.is_empty(), &json!(left));
    let status = server.stop(Duration::from_secs(30));
    check(
        "control server: clean exit",
        matches!(&status, Ok(s) if s.success()),
        &json!(format!("{status:?}")),
    );
    assert!(failures.is_empty(), "host_rules failures: {failures:?}");
}
