//! Client → server bounds that need no VM: the connection cap and the lingering close that lets
//! a client which sends its whole oversized body before reading see the 413.

use cloude_testkit as support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use support::Server;

fn lazy_server(config: &str) -> Server {
    Server::start(
        &["--hypervisor", "qemu", "--lazy", "--no-build"],
        Some(config),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("connections: {e}"))
}

/// Opens a connection from `from` (a loopback address) to `to` that has sent half a request
/// header and then nothing: a slowloris.
fn half_sent(to: SocketAddr, from: Ipv4Addr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("the test server listens on IPv4")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(from, 0)),
    )
    .expect("bind");
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    let mut s = TcpStream::from(fd);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("half a header");
    s
}

/// A connection whose request is in flight: a complete header, then a body that never comes.
fn in_flight(to: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(to).expect("connect");
    s.write_all(
        b"POST /v1/executions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .expect("header");
    s
}

fn read_answer(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

/// Past `limits.max_connections` connections that each have a request in flight, one more gets
/// a 503 naming the limit at once; when one closes, a new connection is served again.
#[test]
fn connections_over_the_cap_are_refused_clearly() {
    let server = lazy_server("[limits]\nmax_connections = 4\n");
    let busy: Vec<TcpStream> = (0..4).map(|_| in_flight(server.addr)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(server.addr).expect("connect");
    let answer = read_answer(&mut extra);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"),
        "{answer:?}"
    );
    assert!(answer.contains("max_connections"), "{answer:?}");
    drop(busy);
    std::thread::sleep(Duration::from_millis(300));
    let h = server.get("/healthz");
    assert_eq!(h.status, 200, "served again once connections closed");
}

/// A full server of idle connections (half-sent headers) makes way: the newcomer takes the
/// oldest idle connection's slot, which is closed; a client with a request in flight keeps its
/// connection.
#[test]
fn idle_connections_make_way_for_newcomers() {
    let server = lazy_server("[limits]\nmax_connections = 4\n");
    let mut busy = in_flight(server.addr);
    std::thread::sleep(Duration::from_millis(100));
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| {
            let s = half_sent(server.addr, Ipv4Addr::LOCALHOST);
            std::thread::sleep(Duration::from_millis(50));
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let h = server.get("/healthz");
    assert_eq!(h.status, 200, "a newcomer is served on a full server");
    // The oldest idle connection was closed for it (end of file, no answer).
    let oldest = read_answer(&mut idle[0]);
    assert_eq!(oldest, "", "the oldest idle connection is closed");
    // The busy one still completes its request.
    busy.write_all(&[b' '; 99]).expect("rest of the body");
    let answer = read_answer(&mut busy);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer:?}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// 1,500 idle half-sent requests (a slowloris), first from one address, then from six: a real
/// client still gets its answer at once, the server's memory stays bounded, and once the
/// attackers close, its descriptors are back where they were.
#[test]
fn fifteen_hundred_idle_connections_lock_nobody_out() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // This test process holds 1,500 sockets.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise our fd limit");
    assert!(
        hard >= 2000,
        "the test needs 2,000 open files (hard limit {hard})"
    );
    let server = lazy_server("[limits]\nmax_connections = 512\n");
    let pid = server.pid();
    assert_eq!(server.get("/healthz").status, 200);
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    for (what, sources) in [
        ("one address", vec![Ipv4Addr::LOCALHOST]),
        (
            "six addresses",
            (2..=7).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect(),
        ),
    ] {
        let attack: Vec<TcpStream> = (0..1500)
            .map(|i| half_sent(server.addr, sources[i % sources.len()]))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let h = server.get("/healthz");
        assert_eq!(h.status, 200, "{what}: a real request during the attack");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{what}: answered in {:?}",
            t.elapsed()
        );
        let rss = rss_kib(pid);
        assert!(
            rss < rss0 + 150 * 1024,
            "{what}: the server's memory grew from {rss0} KiB to {rss} KiB"
        );
        let fds = fd_count(pid);
        assert!(
            fds < fds0 + 2 * 512 + 64,
            "{what}: the server holds {fds} descriptors (from {fds0}) with 512 connections at most"
        );
        eprintln!(
            "{what}: answered in {:?}; server RSS {rss0} -> {rss} KiB, fds {fds0} -> {fds}",
            t.elapsed()
        );
        drop(attack);
        let t = Instant::now();
        while fd_count(pid) > fds0 + 8 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            fd_count(pid) <= fds0 + 8,
            "{what}: {} descriptors 5 s after the attackers closed (baseline {fds0})",
            fd_count(pid)
        );
        assert_eq!(server.get("/healthz").status, 200, "{what}: recovered");
    }
}

/// Python's `urllib` sends the whole 64 MiB body before it reads the answer: it gets the 413,
/// not `Broken pipe` or a reset.
#[test]
fn urllib_sending_64_mib_gets_the_413() {
    let server = lazy_server("");
    let script = format!(
        r#"
import json, urllib.request, urllib.error
body = json.dumps({{"language": "python", "code": "x" * (64 << 20)}}).encode()
req = urllib.request.Request("{}/v1/executions", data=body, headers={{"content-type": "application/json"}})
try:
    urllib.request.urlopen(req, timeout=60)
    print("no error")
except urllib.error.HTTPError as e:
    print("HTTP", e.code, json.loads(e.read())["error"])
except Exception as e:
    print("FAILED", type(e).__name__, e)
"#,
        server.url
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "HTTP 413 too_large",
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server is fine afterwards.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut a = String::new();
    let _ = s.read_to_string(&mut a);
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
}

/// A client that asks for `Connection: close` and reads to end-of-file gets its whole answer at
/// once: the lingering close ends the server's side first.
#[test]
fn connection_close_answers_end_at_once() {
    let server = lazy_server("");
    let t = std::time::Instant::now();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut a = String::new();
    s.read_to_string(&mut a).expect("read to EOF");
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "EOF after {:?}",
        t.elapsed()
    );
}
