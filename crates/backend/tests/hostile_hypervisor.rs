//! A hypervisor that a guest has taken over writes its VM directory as it likes: the server
//! (root) must never follow what it finds there. Here the test plays that hypervisor: while a
//! jailed QEMU boots, it swaps the VM's `console.log` and `qemu.stderr` for a symlink to a root
//! secret, a FIFO, or `/dev/zero`, then kills QEMU, which makes the server quote both files in
//! its answer. The answer comes in bounded time, without the secret, and the server serves on.

use cloude_testkit as support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{children_of, cmdline_args, Server};

/// Kernel build plus the bash image when nothing is cached yet.
const FIRST_START: Duration = Duration::from_secs(3600);

/// The host directory bound at `/vm` in a jailer's command line.
fn vm_dir(jailer: u32) -> Option<PathBuf> {
    let args = cmdline_args(jailer);
    let i = args
        .windows(3)
        .position(|w| w[0] == "--bind-rw" && w[2] == "/vm")?;
    Some(PathBuf::from(&args[i + 1]))
}

fn replace(path: &Path, how: &str, secret: &Path) {
    let _ = std::fs::remove_file(path);
    match how {
        "symlink to a secret" => std::os::unix::fs::symlink(secret, path).expect("symlink"),
        "fifo" => nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o666))
            .expect("mkfifo"),
        "/dev/zero" => std::os::unix::fs::symlink("/dev/zero", path).expect("symlink"),
        other => unreachable!("{other}"),
    }
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn swapped_console_and_stderr_files_are_never_followed() {
    let config = "[vm]\nprebuild = [\"bash\"]\n[snapshot]\nenabled = false\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("server: {e}"));
    let token = format!("cloude-secret-{}", std::process::id());
    let secret_dir = tempfile::tempdir().expect("tmp");
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, format!("{token}\n").repeat(64)).expect("secret");
    for how in ["symlink to a secret", "fifo", "/dev/zero"] {
        let addr = server.addr;
        let req = std::thread::spawn(move || {
            let client = cloude_api::client::Client::with_timeout(
                &format!("http://{addr}"),
                Some(Duration::from_secs(120)),
            );
            client.raw(
                "POST",
                "/v1/executions",
                Some(
                    &serde_json::to_vec(
                        &json!({"language": "bash", "code": "sleep 30", "timeout_ms": 40000}),
                    )
                    .expect("json"),
                ),
            )
        });
        // The jailer and its QEMU, as soon as they exist.
        let t = Instant::now();
        let (dir, qemu) = loop {
            let found = server.children().into_iter().find_map(|j| {
                let hv = *children_of(j).first()?;
                let dir = vm_dir(j)?;
                dir.join("qemu.stderr").exists().then_some((dir, hv))
            });
            if let Some(f) = found {
                break f;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{how}: no VM appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        for name in ["console.log", "qemu.stderr"] {
            replace(&dir.join(name), how, &secret);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qemu as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let t = Instant::now();
        let answer = req
            .join()
            .expect("request thread")
            .expect("the request is answered");
        let took = t.elapsed();
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        eprintln!("{how}: answered {} in {took:?}: {body}", answer.status);
        assert!(
            took < Duration::from_secs(15),
            "{how}: the answer took {took:?}"
        );
        assert!(!body.contains(&token), "{how}: the secret leaked: {body}");
        assert!(body.len() < 64 * 1024, "{how}: {} bytes", body.len());
        // The FIFO must not have stuck a worker: the server still serves.
        let h = server.get("/healthz");
        assert_eq!(h.status, 200, "{how}");
    }
    // And a run still works afterwards.
    let r = server.post(
        "/v1/executions",
        &json!({"language": "bash", "code": "echo fine"}),
    );
    assert_eq!(r.json()["stdout"], "fine\n", "{}", r.text());
}
