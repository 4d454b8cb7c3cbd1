//! Client → server bounds that need no VM: the connection cap and the lingering close that lets
//! a client which sends its whole oversized body before reading see the 413.

use cloude_testkit as support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::Server;

fn lazy_server(config: &str) -> Server {
    Server::start(
        &["--hypervisor", "qemu", "--lazy", "--no-build"],
        Some(config),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("connections: {e}"))
}

/// Past `limits.max_connections` open connections, one more gets a 503 naming the limit at
/// once; when one closes, a new connection is served again.
#[test]
fn connections_over_the_cap_are_refused_clearly() {
    let server = lazy_server("[limits]\nmax_connections = 4\n");
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(server.addr).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"),
        "{answer:?}"
    );
    assert!(answer.contains("max_connections"), "{answer:?}");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let h = server.get("/healthz");
    assert_eq!(h.status, 200, "served again once connections closed");
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
