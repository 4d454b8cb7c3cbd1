//! Leak checks: VM processes, runtime-dir entries, VM cgroups, open fds of the server, temp
//! files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checks::Checks;
use crate::support::{children_of, Server};

/// How long cleanup may take to settle after a phase (killed VMs are reaped asynchronously).
const SETTLE: Duration = Duration::from_secs(10);

pub struct LeakProbe {
    /// The server's own runtime directory (`cloude-*` under the harness directory).
    pub server_rt: PathBuf,
    /// The test's private TMPDIR.
    pub tmp: PathBuf,
    pub fd_baseline: usize,
}

impl LeakProbe {
    pub fn new(server: &Server, tmp: &Path) -> Self {
        let server_rt = std::fs::read_dir(server.runtime_dir())
            .expect("harness runtime dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("cloude-"))
            })
            .expect("the server made its runtime dir (cloude-*) under CLOUDE_RUNTIME_DIR");
        LeakProbe {
            server_rt,
            tmp: tmp.to_path_buf(),
            fd_baseline: fd_count(server.pid()),
        }
    }

    /// Takes the fd baseline now (after a warm-up request: lazily opened fds are in it).
    pub fn with_baseline(mut self, server: &Server) -> Self {
        std::thread::sleep(Duration::from_millis(500));
        self.fd_baseline = fd_count(server.pid());
        self
    }

    /// Processes that belong to the server's VMs: its children, and anything whose command
    /// line points into its runtime directory (re-parented orphans).
    pub fn vm_processes(&self, server_pid: u32) -> Vec<String> {
        let mut out: Vec<String> = children_of(server_pid)
            .into_iter()
            .map(|p| {
                format!(
                    "child {p} ({})",
                    cmdline(p).chars().take(60).collect::<String>()
                )
            })
            .collect();
        out.extend(processes_mentioning(&self.server_rt, server_pid));
        out
    }

    /// VM cgroups of this server still present (every controller hierarchy, v1 or v2).
    pub fn vm_cgroups(&self) -> Vec<String> {
        let Some(name) = self.server_rt.file_name() else {
            return vec![];
        };
        cloude_testkit::server_cgroup_dirs(&name.to_string_lossy())
            .into_iter()
            .flat_map(|d| {
                list(&d)
                    .into_iter()
                    .map(move |e| format!("{}/{e}", d.display()))
            })
            .filter(|p| Path::new(p).is_dir())
            .collect()
    }

    /// Entries left in the server's runtime directory.
    pub fn runtime_entries(&self) -> Vec<String> {
        list(&self.server_rt)
    }

    /// Temp files in TMPDIR that are not a live harness directory.
    pub fn temp_entries(&self) -> Vec<String> {
        stray_temp_files(&self.tmp)
    }

    /// Waits for the server to settle, then counts what is left behind.
    pub fn check(&self, server: &Server, phase: &str, c: &mut Checks) {
        let pid = server.pid();
        let t = Instant::now();
        let (procs, entries, fds, temps) = loop {
            let mut procs = self.vm_processes(pid);
            procs.extend(self.vm_cgroups().into_iter().map(|g| format!("cgroup {g}")));
            let entries = self.runtime_entries();
            let fds = fd_count(pid);
            let temps = self.temp_entries();
            let clean = procs.is_empty()
                && entries.is_empty()
                && fds <= self.fd_baseline
                && temps.is_empty();
            if clean || t.elapsed() > SETTLE {
                break (procs, entries, fds, temps);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let fd_leak = fds.saturating_sub(self.fd_baseline);
        c.leaks += procs.len() + entries.len() + fd_leak + temps.len();
        c.check(
            &format!("{phase}: no VM process or cgroup left"),
            procs.is_empty(),
            format!("{procs:?}"),
        );
        c.check(
            &format!("{phase}: runtime dir empty"),
            entries.is_empty(),
            format!("{} holds {entries:?}", self.server_rt.display()),
        );
        c.check(
            &format!("{phase}: server fds back to baseline"),
            fd_leak == 0,
            format!(
                "{fds} open, baseline {}: {:?}",
                self.fd_baseline,
                fd_targets(pid)
            ),
        );
        c.check(
            &format!("{phase}: no temp files"),
            temps.is_empty(),
            format!("{temps:?}"),
        );
    }
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Resident set size of `pid` in KiB (VmRSS), 0 if unknown.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether `pid` is gone or a zombie (dead, waiting to be reaped).
pub fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Live processes (other than `except`) whose command line mentions `dir`.
pub fn processes_mentioning(dir: &Path, except: u32) -> Vec<String> {
    let needle = dir.display().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != except && p != std::process::id())
        .filter_map(|p| {
            let c = cmdline(p);
            c.contains(&needle)
                .then(|| format!("{p} ({})", c.chars().take(60).collect::<String>()))
        })
        .collect()
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Entries of TMPDIR other than harness directories of servers (`cloude-test-rt-*`), and
/// entries of those other than the config file and the server's runtime directory.
pub fn stray_temp_files(tmp: &Path) -> Vec<String> {
    let mut out = vec![];
    for name in list(tmp) {
        if name.starts_with("cloude-test-rt-") {
            for inner in list(&tmp.join(&name)) {
                if inner != "config.toml" && !inner.starts_with("cloude-") {
                    out.push(format!("{name}/{inner}"));
                }
            }
        } else {
            out.push(name);
        }
    }
    out
}
