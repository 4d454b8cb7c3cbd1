//! One cgroup v2 child per stage: limits, the kill switch, and the statistics read afterwards.
//! Interface files that the running kernel (or the delegation) lacks are skipped, never fatal.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`StageCgroup::kill_and_remove`] waits for the cgroup to empty after `cgroup.kill`.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create cgroup {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot open {0}")]
    Open(PathBuf, #[source] std::io::Error),
}

/// Limits applied to a stage's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// What was measured for a finished stage (zero / false when the kernel does not tell).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_us: Option<u64>,
    pub memory_peak_kib: Option<u64>,
    pub oom_killed: bool,
}

/// Enables the controllers we use for the children of `root` (best effort, logged).
pub fn enable_controllers(root: &Path) {
    let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for c in ["memory", "pids", "cpu"] {
        if !available.split_whitespace().any(|a| a == c) {
            tracing::debug!(
                "cgroup controller {c} not available under {}",
                root.display()
            );
            continue;
        }
        if let Err(e) = write_file(&root.join("cgroup.subtree_control"), &format!("+{c}")) {
            tracing::warn!("cannot enable cgroup controller {c}: {e}");
        }
    }
}

/// A stage's cgroup, removed by [`StageCgroup::kill_and_remove`] (or on drop, best effort).
#[derive(Debug)]
pub struct StageCgroup {
    dir: PathBuf,
    procs: File,
    removed: bool,
}

impl StageCgroup {
    /// Creates `root/name` with `limits` applied.
    pub fn create(root: &Path, name: &str, limits: Limits) -> Result<Self, CgroupError> {
        let dir = root.join(name);
        fs::create_dir(&dir).map_err(|e| CgroupError::Create(dir.clone(), e))?;
        let procs_path = dir.join("cgroup.procs");
        let procs = match OpenOptions::new().write(true).open(&procs_path) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(CgroupError::Open(procs_path, e));
            }
        };
        let cg = StageCgroup {
            dir,
            procs,
            removed: false,
        };
        if let Some(bytes) = limits.memory_bytes {
            cg.set_optional("memory.max", &bytes.to_string());
            cg.set_optional("memory.swap.max", "0");
            cg.set_optional("memory.oom.group", "1");
        }
        if let Some(pids) = limits.pids {
            cg.set_optional("pids.max", &pids.to_string());
        }
        Ok(cg)
    }

    fn set_optional(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        if !path.exists() {
            tracing::debug!("{} missing; limit not applied", path.display());
            return;
        }
        if let Err(e) = write_file(&path, value) {
            tracing::warn!("cannot write {value} to {}: {e}", path.display());
        }
    }

    /// The open `cgroup.procs`, for the child to join before `exec`.
    pub fn procs_file(&self) -> &File {
        &self.procs
    }

    /// Kills every process of the cgroup (escapees from `setsid` and double forks included).
    pub fn kill(&self) {
        if write_file(&self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        // Kernels before 5.14: signal each member; loop because members may fork meanwhile.
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// CPU time used so far by every process of the cgroup, microseconds.
    pub fn cpu_us(&self) -> Option<u64> {
        read_keyed(&self.dir.join("cpu.stat"), "usage_usec")
    }

    /// Reads CPU time, peak memory and OOM kills.
    pub fn stats(&self) -> Stats {
        let cpu_us = self.cpu_us();
        let peak = fs::read_to_string(self.dir.join("memory.peak"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|b| b / 1024);
        let oom = read_keyed(&self.dir.join("memory.events"), "oom_kill").unwrap_or(0) > 0
            || read_keyed(&self.dir.join("memory.events"), "oom_group_kill").unwrap_or(0) > 0;
        Stats {
            cpu_us,
            memory_peak_kib: peak,
            oom_killed: oom,
        }
    }

    /// Kills what is left, waits (bounded) until the cgroup is empty and removes it.
    /// Leaves the cgroup and what runs in it as they are (a sandbox command's background
    /// processes); the VM's end takes them.
    pub fn keep(mut self) {
        self.removed = true;
    }

    pub fn kill_and_remove(mut self) {
        self.kill();
        let start = Instant::now();
        while !self.pids().is_empty() && start.elapsed() < EMPTY_WAIT {
            std::thread::sleep(Duration::from_millis(5));
            self.kill();
        }
        self.remove();
    }

    fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        // rmdir fails with EBUSY until the last member is fully gone; retry briefly.
        for _ in 0..200 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    tracing::warn!("cannot remove cgroup {}: {e}", self.dir.display());
                    return;
                }
            }
        }
        tracing::warn!("cgroup {} still busy; left behind", self.dir.display());
    }
}

impl Drop for StageCgroup {
    fn drop(&mut self) {
        if !self.removed {
            self.kill();
            self.remove();
        }
    }
}

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// Reads `key value` from a flat-keyed cgroup file.
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("memory.events");
        fs::write(&p, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").expect("write");
        assert_eq!(read_keyed(&p, "oom_kill"), Some(2));
        assert_eq!(read_keyed(&p, "oom"), Some(1));
        assert_eq!(read_keyed(&p, "missing"), None);
    }
}
