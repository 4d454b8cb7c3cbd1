//! The `cloude` binary against a real `cloude-server` bound to port 0 (started with
//! `--no-build`: these checks need no VM; end-to-end runs live in the backend's e2e test).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

struct Server {
    child: Child,
    url: String,
    _rt: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cloude")).with_file_name("cloude-server");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p cloude-server, or cargo test --workspace)",
        p.display()
    );
    p
}

fn start_server() -> Server {
    let rt = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0", "--no-build"])
        .env("CLOUDE_RUNTIME_DIR", rt.path())
        // An empty cache: `--no-build` then has nothing to serve.
        .env("CLOUDE_HOME", rt.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cloude-server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.split("listening on ").nth(1) {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server listening");
    Server {
        child,
        url,
        _rt: rt,
    }
}

fn cloude(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloude"))
        .arg("--server")
        .arg(server)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cloude")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn languages_lists_the_catalogue() {
    let s = start_server();
    let out = cloude(&s.url, &["languages"]);
    assert!(out.status.success(), "{out:?}");
    let t = text(&out.stdout);
    for l in ["python", "javascript", "bash", "c ", "cpp"] {
        assert!(t.contains(l), "{l} missing from:\n{t}");
    }
    let out = cloude(&s.url, &["--json", "languages"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["languages"].as_array().is_some_and(|a| a.len() >= 5));
}

#[test]
fn server_errors_are_one_clear_sentence() {
    let s = start_server();
    let out = cloude(&s.url, &["run", "-l", "no-such-language", "-c", "x"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown language \"no-such-language\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = cloude(
        &s.url,
        &[
            "--json",
            "run",
            "-l",
            "python",
            "-c",
            "x",
            "--timeout-ms",
            "0",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("raw JSON error");
    assert_eq!(v["field"], "timeout_ms");
    assert_eq!(out.status.code(), Some(125));

    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("x.unknownext");
    std::fs::write(&f, "x").expect("write");
    let out = cloude(&s.url, &["run", f.to_str().expect("utf8 path")]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains(".unknownext"),
        "{}",
        text(&out.stderr)
    );

    // With nothing cached and --no-build, a valid run is refused with 503 and a reason, not a crash.
    let out = cloude(&s.url, &["run", "-l", "python", "-c", "print(1)"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("503"), "{}", text(&out.stderr));
}

#[test]
fn server_down_is_one_sentence() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = cloude(&url, &["languages"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("cloude: cannot reach the Cloude server at"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_cloude"))
        .args(["run", "-l", "python", "-c", "print(1)"])
        .env("CLOUDE_SERVER", &url)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(
        text(&out.stderr).contains(&url),
        "CLOUDE_SERVER is honoured: {}",
        text(&out.stderr)
    );
}
