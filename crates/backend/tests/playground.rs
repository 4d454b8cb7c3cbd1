//! The page at `/` in a real browser: Debian's Chromium, driven by Selenium (from PyPI, in a venv
//! of its own) through `playground_client/drive.py`, against a real server running programs in
//! real VMs (the QEMU fallback here). The script picks languages, types code, runs it, stops it,
//! shares it, checks the page at 375 px and in the dark scheme; midway it asks this test to kill
//! the server and checks the page says so. Its screenshots are kept in
//! `target/test-artifacts/playground-*.png`.

use cloude_testkit as support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::Server;

const FIRST_START: Duration = Duration::from_secs(3600);
const SELENIUM: &str = "selenium==4.50.0";

fn shots_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&d).expect("artifacts dir");
    d
}

#[test]
#[ignore = "boots VMs and a browser; run with --include-ignored"]
fn the_playground_runs_programs_in_a_real_browser() {
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: `cargo xtask test` installs Debian's chromium and chromium-driver"
        );
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("selenium-venv");
    let python =
        support::python_venv(&venv, "selenium", SELENIUM).unwrap_or_else(|e| panic!("{e}"));
    // Two VMs and no queue: the script fills both to see the page's busy sentence. Judge0 off:
    // its dispatcher takes a VM slot for a moment on every poll of its store.
    let config = "[vm]\nprebuild = [\"python\", \"c\"]\n[limits]\nmax_concurrent_vms = 2\n\
                  max_queue = 0\n[judge0]\nenabled = false\n";
    let s = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("playground: {e}"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/playground_client/drive.py");
    let shots = shots_dir();
    let mut child = Command::new(python)
        .arg(script)
        .arg(&s.url)
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    let mut server = Some(s);
    for line in stdout.lines() {
        let line = line.expect("script output");
        eprintln!("drive.py: {line}");
        if line == "KILL-SERVER" {
            // The hard way: no graceful shutdown, the page's socket just breaks.
            if let Some(s) = server.take() {
                s.kill();
            }
            stdin.write_all(b"killed\n").expect("tell the script");
        }
        lines.push(line);
    }
    let status = child.wait().expect("wait");
    assert!(
        status.success() && lines.last().is_some_and(|l| l == "all ok"),
        "the browser run failed ({status}); see drive.py's lines above"
    );
    assert!(
        server.is_none(),
        "the script never reached the server-killed step"
    );
    for shot in [
        "playground-example.png",
        "playground-compile-error.png",
        "playground-375px.png",
        "playground-dark.png",
        "playground-server-gone.png",
    ] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot}: {len} bytes");
    }
}
