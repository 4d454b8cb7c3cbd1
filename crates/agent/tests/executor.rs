//! Executor tests on the host: real processes, a real cgroup v2 child, uid 1000.

mod common;

use std::time::Duration;

use cloude_agent::executor::ExecError;
use cloude_protocol::{Encoding, FileSpec, StageStatus};
use common::*;

macro_rules! setup {
    ($tag:expr) => {{
        let Some(cg) = cgroup_or_skip($tag) else {
            return;
        };
        let work = work_root();
        let ex = executor(work.path(), &cg);
        (cg, work, ex)
    }};
}

#[tokio::test]
async fn stdout_stderr_and_exit_code() {
    let (_cg, work, ex) = setup!("streams");
    let r = ex
        .run(&sh("echo out; echo err >&2; exit 3"), None)
        .await
        .expect("run");
    let run = r.run.expect("run stage");
    assert_eq!(run.stdout.0, b"out\n");
    assert_eq!(run.stderr.0, b"err\n");
    assert_eq!(run.exit_code, Some(3));
    assert_eq!(run.signal, None);
    assert_eq!(run.status, StageStatus::Ok);
    assert!(r.compile.is_none());
    assert_eq!(
        std::fs::read_dir(work.path()).expect("ls").count(),
        0,
        "work dir removed"
    );
}

#[tokio::test]
async fn runs_unprivileged_in_its_work_dir() {
    let (_cg, _work, ex) = setup!("user");
    let mut req = sh("id -u; id -g; pwd; echo $HOME; cat hello.txt; ls -ld . | cut -c1-4");
    req.files.push(file("hello.txt", "hi\n"));
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    let out = String::from_utf8(run.stdout.0).expect("utf8");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert_eq!(lines[1], "1000", "{out}");
    assert_eq!(lines[2], lines[3], "HOME is the work dir: {out}");
    assert_eq!(lines[4], "hi");
    assert_eq!(lines[5], "drwx");
}

#[tokio::test]
async fn run_as_root_when_asked() {
    let (_cg, _work, ex) = setup!("root");
    let mut req = sh("id -u; ls -ld . | awk '{print $3}'");
    req.run_as_root = true;
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(String::from_utf8_lossy(&run.stdout.0), "0\nroot\n");
}

/// Offline programs get a network namespace with only loopback (up) when the machine has other
/// interfaces; `network: true` leaves them in the machine's. `/proc/net/dev` is per namespace.
#[tokio::test]
async fn offline_programs_see_only_loopback() {
    let (_cg, _work, ex) = setup!("netns");
    if !cloude_agent::sys::has_external_interface() {
        eprintln!("SKIPPED: this machine has no network interface besides loopback");
        return;
    }
    let script = r#"tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' '; echo; (exec 3<>/dev/tcp/127.0.0.1/1) 2>&1 | grep -o refused"#;
    let run = |network: bool| {
        let mut r = request(&["bash", "-c", script]);
        r.network = network;
        let ex = &ex;
        async move {
            let run = ex.run(&r, None).await.expect("run").run.expect("run stage");
            String::from_utf8_lossy(&run.stdout.0).into_owned()
        }
    };
    let out = run(false).await;
    assert!(out.starts_with("lo \n"), "offline: {out:?}");
    assert!(
        out.contains("refused"),
        "loopback is up (connection refused, not unreachable): {out:?}"
    );
    let out = run(true).await;
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.split(' ').filter(|n| !n.is_empty()).count() > 1,
        "networked: {out:?}"
    );
}

#[tokio::test]
async fn signal_of_its_own_is_ok() {
    let (_cg, _work, ex) = setup!("signal");
    let run = ex
        .run(&sh("kill -SEGV $$"), None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.signal, Some(libc::SIGSEGV));
    assert_eq!(run.exit_code, None);
    assert_eq!(run.status, StageStatus::Ok);
}

#[tokio::test]
async fn timeout_kills_the_tree_including_setsid_escapees() {
    let (_cg, _work, ex) = setup!("timeout");
    // One child escapes into its own session, another double-forks; both print their pid.
    let mut req = sh("setsid sh -c 'echo $$; exec sleep 1000' & \
                      (sh -c 'echo $$; exec sleep 1000' &) ; sleep 1000");
    req.run_timeout_ms = 1000;
    let started = std::time::Instant::now();
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(run.status, StageStatus::Timeout);
    assert_eq!(run.signal, Some(libc::SIGKILL));
    assert!(
        run.wall_ms >= 1000 && run.wall_ms < 5000,
        "wall {}",
        run.wall_ms
    );
    let pids: Vec<i32> = String::from_utf8_lossy(&run.stdout.0)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "both escapees reported: {:?}", run.stdout);
    for pid in pids {
        assert!(
            process_gone(pid, Duration::from_secs(3)),
            "escapee {pid} survived"
        );
    }
}

#[tokio::test]
async fn output_cap_stops_a_program_printing_forever() {
    let (_cg, _work, ex) = setup!("cap");
    let mut req = request(&["yes", "spam"]);
    req.output_limit_bytes = 100_000;
    req.run_timeout_ms = 20_000;
    let started = std::time::Instant::now();
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.status, StageStatus::OutputLimit);
    assert_eq!(run.stdout.0.len(), 100_000);
    assert!(run.stdout.0.starts_with(b"spam\nspam\n"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cap_is_shared_by_stdout_and_stderr() {
    let (_cg, _work, ex) = setup!("capshared");
    let mut req = sh("head -c 600 /dev/zero; head -c 600 /dev/zero >&2");
    req.output_limit_bytes = 1000;
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.status, StageStatus::OutputLimit);
    assert_eq!(run.stdout.0.len() + run.stderr.0.len(), 1000);
}

#[tokio::test]
async fn binary_output_and_binary_files() {
    let (_cg, _work, ex) = setup!("binary");
    let all: Vec<u8> = (0..=255u8).collect();
    let mut req = request(&["cat", "data.bin"]);
    req.files.push(FileSpec {
        name: "data.bin".into(),
        content: base64_encode(&all),
        encoding: Encoding::Base64,
    });
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.stdout.0, all);
    let py = request(&[
        "python3",
        "-c",
        "import sys; sys.stdout.buffer.write(bytes(range(256))[::-1])",
    ]);
    let run = ex
        .run(&py, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    let mut rev = all.clone();
    rev.reverse();
    assert_eq!(run.stdout.0, rev, "stderr: {:?}", run.stderr);
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[tokio::test]
async fn stdin_is_delivered() {
    let (_cg, _work, ex) = setup!("stdin");
    let mut req = request(&["cat"]);
    req.stdin = b"hello\0world\n".to_vec().into();
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.stdout.0, b"hello\0world\n");
    // Larger than a pipe buffer: stdin and stdout must flow concurrently.
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let mut req = request(&["cat"]);
    req.stdin = big.clone().into();
    req.output_limit_bytes = 2 << 20;
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.status, StageStatus::Ok);
    assert_eq!(run.stdout.0, big);
}

#[tokio::test]
async fn bad_file_names_are_rejected_before_running() {
    let (_cg, work, ex) = setup!("names");
    for bad in ["../escape", "/etc/x", "a/../../b", "tab\there", ""] {
        let mut req = sh("echo should-not-run");
        req.files.push(file(bad, "x"));
        let err = ex.run(&req, None).await.expect_err(bad);
        assert!(matches!(err, ExecError::Invalid(_)), "{bad:?}: {err}");
        assert!(err.is_client_error());
    }
    assert_eq!(std::fs::read_dir(work.path()).expect("ls").count(), 0);
}

#[tokio::test]
async fn compile_then_run_and_compile_failure() {
    let (_cg, _work, ex) = setup!("compile");
    let mut req = request(&["sh", "prog.sh"]);
    req.files.push(file("src.txt", "echo built"));
    req.compile = Some(vec![
        "sh".into(),
        "-c".into(),
        "cp src.txt prog.sh; echo compiling".into(),
    ]);
    req.args = vec!["ignored-arg".into()];
    let r = ex.run(&req, None).await.expect("run");
    let c = r.compile.expect("compile stage");
    assert_eq!(c.stdout.0, b"compiling\n");
    assert_eq!(c.exit_code, Some(0));
    assert_eq!(r.run.expect("run stage").stdout.0, b"built\n");

    req.compile = Some(vec![
        "sh".into(),
        "-c".into(),
        "echo nope >&2; exit 2".into(),
    ]);
    let r = ex.run(&req, None).await.expect("run");
    let c = r.compile.expect("compile stage");
    assert_eq!(c.exit_code, Some(2));
    assert_eq!(c.stderr.0, b"nope\n");
    assert!(r.run.is_none(), "no run after a failed compile");
}

#[tokio::test]
async fn args_env_and_missing_program() {
    let (_cg, _work, ex) = setup!("args");
    let mut req = request(&["sh", "-c", "echo \"$1 $2 $GREETING\"", "argv0"]);
    req.args = vec!["a b".into(), "c".into()];
    req.env = vec![("GREETING".into(), "hello".into())];
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.stdout.0, b"a b c hello\n");

    let run = ex
        .run(&request(&["definitely-not-a-program-xyz"]), None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.status, StageStatus::Error);
    assert!(run
        .message
        .expect("message")
        .contains("definitely-not-a-program-xyz"));
}

#[tokio::test]
async fn cpu_time_is_measured() {
    let (_cg, _work, ex) = setup!("cpu");
    let req = sh("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done");
    let run = ex
        .run(&req, None)
        .await
        .expect("run")
        .run
        .expect("run stage");
    assert_eq!(run.status, StageStatus::Ok);
    assert!(run.cpu_ms > 20, "cpu_ms {}", run.cpu_ms);
    assert!(
        run.wall_ms >= run.cpu_ms / 2,
        "wall {} cpu {}",
        run.wall_ms,
        run.cpu_ms
    );
}

#[tokio::test]
async fn fork_bomb_and_memory_hog_when_controllers_exist() {
    let (cg, _work, ex) = setup!("limits");
    let ctl = std::fs::read_to_string(cg.path.join("cgroup.controllers")).unwrap_or_default();
    if ctl.split_whitespace().any(|c| c == "pids") {
        let mut req = sh("bomb() { bomb | bomb & }; bomb; sleep 2; echo alive");
        req.pids_limit = Some(32);
        req.run_timeout_ms = 5000;
        let run = ex
            .run(&req, None)
            .await
            .expect("run")
            .run
            .expect("run stage");
        assert!(
            matches!(run.status, StageStatus::Ok | StageStatus::Timeout),
            "{run:?}"
        );
    } else {
        eprintln!(
            "SKIPPED: pids controller not available in {} (hybrid cgroup host)",
            cg.path.display()
        );
    }
    if ctl.split_whitespace().any(|c| c == "memory") {
        let mut req = request(&["python3", "-c", "x = bytearray(512 << 20); print(len(x))"]);
        req.memory_limit_mib = Some(64);
        let run = ex
            .run(&req, None)
            .await
            .expect("run")
            .run
            .expect("run stage");
        assert_eq!(run.status, StageStatus::MemoryLimit, "{run:?}");
    } else {
        eprintln!(
            "SKIPPED: memory controller not available in {} (hybrid cgroup host)",
            cg.path.display()
        );
    }
}
