//! Test support for the workspace's integration tests (a dev-dependency): a real
//! `cloude-server` process reached with the API crate's typed client ([`Server`], [`http`]),
//! network namespaces ([`netns`]), what `/proc` says about a jailed process ([`jail_facts`]), and
//! [`vars`], the one list of the `CLOUDE_*` environment variables that connect `cargo xtask`,
//! the tests and the programs.

pub mod netns;
pub mod vars;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The default catalogue plus `extra` entries (test-only languages), in a temp file outside any
/// TMPDIR whose leftovers a test checks; returns the file (keep it alive) and its path.
pub fn test_catalog(extra: &str) -> (tempfile::NamedTempFile, String) {
    let file = tempfile::Builder::new()
        .prefix("cloude-test-catalog-")
        .suffix(".toml")
        .tempfile()
        .expect("catalogue file");
    std::fs::write(
        file.path(),
        format!("{}{extra}", include_str!("../../../catalog/default.toml")),
    )
    .expect("write the test catalogue");
    let path = file.path().to_str().expect("utf-8 temp path").to_string();
    (file, path)
}

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub url: String,
    pub runtime_dir: tempfile::TempDir,
}

impl Server {
    /// Starts `cloude-server --listen 127.0.0.1:0 ARGS...` and waits (up to `ready_within`) for
    /// its "listening on" line. Its stderr (logs and build progress) goes to ours.
    pub fn start(
        args: &[&str],
        config: Option<&str>,
        ready_within: Duration,
    ) -> Result<Server, String> {
        Self::start_in(None, "127.0.0.1:0", args, config, ready_within)
    }

    /// Like [`Server::start`], listening on `listen`, inside network namespace `netns` when given
    /// (through `nsenter --net`, which execs the server: its pid is the server's; not
    /// `ip netns exec`, which also remounts `/sys` without the cgroup hierarchies the jail
    /// needs).
    pub fn start_in(
        netns: Option<&str>,
        listen: &str,
        args: &[&str],
        config: Option<&str>,
        ready_within: Duration,
    ) -> Result<Server, String> {
        let wrapper = netns.map(|ns| {
            vec![
                format!("nsenter"),
                format!("--net=/run/netns/{ns}"),
                "--".into(),
            ]
        });
        Self::start_wrapped(
            wrapper.as_deref().unwrap_or(&[]),
            None,
            listen,
            args,
            config,
            ready_within,
        )
    }

    /// Like [`Server::start_in`], with the server's command line after `wrapper` (e.g.
    /// `setpriv … --`, which execs it: its pid is the server's) and, with `owner`, the harness
    /// directory and config file handed to that uid first (a non-root server).
    pub fn start_wrapped(
        wrapper: &[String],
        owner: Option<u32>,
        listen: &str,
        args: &[&str],
        config: Option<&str>,
        ready_within: Duration,
    ) -> Result<Server, String> {
        let runtime_dir = tempfile::Builder::new()
            .prefix("cloude-test-rt-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let bin = server_bin()?;
        let bin = bin.as_path();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["--listen", listen]).args(args);
        if let Some(text) = config {
            let p = runtime_dir.path().join("config.toml");
            std::fs::write(&p, text).map_err(|e| e.to_string())?;
            cmd.arg("--config").arg(p);
        }
        if let Some(uid) = owner {
            for e in std::fs::read_dir(runtime_dir.path())
                .map_err(|e| e.to_string())?
                .flatten()
            {
                std::os::unix::fs::chown(e.path(), Some(uid), Some(uid))
                    .map_err(|e| e.to_string())?;
            }
            std::os::unix::fs::chown(runtime_dir.path(), Some(uid), Some(uid))
                .map_err(|e| e.to_string())?;
        }
        let mut child = cmd
            .env(vars::RUNTIME_DIR, runtime_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start cloude-server: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let addr: SocketAddr = match rx.recv_timeout(ready_within) {
            Ok(a) => a.parse().map_err(|e| format!("bad address {a}: {e}"))?,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(format!(
                    "cloude-server did not start listening within {} s (exit: {status:?}); see its log above",
                    ready_within.as_secs()
                ));
            }
        };
        Ok(Server {
            child: Some(child),
            addr,
            url: format!("http://{addr}"),
            runtime_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM, then wait up to `within` for a clean exit.
    pub fn stop(mut self, within: Duration) -> Result<ExitStatus, String> {
        let mut child = self.child.take().ok_or("already stopped")?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let t = Instant::now();
        loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if t.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "cloude-server did not exit within {} s of SIGTERM",
                    within.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would: no clean-up of its VMs, cgroups or runtime directory.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn get(&self, path: &str) -> Response {
        http(self.addr, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        http(
            self.addr,
            "POST",
            path,
            Some(serde_json::to_vec(body).expect("json")),
        )
    }

    /// Children of the server process still alive (hypervisors it failed to reap).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    pub fn runtime_dir(&self) -> &Path {
        self.runtime_dir.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first, so that the server removes its VMs, cgroups and runtime directory;
        // SIGKILL only if it does not stop within a few seconds.
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(str::to_string))
                .and_then(|rest| {
                    rest.split_whitespace()
                        .nth(1)
                        .and_then(|pp| pp.parse::<u32>().ok())
                })
                == Some(pid)
        })
        .collect()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a connection of its own (the typed client's raw call), any status.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Vec<u8>>) -> Response {
    let client = cloude_api::client::Client::with_timeout(
        &format!("http://{addr}"),
        Some(Duration::from_secs(600)),
    );
    let r = client
        .raw(method, path, body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    Response {
        status: r.status,
        headers: r.headers,
        body: r.body,
    }
}

/// The `cloude-server` binary cargo built beside the running test: a test executable lives in
/// `<target>/<profile>/deps/`, the package's binaries in `<target>/<profile>/` (cargo builds
/// them for the package's integration tests).
pub fn server_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test's own path: {e}"))?;
    let dir = exe.parent().ok_or("the test executable has no directory")?;
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let p = dir.join("cloude-server");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: run the tests with cargo (cargo test -p cloude-server)",
            p.display()
        ))
    }
}

/// Path of a sibling workspace binary (built by `cargo test --workspace`).
pub fn sibling_bin(name: &str) -> Result<PathBuf, String> {
    let p = server_bin()?.with_file_name(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: build the workspace first (cargo build --workspace)",
            p.display()
        ))
    }
}

/// What `/proc` says about a (jailed) hypervisor process, compared with this test process.
#[derive(Debug)]
pub struct JailFacts {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: String,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb.
    pub caps: Vec<(String, String)>,
    pub no_new_privs: String,
    pub seccomp: String,
    /// Namespaces (mnt, pid, ipc, uts, net) shared with this process.
    pub shared_ns: Vec<&'static str>,
    /// Top-level entries of its root directory.
    pub root: Vec<String>,
    /// Its `/proc/PID/cgroup`, and whether that differs from ours.
    pub cgroup: String,
    pub own_cgroup: bool,
}

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub fn jail_facts(pid: u32) -> JailFacts {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let nums = |f: &str| -> Vec<u32> {
        status_field(&st, f)
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    root.sort();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    JailFacts {
        uids: nums("Uid"),
        gids: nums("Gid"),
        groups: status_field(&st, "Groups"),
        caps: ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
            .iter()
            .map(|c| (c.to_string(), status_field(&st, c)))
            .collect(),
        no_new_privs: status_field(&st, "NoNewPrivs"),
        seccomp: status_field(&st, "Seccomp"),
        shared_ns: ["mnt", "pid", "ipc", "uts", "net"]
            .into_iter()
            .filter(|ns| {
                std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok()
                    == std::fs::read_link(format!("/proc/self/ns/{ns}")).ok()
            })
            .collect(),
        root,
        own_cgroup: !cgroup.is_empty() && cgroup != ours,
        cgroup,
    }
}

impl JailFacts {
    /// Everything every jailed hypervisor must show; `None` when it does, else what is wrong.
    pub fn problems(&self, may_share_net: bool) -> Option<String> {
        let mut p = Vec::new();
        let uid = self.uids.first().copied().unwrap_or(0);
        if uid == 0 || self.uids.iter().any(|&u| u != uid) {
            p.push(format!("uids {:?}", self.uids));
        }
        if self.gids.contains(&0) || self.gids.is_empty() {
            p.push(format!("gids {:?}", self.gids));
        }
        if !self.groups.is_empty() {
            p.push(format!("groups {}", self.groups));
        }
        for (c, v) in &self.caps {
            if v != "0000000000000000" {
                p.push(format!("{c} {v}"));
            }
        }
        if self.no_new_privs != "1" {
            p.push(format!("NoNewPrivs {}", self.no_new_privs));
        }
        if self.seccomp != "2" {
            p.push(format!("Seccomp {}", self.seccomp));
        }
        let shared: Vec<_> = self
            .shared_ns
            .iter()
            .filter(|n| !(may_share_net && **n == "net"))
            .collect();
        if !shared.is_empty() {
            p.push(format!("shares namespaces {shared:?}"));
        }
        for host in [
            "etc", "home", "root", "var", "tmp", "proc", "sys", "run", "boot",
        ] {
            if self.root.iter().any(|r| r == host) {
                p.push(format!("host /{host} visible in its root {:?}", self.root));
            }
        }
        if !self.own_cgroup {
            p.push(format!("cgroup not its own: {}", self.cgroup));
        }
        (!p.is_empty()).then(|| p.join("; "))
    }
}

/// Runs `cmd` as `uid`/`gid` on the host; returns (success, stderr).
pub fn as_uid(uid: u32, cmd: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("spawn as uid");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command line of `pid`, split at NULs.
pub fn cmdline_args(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A server's cgroup directories under every hierarchy (v1 controllers or v2):
/// `/sys/fs/cgroup/[<controller>/]cloude/<runtime dir name>.<owner>`
/// (`cloude_jail::cgroup::Cgroups`).
pub fn server_cgroup_dirs(runtime_name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in ["memory", "pids", "cpu", ""] {
        let top = Path::new("/sys/fs/cgroup").join(c).join("cloude");
        for e in std::fs::read_dir(&top).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if (n == runtime_name || n.starts_with(&format!("{runtime_name}.")))
                && e.path().is_dir()
            {
                out.push(e.path());
            }
        }
    }
    out
}

/// A Python venv at `dir` with `requirement` (one or more, separated by spaces) installed from
/// the package index (made once; kept while `import` succeeds in it). Returns its `python`.
pub fn python_venv(dir: &Path, import: &str, requirement: &str) -> Result<PathBuf, String> {
    let python = dir.join("bin/python");
    let have = Command::new(&python)
        .args(["-c", &format!("import {import}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(python);
    }
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(dir)
        .status()
        .map_err(|e| format!("python3 -m venv: {e} (install python3 and python3-venv)"))?;
    if !st.success() {
        return Err("python3 -m venv failed (install python3-venv)".into());
    }
    let st = Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(requirement.split_whitespace())
        .status()
        .map_err(|e| format!("pip: {e}"))?;
    if !st.success() {
        return Err(format!(
            "pip install {requirement} failed (is the package index reachable?)"
        ));
    }
    Ok(python)
}
