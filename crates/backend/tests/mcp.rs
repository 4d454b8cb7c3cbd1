//! The MCP face with the official MCP Python SDK (`mcp` on PyPI, in a venv of its own) used
//! unchanged, over both transports: Streamable HTTP at `/mcp` and stdio through `cloude mcp`.
//! Real VMs on the QEMU fallback: run_code in python, C and bash, errors as tool errors, a
//! sandbox kept across tool calls, concurrent calls; a client that leaves mid-call takes its VM
//! with it.

use cloude_testkit as support;

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::Server;

const FIRST_START: Duration = Duration::from_secs(3600);
/// The pinned SDK (its attribute names changed across major versions).
const MCP_SDK: &str = "mcp==2.3.0";

fn server() -> Server {
    let config =
        "[vm]\nprebuild = [\"python\", \"c\", \"bash\"]\n[limits]\nmax_concurrent_vms = 3\n";
    Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("mcp: {e}"))
}

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mcp-sdk-venv");
    support::python_venv(&venv, "mcp", MCP_SDK).unwrap_or_else(|e| panic!("{e}"))
}

fn client(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_client/run.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "the MCP SDK client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn the_official_sdk_over_streamable_http_and_stdio() {
    let s = server();
    client(&["http", &format!("{}/mcp", s.url)]);
    let cloude = support::sibling_bin("cloude").expect("cloude binary");
    client(&["stdio", cloude.to_str().expect("path"), &s.url]);

    // A Host header that is not loopback (DNS rebinding) is refused.
    let r = support::http(s.addr, "GET", "/mcp", None);
    assert_ne!(r.status, 404, "the route exists");
    let mut c = TcpStream::connect(s.addr).expect("connect");
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    write!(
        c,
        "POST /mcp HTTP/1.1\r\nhost: evil.example:8787\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut c, &mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 4"),
        "a foreign Host is refused: {answer}"
    );

    // A client that leaves in the middle of run_code: its VM is killed.
    let mut c = TcpStream::connect(s.addr).expect("connect");
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "run_code", "arguments": {"language": "bash", "code": "sleep 50", "timeout_ms": 60000}}})
    .to_string();
    write!(
        c,
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2025-06-18\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let t = Instant::now();
    while s.children().is_empty() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!s.children().is_empty(), "the call started a VM");
    drop(c);
    let t = Instant::now();
    while !s.children().is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        s.children().is_empty(),
        "the VM outlived its client: {:?}",
        s.children()
    );
    eprintln!("VM gone {:?} after the MCP client left", t.elapsed());

    // A client that leaves in the middle of run_command: its command is killed, the sandbox
    // lives on.
    let r = s.post("/v1/sandboxes", &serde_json::json!({"timeout_s": 120}));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_string();
    let mut c = TcpStream::connect(s.addr).expect("connect");
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
        "params": {"name": "run_command", "arguments": {"sandbox_id": id, "command": "sleep 88", "timeout_ms": 60000}}})
    .to_string();
    write!(
        c,
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2025-06-18\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let ps = |s: &Server| {
        let r = s.post(
            &format!("/v1/sandboxes/{id}/exec"),
            &serde_json::json!({"cmd": "ps -eo args"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("sleep 88")
    };
    let t = Instant::now();
    while !ps(&s) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the command never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(c);
    let t = Instant::now();
    while ps(&s) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the command outlived its MCP client"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("command gone {:?} after the MCP client left", t.elapsed());
    let r = support::http(s.addr, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
}
