//! Shared helpers of the agent's host tests.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloude_agent::executor::{Executor, ExecutorConfig};
use cloude_protocol::{Bytes, FileSpec, RunRequest, PROTOCOL_VERSION};

/// A cgroup v2 directory of our own for one test, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..200 {
            // Stage cgroups are removed by the executor; only ours should be left.
            if let Ok(rd) = fs::read_dir(&self.path) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = fs::write(e.path().join("cgroup.kill"), "1");
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Creates a test cgroup, or returns why that is impossible here.
pub fn test_cgroup(tag: &str) -> Result<TestCgroup, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root (cgroups and uid switching need root)".into());
    }
    let mount = cgroup2_mount().ok_or("no cgroup v2 mount in /proc/self/mountinfo")?;
    let path = mount.join(format!("cloude-agent-test-{}-{tag}", std::process::id()));
    fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let cg = TestCgroup { path };
    let probe = cg.path.join("probe");
    fs::create_dir(&probe).map_err(|e| format!("cannot create a child cgroup: {e}"))?;
    let has_kill = probe.join("cgroup.kill").exists();
    let _ = fs::remove_dir(&probe);
    if !has_kill {
        return Err("cgroup.kill not supported by this kernel".into());
    }
    Ok(cg)
}

/// Returns the test cgroup or prints SKIPPED and returns None.
pub fn cgroup_or_skip(tag: &str) -> Option<TestCgroup> {
    match test_cgroup(tag) {
        Ok(cg) => Some(cg),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// A work root that the unprivileged user can traverse.
pub fn work_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

pub fn executor(work: &Path, cg: &TestCgroup) -> Executor {
    Executor::new(ExecutorConfig::new(
        work.to_path_buf(),
        Some(cg.path.clone()),
    ))
}

pub fn request(run: &[&str]) -> RunRequest {
    RunRequest {
        protocol_version: PROTOCOL_VERSION,
        files: vec![],
        compile: None,
        run: run.iter().map(|s| s.to_string()).collect(),
        args: vec![],
        stdin: Bytes::default(),
        env: vec![],
        compile_timeout_ms: 10_000,
        run_timeout_ms: 10_000,
        output_limit_bytes: 1 << 20,
        memory_limit_mib: None,
        pids_limit: None,
        poweroff_after: false,
        network: false,
        run_as_root: false,
        cpu_limit_ms: None,
        stack_limit_kib: None,
        file_size_limit_kib: None,
        merge_stderr: false,
        tests: vec![],
        tty: None,
    }
}

pub fn sh(script: &str) -> RunRequest {
    request(&["sh", "-c", script])
}

pub fn file(name: &str, content: &str) -> FileSpec {
    FileSpec {
        name: name.into(),
        content: content.into(),
        encoding: Default::default(),
    }
}

/// Whether `pid` is gone (or a zombie waiting for its reaper), polling for up to `within`.
pub fn process_gone(pid: i32, within: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next()))
            .flatten();
        if matches!(state, None | Some('Z') | Some('X')) {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
