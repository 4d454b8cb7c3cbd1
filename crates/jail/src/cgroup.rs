//! A cgroup per hypervisor, on cgroup v1 (one directory per controller: memory, pids, cpu) or
//! cgroup v2 (one directory), detected at start. Layout: `<controller root>/cloude/<server>/<vm>`,
//! so that several servers on one host never share a directory; the server removes its own
//! directories (and `cloude/` once it is empty) when it stops.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup hierarchies are mounted.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// The top directory of Cloude's cgroups under each hierarchy.
pub const TOP: &str = "cloude";
/// The CPU bandwidth period (µs) the CPU limit is expressed in.
pub const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {0}: neither cgroup v2 (cgroup.controllers) nor the v1 memory, pids and cpu controllers are mounted there")]
    NotMounted(String),
    #[error("cgroup v2 at {0} lacks the {1} controller (enable it in the parent's cgroup.subtree_control)")]
    MissingController(String, &'static str),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the processes of {0} did not exit within {1} ms")]
    Busy(PathBuf, u128),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

/// Which cgroup version, and where its controllers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
    V2 {
        root: PathBuf,
    },
}

impl Hierarchy {
    /// Detects the hierarchy under `mount` (normally [`CGROUP_MOUNT`]). A pure v2 mount wins; a
    /// hybrid host (v1 controllers plus an empty unified mount) uses v1.
    pub fn detect(mount: &Path) -> Result<Hierarchy, CgroupError> {
        if mount.join("cgroup.controllers").is_file() {
            let have = std::fs::read_to_string(mount.join("cgroup.controllers"))
                .map_err(io("read", &mount.join("cgroup.controllers")))?;
            for c in ["memory", "pids", "cpu"] {
                if !have.split_whitespace().any(|h| h == c) {
                    return Err(CgroupError::MissingController(
                        mount.display().to_string(),
                        c,
                    ));
                }
            }
            return Ok(Hierarchy::V2 {
                root: mount.to_path_buf(),
            });
        }
        let memory = mount.join("memory");
        let pids = mount.join("pids");
        let cpu = mount.join("cpu");
        // (The root of the pids hierarchy has no pids.max: only its children do.)
        if memory.join("memory.limit_in_bytes").is_file()
            && pids.join("cgroup.procs").is_file()
            && cpu.join("cpu.cfs_quota_us").is_file()
        {
            return Ok(Hierarchy::V1 { memory, pids, cpu });
        }
        Err(CgroupError::NotMounted(mount.display().to_string()))
    }

    /// `1` or `2`.
    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }

    fn roots(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V1 { memory, pids, cpu } => vec![memory, pids, cpu],
            Hierarchy::V2 { root } => vec![root],
        }
    }
}

/// Limits of one VM's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory (guest RAM plus the hypervisor's own), bytes; swap is not allowed on top.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU bandwidth in thousandths of a CPU (1500 = one and a half CPUs).
    pub cpu_millis: u64,
}

/// One server's cgroups: `<root>/cloude/<name>.<owner>` under every controller root, where
/// `<owner>` ([`Owner`]) names the server process, so that a later server can tell whether the
/// server that made a directory is still alive.
#[derive(Debug)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    name: String,
    /// Processes of dead servers' VMs that the start-up sweep killed.
    swept: usize,
}

/// The process that owns a server directory: its pid namespace (inode of `/proc/self/ns/pid`),
/// pid and start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`), spelled
/// `<ns>-<pid>-<start>`. A pid alone could be reused; with the start time it cannot, and the
/// namespace keeps a server in another pid namespace from judging this one by a pid it
/// cannot see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid_ns: u64,
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Option<Owner> {
        Some(Owner {
            pid_ns: own_pid_ns()?,
            pid: std::process::id(),
            start: start_time(std::process::id())?,
        })
    }

    /// Parses the `<owner>` part of a directory name `<base>.<owner>`.
    pub fn from_dir_name(name: &str) -> Option<Owner> {
        let (_, owner) = name.rsplit_once('.')?;
        let mut it = owner.split('-');
        let o = Owner {
            pid_ns: it.next()?.parse().ok()?,
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(o)
    }

    /// Whether the owner still runs. `None` when this process cannot tell (another pid
    /// namespace).
    pub fn alive(&self) -> Option<bool> {
        if own_pid_ns()? != self.pid_ns {
            return None;
        }
        Some(start_time(self.pid) == Some(self.start))
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.pid_ns, self.pid, self.start)
    }
}

fn own_pid_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Field 22 of `/proc/<pid>/stat` (after the parenthesised command, which may hold spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field 22 is the 20th of it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How long a start-up sweep waits for the processes of a dead server's VM to exit.
const SWEEP_KILL_WAIT: Duration = Duration::from_secs(2);

impl Cgroups {
    /// Creates this server's directories (enabling the v2 controllers on the way down), after
    /// removing what servers that ended without cleaning up (killed) left: the directories of
    /// every server that is gone, with whatever still runs in them killed first, and any other
    /// empty directory older than [`SWEEP_AGE`].
    pub fn new(hierarchy: Hierarchy, base: &str) -> Result<Cgroups, CgroupError> {
        let name = match Owner::current() {
            Some(o) => format!("{base}.{o}"),
            None => base.to_string(),
        };
        let mut me = Cgroups {
            hierarchy,
            name,
            swept: 0,
        };
        me.swept = me.sweep();
        me.ensure()?;
        Ok(me)
    }

    /// How many processes left by dead servers the start-up sweep killed.
    pub fn swept(&self) -> usize {
        self.swept
    }

    /// This server's directory name under `cloude/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cleans up after other servers (see [`Cgroups::new`]). Returns how many processes it
    /// killed.
    pub fn sweep(&self) -> usize {
        let mut killed = 0;
        for root in self.hierarchy.roots() {
            let Ok(servers) = std::fs::read_dir(root.join(TOP)) else {
                continue;
            };
            for server in servers.flatten() {
                let name = server.file_name().to_string_lossy().into_owned();
                if name == self.name || !server.path().is_dir() {
                    continue;
                }
                let dead = Owner::from_dir_name(&name).and_then(|o| o.alive()) == Some(false);
                if dead {
                    killed += self.sweep_dead(&name);
                } else if stale(&server.path()) {
                    if let Ok(vms) = std::fs::read_dir(server.path()) {
                        for vm in vms.flatten().filter(|e| stale(&e.path())) {
                            let _ = std::fs::remove_dir(vm.path());
                        }
                    }
                    let _ = std::fs::remove_dir(server.path());
                }
            }
        }
        killed
    }

    /// Kills every process left in the VM groups of the dead server `name` (under every
    /// controller), then removes its directories.
    fn sweep_dead(&self, name: &str) -> usize {
        let mut vms: Vec<String> = Vec::new();
        for root in self.hierarchy.roots() {
            if let Ok(entries) = std::fs::read_dir(root.join(TOP).join(name)) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    let vm = e.file_name().to_string_lossy().into_owned();
                    if !vms.contains(&vm) {
                        vms.push(vm);
                    }
                }
            }
        }
        let mut killed = 0;
        for vm in vms {
            let mut group = Group {
                dirs: self
                    .hierarchy
                    .roots()
                    .iter()
                    .map(|r| r.join(TOP).join(name).join(&vm))
                    .filter(|d| d.is_dir())
                    .collect(),
                v2: matches!(self.hierarchy, Hierarchy::V2 { .. }),
            };
            killed += group.pids().len();
            let _ = group.remove(SWEEP_KILL_WAIT);
        }
        for root in self.hierarchy.roots() {
            let _ = std::fs::remove_dir(root.join(TOP).join(name));
        }
        killed
    }

    /// Makes sure this server's directories exist (another server's sweep may have removed
    /// them while they were empty).
    fn ensure(&self) -> Result<(), CgroupError> {
        let me = self;
        let name = &self.name;
        for root in me.hierarchy.roots() {
            let top = root.join(TOP);
            let server = top.join(name);
            if let Hierarchy::V2 { .. } = me.hierarchy {
                enable_controllers(root)?;
                mkdir(&top)?;
                enable_controllers(&top)?;
                mkdir(&server)?;
                enable_controllers(&server)?;
            } else {
                mkdir(&top)?;
                mkdir(&server)?;
            }
        }
        Ok(())
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Creates the cgroup `vm` with `limits`.
    pub fn create(&self, vm: &str, limits: Limits) -> Result<Group, CgroupError> {
        self.ensure()?;
        let mut group = Group {
            dirs: Vec::new(),
            v2: matches!(self.hierarchy, Hierarchy::V2 { .. }),
        };
        for root in self.hierarchy.roots() {
            let d = root.join(TOP).join(&self.name).join(vm);
            if let Err(e) = mkdir(&d) {
                // Another server's start-up sweep may have just removed our empty directory.
                self.ensure()?;
                mkdir(&d).map_err(|_| e)?;
            }
            group.dirs.push(d);
        }
        // On error `group` is dropped... by the caller's remove; set limits now.
        if let Err(e) = group.set_limits(&self.hierarchy, limits) {
            let _ = group.remove(Duration::from_millis(100));
            return Err(e);
        }
        Ok(group)
    }

    /// Removes this server's directories (and `cloude/` where no other server uses it).
    pub fn remove(&self) {
        for root in self.hierarchy.roots() {
            let top = root.join(TOP);
            if let Ok(entries) = std::fs::read_dir(top.join(&self.name)) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(top.join(&self.name));
            let _ = std::fs::remove_dir(&top);
        }
    }
}

/// How old an empty directory must be before a start-up sweep removes it: a server that is
/// starting (or a VM being created) right now is never swept from under it.
const SWEEP_AGE: Duration = Duration::from_secs(120);

/// A directory created long enough ago to be swept if empty.
fn stale(d: &Path) -> bool {
    std::fs::metadata(d)
        .ok()
        .filter(|m| m.is_dir())
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > SWEEP_AGE)
}

fn mkdir(d: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("create", d)(e)),
    }
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let f = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&f).map_err(io("read", &f))?;
    for c in ["memory", "pids", "cpu"] {
        if !on.split_whitespace().any(|h| h == c) {
            std::fs::write(&f, format!("+{c}")).map_err(io("enable a controller in", &f))?;
        }
    }
    Ok(())
}

/// One VM's cgroup (one directory per v1 controller, or one v2 directory).
#[derive(Debug)]
pub struct Group {
    dirs: Vec<PathBuf>,
    v2: bool,
}

/// The `oom_kill N` line of a `memory.events` / `memory.oom_control` file (0 without one).
fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// `utime + stime` of a process (all its threads, the exited ones included) from
/// `/proc/<pid>/stat`; `None` once it is gone.
pub fn process_cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks_to_duration(ticks, USER_HZ))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks. The command
/// name (field 2) may hold spaces and parentheses: the fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`: 100 on every Linux
/// architecture this runs on, whatever the kernel's `HZ`).
const USER_HZ: u64 = 100;

impl Group {
    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let p = d.join(file);
            if p.exists() {
                return std::fs::write(&p, value).map_err(io("write", &p));
            }
        }
        Err(CgroupError::Io {
            what: "find",
            path: self.dirs.first().cloned().unwrap_or_default().join(file),
            source: std::io::Error::from(ErrorKind::NotFound),
        })
    }

    fn set_limits(&self, h: &Hierarchy, l: Limits) -> Result<(), CgroupError> {
        let quota = l.cpu_millis.max(10) * CPU_PERIOD_US / 1000;
        match h {
            Hierarchy::V2 { .. } => {
                self.write("memory.max", &l.memory_bytes.to_string())?;
                if self.dirs.iter().any(|d| d.join("memory.swap.max").exists()) {
                    self.write("memory.swap.max", "0")?;
                }
                self.write("pids.max", &l.pids.to_string())?;
                self.write("cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            Hierarchy::V1 { .. } => {
                self.write("memory.limit_in_bytes", &l.memory_bytes.to_string())?;
                if self
                    .dirs
                    .iter()
                    .any(|d| d.join("memory.memsw.limit_in_bytes").exists())
                {
                    self.write("memory.memsw.limit_in_bytes", &l.memory_bytes.to_string())?;
                }
                self.write("pids.max", &l.pids.to_string())?;
                self.write("cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                self.write("cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to (the jailer's `--cgroup-procs`).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// How many times the kernel's OOM killer killed a process of the group for its memory
    /// limit (`oom_kill` in v2's `memory.events`, or v1's `memory.oom_control`).
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|text| oom_kill_count(&text))
            .sum()
    }

    /// CPU time the group's processes have used, all threads, the exited ones included: v2's
    /// `usage_usec` of `cpu.stat`; on v1 (whose `cpu` controller counts no usage) the sum of
    /// `utime + stime` of `/proc/<pid>/stat` over the group's processes, which holds their
    /// exited threads too (a process that exited is no longer counted). `None` when unreadable.
    pub fn cpu_time(&self) -> Option<Duration> {
        if self.v2 {
            let text = std::fs::read_to_string(self.dirs.first()?.join("cpu.stat")).ok()?;
            return text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|n| n.trim().parse().ok())
                .map(Duration::from_micros);
        }
        let pids = self.pids();
        if pids.is_empty() {
            return None;
        }
        Some(pids.into_iter().filter_map(process_cpu_time).sum())
    }

    /// Freezes (or thaws) every process of the group: v2's `cgroup.freeze`; v1 (whose `freezer`
    /// controller this hierarchy does not use) `SIGSTOP` / `SIGCONT` to each process. A frozen
    /// hypervisor runs no guest code and takes no CPU; `SIGKILL` still ends it.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        if self.v2 {
            return self.write("cgroup.freeze", if frozen { "1" } else { "0" });
        }
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        for pid in self.pids() {
            if pid > 0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
        Ok(())
    }

    /// The directories (one per v1 controller, or the v2 one).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<i32> {
        let mut all: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// SIGKILLs every process in the group (`cgroup.kill` on v2 where the kernel has it).
    pub fn kill(&self) {
        if self.v2 {
            if let Some(d) = self.dirs.first() {
                if std::fs::write(d.join("cgroup.kill"), "1").is_ok() {
                    return;
                }
            }
        }
        self.kill_except(None);
    }

    /// SIGKILLs every process in the group but `spare` (the jailer, which then reaps the
    /// hypervisor and exits by itself, leaving no orphan behind).
    pub fn kill_except(&self, spare: Option<i32>) {
        for pid in self.pids() {
            if pid > 0 && Some(pid) != spare {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Kills what is left in the group, waits up to `within` for it to be empty, and removes its
    /// directories. Blocking (short sleeps): call it off the async workers.
    pub fn remove(&mut self, within: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + within;
        loop {
            self.kill();
            self.dirs.retain(|d| match std::fs::remove_dir(d) {
                Ok(()) => false,
                Err(e) => e.kind() != ErrorKind::NotFound,
            });
            if self.dirs.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(self.dirs[0].clone(), within.as_millis()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        // A command name with spaces and a ')' of its own; utime 250, stime 17.
        let stat = "4242 (qemu) x (y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 5 0";
        assert_eq!(parse_cpu_ticks(stat), Some(267));
        assert_eq!(parse_cpu_ticks("4242 (short"), None);
        assert_eq!(ticks_to_duration(267, 100), Duration::from_millis(2670));
        assert_eq!(ticks_to_duration(3, 0), Duration::from_secs(3));
        let own = process_cpu_time(std::process::id() as i32).expect("our own stat");
        assert!(own < Duration::from_secs(24 * 3600), "{own:?}");
    }

    #[test]
    fn reads_the_oom_kill_count_of_v1_and_v2() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        let v2 = "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kill_count(v1), 2);
        assert_eq!(oom_kill_count(v2), 1);
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    #[test]
    fn detects_v1_and_v2_layouts() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            Hierarchy::detect(d.path()),
            Err(CgroupError::NotMounted(_))
        ));
        for (c, f) in [
            ("memory", "memory.limit_in_bytes"),
            ("pids", "cgroup.procs"),
            ("cpu", "cpu.cfs_quota_us"),
        ] {
            std::fs::create_dir(d.path().join(c)).expect("dir");
            std::fs::write(d.path().join(c).join(f), "").expect("file");
        }
        assert_eq!(Hierarchy::detect(d.path()).expect("v1").version(), 1);
        std::fs::write(d.path().join("cgroup.controllers"), "cpu pids").expect("v2");
        assert!(matches!(
            Hierarchy::detect(d.path()),
            Err(CgroupError::MissingController(_, "memory"))
        ));
        std::fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .expect("v2");
        assert_eq!(Hierarchy::detect(d.path()).expect("v2").version(), 2);
    }
}
