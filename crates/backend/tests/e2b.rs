//! The E2B-compatible face with E2B's published SDKs used unchanged: the Python `e2b` from PyPI
//! (in a venv of its own) and the JavaScript `e2b` from npm, pointed at this server by
//! `E2B_API_URL`/`E2B_SANDBOX_URL`. Real VMs on the QEMU fallback. The Python script
//! (`e2b_client/run.py`) drives every behaviour the issue names (streamed output, exit errors,
//! envs, files, state, background processes, connect, list and its filters, isolation between
//! sandboxes and between API keys, kill, timeouts); `e2b_client/interpreter.py` the code
//! interpreter (`e2b-code-interpreter`: results, state, stdout/stderr, errors, contexts);
//! afterwards no VM may be left.

use cloude_testkit as support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::Server;

const FIRST_START: Duration = Duration::from_secs(3600);
/// The pinned SDKs (what the issue was written against).
const PYTHON_SDKS: &str = "e2b==2.63.0 e2b-code-interpreter==2.11.5";
const KEY_A: &str = "test-key-a-0123456789";
const KEY_B: &str = "test-key-b-9876543210";

fn server() -> Server {
    let config = format!(
        "[vm]\nprebuild = [\"python\", \"python-data\"]\n[limits]\nmax_concurrent_vms = 3\n[auth]\nkeys = [\"{KEY_A}\", \"{KEY_B}\"]\n"
    );
    Server::start(&["--hypervisor", "qemu"], Some(&config), FIRST_START)
        .unwrap_or_else(|e| panic!("e2b: {e}"))
}

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2b-sdk-venv");
    support::python_venv(&venv, "e2b_code_interpreter", PYTHON_SDKS)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b_client")
}

fn wait_no_vms(s: &Server) {
    let t = Instant::now();
    while !s.children().is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.children().is_empty(), "VMs left: {:?}", s.children());
}

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn e2bs_python_and_javascript_sdks_unchanged() {
    let s = server();
    let base = format!("{}/e2b", s.url);

    let out = Command::new(python())
        .arg(scripts().join("run.py"))
        .args([&base, KEY_A, KEY_B])
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "the E2B Python SDK failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_no_vms(&s);

    let out = Command::new(python())
        .arg(scripts().join("interpreter.py"))
        .args([&base, KEY_A])
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "the E2B code interpreter SDK failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_no_vms(&s);

    // Without a key, or with a wrong one: 401 in E2B's error shape.
    let r = support::http(s.addr, "GET", "/e2b/v2/sandboxes", None);
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 401, "{body}");
    assert!(body.contains("\"code\":401"), "{body}");

    if !have("node") || !have("npm") {
        eprintln!("e2b: SKIPPED: the JavaScript SDK (node/npm not installed)");
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2b-js");
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["package.json", "run.mjs"] {
        std::fs::copy(scripts().join(f), dir.join(f)).expect("copy");
    }
    if !dir.join("node_modules/e2b/package.json").is_file() {
        let st = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status()
            .expect("npm");
        assert!(
            st.success(),
            "npm install e2b failed (is the registry reachable?)"
        );
    }
    let out = Command::new("node")
        .arg("run.mjs")
        .args([&base, KEY_A])
        .current_dir(&dir)
        .output()
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "the E2B JavaScript SDK failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_no_vms(&s);
}
