//! The agent as PID 1 of a real VM: QEMU `-M microvm` (software emulation) with the project's
//! guest kernel and a cached image, the current agent overlaid as `/init`, reached over the
//! virtio-serial port `cloude.agent` (the QEMU fallback's channel).
//!
//! Needs `qemu-system-x86_64`, `lz4`, a guest kernel under `$CLOUDE_HOME/kernels/guest-*/` and
//! a bash image under `$CLOUDE_HOME/images/` (prints SKIPPED otherwise). About 30 s of TCG:
//! run with `cargo test -p cloude-agent --test qemu_vm -- --ignored`.

mod common;

use std::fs;
use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloude_protocol::{Health, RunRequest, RunResponse, StageResult, StageStatus};
use common::*;

fn cloude_home() -> PathBuf {
    std::env::var_os("CLOUDE_HOME").map_or_else(|| PathBuf::from("/var/lib/cloude"), PathBuf::from)
}

fn find(dir: &Path, pred: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    v.sort();
    v.pop()
}

/// One newc cpio archive holding `/init` (written by the project's one newc writer).
fn init_cpio(agent: &[u8]) -> Vec<u8> {
    let mut w = cloude_image::image::cpio::Writer::new(Vec::new());
    w.bytes("init", 0o755, agent).expect("init");
    w.finish(4).expect("finish")
}

struct Vm {
    qemu: Child,
    conn: UnixStream,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Vm {
    /// One request on the agent's virtio-serial connection (the API crate's one HTTP client).
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let a = cloude_api::client::exchange(&mut self.conn, method, path, Some(body))
            .expect("agent answer");
        (a.status, a.body)
    }

    fn run(&mut self, req: &RunRequest) -> StageResult {
        self.run_all(req).run.expect("run stage")
    }

    fn run_all(&mut self, req: &RunRequest) -> RunResponse {
        let (st, body) = self.request("POST", "/v1/run", &serde_json::to_vec(req).expect("json"));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("response")
    }
}

fn bash(script: &str) -> RunRequest {
    request(&["bash", "-c", script])
}

#[test]
#[ignore = "boots a QEMU VM (~30 s of TCG); run with --ignored"]
fn agent_as_pid1_in_qemu_microvm() {
    let home = cloude_home();
    let kernel =
        find(&home.join("kernels"), |n| n.starts_with("guest-")).map(|d| d.join("bzImage"));
    let image = find(&home.join("images"), |n| {
        n.starts_with("bash-") && n.ends_with(".cpio.lz4")
    });
    let tools = ["qemu-system-x86_64", "lz4"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    let (Some(kernel), Some(image), true) = (kernel.filter(|k| k.exists()), image, tools) else {
        eprintln!(
            "SKIPPED: needs qemu-system-x86_64, lz4, a guest kernel and a bash image in {}",
            home.display()
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let base = Command::new("lz4")
        .arg("-dc")
        .arg(&image)
        .output()
        .expect("lz4");
    assert!(base.status.success());
    let agent = fs::read(env!("CARGO_BIN_EXE_cloude-agent")).expect("agent binary");
    let mut initrd = base.stdout;
    initrd.extend_from_slice(&init_cpio(&agent));
    fs::write(dir.path().join("initrd"), initrd).expect("initrd");
    let sock = dir.path().join("agent.sock");
    let console = fs::File::create(dir.path().join("console.log")).expect("console");
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off",
            "-m",
            "512",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(dir.path().join("initrd"))
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet",
            "-device",
            "virtio-serial-device",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-device", "virtserialport,chardev=agent,name=cloude.agent"])
        .stdin(Stdio::null())
        .stdout(console.try_clone().expect("clone"))
        .stderr(console)
        .spawn()
        .expect("qemu");
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("no agent socket: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut vm = Vm { qemu, conn: stream };
    // Byte by byte: nothing past the line may be taken from the connection.
    let mut ready = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        vm.conn.read_exact(&mut b).expect("ready line");
        ready.push(b[0]);
    }
    let ready = String::from_utf8(ready).expect("ready line is text");
    assert_eq!(
        cloude_protocol::parse_ready_line(&ready),
        Some(cloude_protocol::PROTOCOL_VERSION)
    );
    eprintln!("ready after {:?}", start.elapsed());

    let (st, body) = vm.request("GET", "/v1/health", b"");
    assert_eq!(st, 200);
    let _: Health = serde_json::from_slice(&body).expect("health");

    let r = vm.run(&bash("id -u; cat /proc/self/cgroup; whoami"));
    assert_eq!(
        String::from_utf8_lossy(&r.stdout.0)
            .lines()
            .collect::<Vec<_>>()[0],
        "1000"
    );
    assert!(
        String::from_utf8_lossy(&r.stdout.0).contains("0::/job-"),
        "{:?}",
        r.stdout
    );

    let mut req = request(&["cat"]);
    req.stdin = b"in\0put".to_vec().into();
    assert_eq!(vm.run(&req).stdout.0, b"in\0put");

    // Processes of the unprivileged user (kernel threads come and go; they are not counted).
    let count = "n=0; for d in /proc/[0-9]*; do [ -O \"$d\" ] && n=$((n+1)); done; echo $n";
    let before = vm.run(&bash(count)).stdout.0;
    assert_ne!(before, b"0\n", "the counting shell itself must be counted");
    let mut req = bash("(sleep 1000 &) ; sleep 1000 & sleep 1000");
    req.run_timeout_ms = 1000;
    assert_eq!(vm.run(&req).status, StageStatus::Timeout);
    assert_eq!(
        vm.run(&bash(count)).stdout.0,
        before,
        "no process survived the timeout"
    );

    let mut req = bash("bomb() { bomb | bomb & }; bomb; sleep 2");
    req.pids_limit = Some(32);
    req.run_timeout_ms = 4000;
    let r = vm.run(&req);
    assert!(
        matches!(r.status, StageStatus::Timeout | StageStatus::Ok),
        "{r:?}"
    );
    assert_eq!(
        vm.run(&bash(count)).stdout.0,
        before,
        "fork bomb fully removed"
    );

    let mut req = bash("head -c 200000000 /dev/zero > big; echo wrote");
    req.memory_limit_mib = Some(64);
    req.run_timeout_ms = 20_000;
    assert_eq!(vm.run(&req).status, StageStatus::MemoryLimit);

    let mut req = request(&["yes"]);
    req.output_limit_bytes = 1000;
    let r = vm.run(&req);
    assert_eq!(
        (r.status, r.stdout.0.len()),
        (StageStatus::OutputLimit, 1000)
    );

    cpu_limits_and_rlimits(&mut vm);
    test_cases_start_clean(&mut vm);

    let mut req = bash("echo bye");
    req.poweroff_after = true;
    assert_eq!(vm.run(&req).stdout.0, b"bye\n");
    let off = Instant::now();
    while off.elapsed() < Duration::from_secs(15) {
        if let Some(st) = vm.qemu.try_wait().expect("wait") {
            eprintln!("VM gone {:?} after the last response ({st})", off.elapsed());
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
    panic!("the VM did not power off; console:\n{log}");
}

/// The CPU-time limit counts every process of the stage (guest cgroup v2 `cpu.stat`), apart from
/// the wall-clock timeout; stack and file-size limits reach the program; stderr can share
/// stdout's pipe.
fn cpu_limits_and_rlimits(vm: &mut Vm) {
    let mut req = bash("while :; do :; done");
    req.cpu_limit_ms = Some(1000);
    req.run_timeout_ms = 30_000;
    let r = vm.run(&req);
    eprintln!("busy loop under a 1 s CPU limit: {r:?}");
    assert_eq!(r.status, StageStatus::CpuLimit, "{r:?}");
    assert!((1000..1500).contains(&r.cpu_ms), "{r:?}");
    assert!(
        r.wall_ms < 10_000,
        "stopped long before the wall-clock timeout: {r:?}"
    );
    assert_eq!(
        r.message.as_deref(),
        Some(cloude_protocol::cpu_limit_message(1000).as_str())
    );

    // Two busy children share one budget.
    let mut req = bash("for i in 1 2; do (while :; do :; done) & done; wait");
    req.cpu_limit_ms = Some(800);
    req.run_timeout_ms = 30_000;
    let r = vm.run(&req);
    assert_eq!(r.status, StageStatus::CpuLimit, "{r:?}");
    assert!((800..1400).contains(&r.cpu_ms), "{r:?}");

    // Sleeping costs no CPU time: the CPU limit does not stop it.
    let mut req = bash("sleep 2; echo slept");
    req.cpu_limit_ms = Some(300);
    let r = vm.run(&req);
    assert_eq!(
        (r.status, r.stdout.0.as_slice()),
        (StageStatus::Ok, &b"slept\n"[..]),
        "{r:?}"
    );

    let mut req =
        bash("ulimit -s; ulimit -f; head -c 300000 /dev/zero > big || exit $?; echo never");
    req.stack_limit_kib = Some(4096);
    req.file_size_limit_kib = Some(100);
    let r = vm.run(&req);
    assert_eq!(r.stdout.0, b"4096\n100\n", "{r:?}");
    assert_eq!(r.exit_code, Some(128 + 25), "head died of SIGXFSZ: {r:?}");

    let mut req = bash("echo one; echo two >&2; echo three; echo four >&2");
    req.merge_stderr = true;
    let r = vm.run(&req);
    assert_eq!(r.stdout.0, b"one\ntwo\nthree\nfour\n", "{r:?}");
    assert!(r.stderr.0.is_empty(), "{r:?}");
}

/// Test cases: one compile, then each case in a fresh copy of the compiled directory at the
/// same path, with its own stdin and cgroup, and nothing of the last case left in /tmp.
fn test_cases_start_clean(vm: &mut Vm) {
    let mut req = request(&["bash", "prog.sh"]);
    req.files.push(file(
        "src.sh",
        "read x; echo $((x * 2)); pwd; ls; cat /proc/self/cgroup; \
         [ -e /tmp/leftover ] && echo tmp-dirty; \
         echo dirty > scratch; touch /tmp/leftover; [ \"$x\" = 3 ] && exit 4; true",
    ));
    req.compile = Some(vec![
        "bash".into(),
        "-c".into(),
        "cp src.sh prog.sh; echo compiled >> compile.log".into(),
    ]);
    req.tests = (1..=3)
        .map(|i| cloude_protocol::TestInput {
            stdin: format!("{i}\n").into_bytes().into(),
        })
        .collect();
    let r = vm.run_all(&req);
    assert!(r.run.is_none(), "{r:?}");
    assert_eq!(
        r.compile.as_ref().and_then(|c| c.exit_code),
        Some(0),
        "{r:?}"
    );
    assert_eq!(r.tests.len(), 3, "{r:?}");
    let mut dirs = Vec::new();
    let mut groups = Vec::new();
    for (i, t) in r.tests.iter().enumerate() {
        let out = String::from_utf8_lossy(&t.stdout.0).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], ((i + 1) * 2).to_string(), "{out}");
        dirs.push(lines[1].to_string());
        // The compiled files, nothing a previous case wrote.
        assert_eq!(&lines[2..5], ["compile.log", "prog.sh", "src.sh"], "{out}");
        groups.push(lines[5].to_string());
        assert!(
            !out.contains("tmp-dirty"),
            "case {i} saw /tmp of another: {out}"
        );
        assert_eq!(t.exit_code, Some(if i == 2 { 4 } else { 0 }), "{t:?}");
    }
    assert!(
        dirs.iter().all(|d| *d == dirs[0]),
        "one path for every case: {dirs:?}"
    );
    groups.sort();
    groups.dedup();
    assert_eq!(groups.len(), 3, "a cgroup per case: {groups:?}");

    // A compile failure runs no case.
    req.compile = Some(vec!["bash".into(), "-c".into(), "exit 1".into()]);
    let r = vm.run_all(&req);
    assert!(r.tests.is_empty() && r.run.is_none(), "{r:?}");
}
