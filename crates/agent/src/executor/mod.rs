//! Runs a [`RunRequest`]: a fresh work directory, an optional compile stage, then the run stage.
//! Usable on the host (tests) as well as in the guest.

mod stage;
mod workdir;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloude_protocol::sandbox::{ExecRequest, SandboxUser, SANDBOX_HOME, SANDBOX_USER};
use cloude_protocol::{
    ProtocolError, RunRequest, RunResponse, Stage, StageResult, StageStatus, StreamEvent,
    MAX_OUTPUT_LIMIT_BYTES,
};
use tokio::sync::mpsc;

pub use stage::{error_result, Control, Controls, StdinChunk};
pub use workdir::{WorkDir, WorkDirError};

use crate::cgroup::Limits;
use crate::sys::Rlimits;
pub use stage::{run_stage, StageSpec, Stdin};

/// Search path given to programs unless the request sets its own `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Tasks allowed in a stage's cgroup unless the request asks for fewer or more.
pub const DEFAULT_PIDS_LIMIT: u64 = 128;
/// Memory kept out of the program's reach for the kernel and the agent, in MiB (plus 10 %).
pub const MEMORY_RESERVE_MIB: u64 = 32;
/// Smallest memory limit the agent derives from the VM's memory, in MiB.
pub const MIN_MEMORY_LIMIT_MIB: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Invalid(#[from] ProtocolError),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(transparent)]
    WorkDir(#[from] WorkDirError),
    #[error("an interactive run has no test cases")]
    Interactive,
    #[error("cannot prepare the sandbox home {0}: {1}")]
    Home(String, std::io::Error),
}

impl ExecError {
    /// True when the request itself is at fault (HTTP 400), false for agent-side failures.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            ExecError::WorkDir(WorkDirError::Io(..)) | ExecError::Home(..)
        )
    }
}

/// Where and as whom programs run.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Parent of the per-request work directories.
    pub work_root: PathBuf,
    /// cgroup v2 directory under which each stage gets a child; `None` runs without one
    /// (no limits, and only the session is killed at timeout).
    pub cgroup_root: Option<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    /// Memory limit when the request sets none (requests may only ask for less).
    pub memory_limit_mib: Option<u64>,
    pub pids_limit: u64,
    /// Shared scratch directories (the guest's `/tmp` and `/dev/shm`) emptied of what the
    /// program's user left there between two test cases, so that no case sees another's
    /// files. Empty on the host, where those directories are not ours.
    pub scratch_dirs: Vec<PathBuf>,
    /// The sandbox user's home ([`SANDBOX_HOME`] in the guest; a temp directory in tests).
    pub sandbox_home: PathBuf,
}

impl ExecutorConfig {
    /// Defaults for `work_root` and `cgroup_root`: uid/gid 1000, memory from `/proc/meminfo`.
    pub fn new(work_root: PathBuf, cgroup_root: Option<PathBuf>) -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        ExecutorConfig {
            work_root,
            cgroup_root,
            uid: 1000,
            gid: 1000,
            memory_limit_mib: default_memory_limit_mib(&meminfo),
            pids_limit: DEFAULT_PIDS_LIMIT,
            scratch_dirs: Vec::new(),
            sandbox_home: PathBuf::from(SANDBOX_HOME),
        }
    }
}

/// A memory limit below the machine's available memory, from the text of `/proc/meminfo`.
pub fn default_memory_limit_mib(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let kib = field("MemAvailable").or_else(|| field("MemTotal"))?;
    let mib = kib / 1024;
    let reserve = MEMORY_RESERVE_MIB + mib / 10;
    Some(mib.saturating_sub(reserve).max(MIN_MEMORY_LIMIT_MIB))
}

/// Runs requests; see [`Executor::run`].
#[derive(Debug)]
pub struct Executor {
    cfg: ExecutorConfig,
    seq: AtomicU64,
}

impl Executor {
    pub fn new(cfg: ExecutorConfig) -> Self {
        Executor {
            cfg,
            seq: AtomicU64::new(0),
        }
    }

    /// The program user's uid and gid (the sandbox user's too).
    pub fn program_ids(&self) -> (u32, u32) {
        (self.cfg.uid, self.cfg.gid)
    }

    /// Validates `req`, writes its files, compiles (if asked) and runs it. With `sink`, output
    /// chunks are sent as they arrive (they are also in the returned result).
    pub async fn run(
        &self,
        req: &RunRequest,
        sink: Option<mpsc::Sender<StreamEvent>>,
    ) -> Result<RunResponse, ExecError> {
        self.run_with(req, sink, None).await
    }

    /// [`Executor::run`] for an interactive run: the run stage's standard input and every
    /// stage's signals come from `controls` (test cases are refused), and each stage's start
    /// and end are sent to `sink`.
    pub async fn run_with(
        &self,
        req: &RunRequest,
        sink: Option<mpsc::Sender<StreamEvent>>,
        controls: Option<Arc<Controls>>,
    ) -> Result<RunResponse, ExecError> {
        req.validate()?;
        if controls.is_some() && !req.tests.is_empty() {
            return Err(ExecError::Interactive);
        }
        if req.memory_limit_mib == Some(0) {
            return Err(ExecError::Zero("memory_limit_mib"));
        }
        if req.pids_limit == Some(0) {
            return Err(ExecError::Zero("pids_limit"));
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let job = format!("job-{}-{n}", std::process::id());
        let cfg = &self.cfg;
        let (uid, gid) = if req.run_as_root {
            (0, 0)
        } else {
            (cfg.uid, cfg.gid)
        };
        // Offline runs get a namespace of their own only where there is something to hide: a VM
        // without a network device (the vsock transport) has nothing but loopback anyway.
        let new_netns = !req.network && crate::sys::has_external_interface();
        let mut wd = WorkDir::create(&cfg.work_root, &job, &req.files, uid, gid)?;
        let memory_mib = match (req.memory_limit_mib, cfg.memory_limit_mib) {
            (Some(r), Some(d)) => Some(r.min(d)),
            (r, d) => r.or(d),
        };
        let limits = Limits {
            memory_bytes: memory_mib.map(|m| m.saturating_mul(1 << 20)),
            pids: Some(req.pids_limit.unwrap_or(cfg.pids_limit)),
        };
        let mut env = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            stage::home_env(wd.path()),
            ("TMPDIR".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("USER".into(), SANDBOX_USER.into()),
            ("LOGNAME".into(), SANDBOX_USER.into()),
        ];
        env.extend(req.env.iter().cloned());
        let cwd = wd.path().to_path_buf();
        // The run stage's own limits (a compiler gets only the wall-clock timeout).
        let run_rlimits = Rlimits {
            stack_bytes: req.stack_limit_kib.map(|k| k.saturating_mul(1024)),
            file_size_bytes: req.file_size_limit_kib.map(|k| k.saturating_mul(1024)),
            cpu_seconds: req.cpu_limit_ms.map(|ms| ms.div_ceil(1000) + 1),
        };
        let spec = |stage: Stage, argv: Vec<String>, stdin: Vec<u8>, timeout_ms: u64| {
            let run = stage == Stage::Run;
            StageSpec {
                stage,
                argv,
                stdin: match (&controls, run) {
                    (Some(c), true) => Stdin::Live(c.clone()),
                    _ => Stdin::Bytes(Arc::new(stdin)),
                },
                env: env.clone(),
                cwd: cwd.clone(),
                timeout: Duration::from_millis(timeout_ms),
                output_limit: req.output_limit_bytes.min(MAX_OUTPUT_LIMIT_BYTES),
                limits,
                cgroup_root: cfg.cgroup_root.clone(),
                cgroup_name: format!("{job}-{}", if run { "run" } else { "compile" }),
                uid,
                gid,
                new_netns,
                cpu_limit: req.cpu_limit_ms.filter(|_| run).map(Duration::from_millis),
                rlimits: if run { run_rlimits } else { Rlimits::default() },
                merge_stderr: run && req.merge_stderr,
                sink: sink.clone(),
                keep_background: false,
                controls: controls.clone(),
                tty: req.tty.filter(|_| run && controls.is_some()),
            }
        };

        let mut response = RunResponse {
            compile: None,
            run: None,
            tests: Vec::new(),
        };
        if let Some(argv) = &req.compile {
            if argv.is_empty() || argv[0].is_empty() {
                response.compile = Some(error_result("the compile command is empty".into()));
                return Ok(response);
            }
            let r = run_stage(spec(
                Stage::Compile,
                argv.clone(),
                Vec::new(),
                req.compile_timeout_ms,
            ))
            .await;
            let failed = r.status != StageStatus::Ok || r.exit_code != Some(0);
            response.compile = Some(r);
            if failed {
                return Ok(response);
            }
        }
        let argv: Vec<String> = req.run.iter().chain(&req.args).cloned().collect();
        if req.tests.is_empty() {
            let r = run_stage(spec(
                Stage::Run,
                argv,
                req.stdin.0.clone(),
                req.run_timeout_ms,
            ))
            .await;
            response.run = Some(r);
            drop(wd);
            return Ok(response);
        }
        // Test cases: each starts from the compiled directory as it is now, in a fresh copy at
        // the same path (compilers may have recorded it), with a cgroup of its own.
        wd.freeze()?;
        for (i, case) in req.tests.iter().enumerate() {
            if let Err(e) = wd.fresh_copy() {
                let why = std::error::Error::source(&e)
                    .map(|s| format!("{e}: {s}"))
                    .unwrap_or_else(|| e.to_string());
                response.tests.push(error_result(why));
                continue;
            }
            let mut s = spec(
                Stage::Run,
                argv.clone(),
                case.stdin.0.clone(),
                req.run_timeout_ms,
            );
            s.cgroup_name = format!("{job}-test{i}");
            s.output_limit = req.test_output_limit();
            // Streams carry the plain run's output only.
            s.sink = None;
            response.tests.push(run_stage(s).await);
            wd.clear();
            if uid != 0 {
                for dir in &cfg.scratch_dirs {
                    workdir::remove_owned_entries(dir, uid);
                }
            }
        }
        drop(wd);
        Ok(response)
    }
}

impl Executor {
    /// Runs one sandbox command (`POST /v1/exec`): in `cwd` (default [`SANDBOX_HOME`], made
    /// and handed to the sandbox user on first use), as the sandbox user or root, in a cgroup
    /// of its own with the default memory and task limits, killed whole at its timeout or
    /// output cap. What it leaves running in the background keeps running.
    pub async fn exec(&self, req: &ExecRequest) -> Result<StageResult, ExecError> {
        Ok(run_stage(self.exec_spec(req)?).await)
    }

    /// The stage of a sandbox command (see [`Executor::exec`]); sandbox processes
    /// (`crate::procs`) start from it too.
    pub fn exec_spec(&self, req: &ExecRequest) -> Result<StageSpec, ExecError> {
        req.validate()?;
        let cfg = &self.cfg;
        let home = cfg.sandbox_home.clone();
        ensure_home(&home, cfg.uid, cfg.gid)
            .map_err(|e| ExecError::Home(home.display().to_string(), e))?;
        let (uid, gid, user, user_home) = match req.user {
            SandboxUser::Root => (0, 0, "root", PathBuf::from("/root")),
            SandboxUser::User => (cfg.uid, cfg.gid, SANDBOX_USER, home.clone()),
        };
        let cwd = req.cwd.as_ref().map_or(home, PathBuf::from);
        let mut env = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            stage::home_env(&user_home),
            ("TMPDIR".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("USER".into(), user.into()),
            ("LOGNAME".into(), user.into()),
            ("SHELL".into(), "/bin/bash".into()),
        ];
        for (k, v) in &req.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let spec = StageSpec {
            stage: Stage::Run,
            argv: req.argv.clone(),
            stdin: Stdin::Bytes(Arc::new(req.stdin.0.clone())),
            env,
            cwd,
            timeout: Duration::from_millis(req.timeout_ms),
            output_limit: req.output_limit_bytes.min(MAX_OUTPUT_LIMIT_BYTES),
            limits: Limits {
                memory_bytes: cfg.memory_limit_mib.map(|m| m.saturating_mul(1 << 20)),
                pids: Some(cfg.pids_limit),
            },
            cgroup_root: cfg.cgroup_root.clone(),
            cgroup_name: format!("exec-{}-{n}", std::process::id()),
            uid,
            gid,
            new_netns: crate::sys::has_external_interface(),
            cpu_limit: None,
            rlimits: Rlimits::default(),
            merge_stderr: false,
            sink: None,
            keep_background: true,
            controls: None,
            tty: None,
        };
        Ok(spec)
    }
}

/// Makes the sandbox user's home (mode 0755, theirs) if it is not there yet.
fn ensure_home(home: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    if home.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(home)?;
    std::os::unix::fs::chown(home, Some(uid), Some(gid))?;
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_default_leaves_room() {
        let m = "MemTotal:         262144 kB\nMemFree:  200000 kB\nMemAvailable:     204800 kB\n";
        // 200 MiB available - (32 + 20) reserve.
        assert_eq!(default_memory_limit_mib(m), Some(148));
        assert_eq!(
            default_memory_limit_mib("MemTotal: 40960 kB\n"),
            Some(MIN_MEMORY_LIMIT_MIB)
        );
        assert_eq!(default_memory_limit_mib("garbage"), None);
    }
}
