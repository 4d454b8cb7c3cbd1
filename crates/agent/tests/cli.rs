//! The `cloude-agent` binary outside PID 1: `serve --tcp` answers real HTTP.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_cloude-agent");

/// Kills the child on drop, so a failed assertion leaks no process.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_tcp_answers_health_and_run() {
    let Some(cg) = cgroup_or_skip("cli") else {
        return;
    };
    let work = work_root();
    let mut child = Killed(
        Command::new(BIN)
            .args(["serve", "--tcp", "127.0.0.1:0", "--no-poweroff"])
            .arg("--work-root")
            .arg(work.path())
            .arg("--cgroup-root")
            .arg(cg.path.join("root"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent"),
    );
    let mut out = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    let addr = line
        .trim()
        .strip_prefix("listening tcp ")
        .expect("address line")
        .to_string();
    line.clear();
    out.read_line(&mut line).expect("read");
    assert_eq!(
        cloude_protocol::parse_ready_line(&line),
        Some(cloude_protocol::PROTOCOL_VERSION)
    );

    let health = raw_http(
        &addr,
        "GET /v1/health HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"protocol_version\":1"), "{health}");

    let body = serde_json::to_string(&sh("echo via-cli")).expect("json");
    let run = raw_http(
        &addr,
        &format!(
            "POST /v1/run HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(run.starts_with("HTTP/1.1 200"), "{run}");
    // "via-cli\n" in base64.
    assert!(run.contains("dmlhLWNsaQo="), "{run}");
    drop(child);
    let _ = std::fs::remove_dir(cg.path.join("root"));
}

fn raw_http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp
}

#[test]
fn serve_without_transport_fails_cleanly() {
    let out = Command::new(BIN).arg("serve").output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to serve"));
}
