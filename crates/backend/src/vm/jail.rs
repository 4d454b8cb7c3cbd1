//! The jail around every hypervisor process (both drivers): a uid/gid of its own per running VM,
//! a cgroup of its own with memory, pids and CPU limits, and the `cloude-jail` step (namespaces,
//! a root of its own, rlimits, no privileges) between the server and the hypervisor's exec.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloude_jail::cgroup::{CgroupError, Cgroups, Group, Hierarchy, Limits, CGROUP_MOUNT};

use crate::config::JailConfig;

/// How long a VM's processes may take to die before its cgroup is given up on.
const RELEASE_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail step binary cloude-jail was not found next to cloude-server (set CLOUDE_JAIL_BIN)")]
    NoBinary,
    #[error("cannot create the hypervisors' cgroups: {0}; run cloude-server as root, or set [jail] enabled = false to run them unjailed (not for untrusted code)")]
    Cgroup(CgroupError),
    #[error("this host cannot jail the hypervisors ({0}); run cloude-server as root (it needs CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_CHOWN and write access to {CGROUP_MOUNT}), or set [jail] enabled = false to run them unjailed (not for untrusted code)")]
    Probe(String),
    #[error("every uid of jail.uid_range is in use")]
    NoUid,
    #[error("cannot prepare the VM's jail directory: {0}")]
    Dir(std::io::Error),
}

struct Uids {
    first: u32,
    count: u32,
    next: u32,
    used: HashSet<u32>,
}

/// The server's jail settings and allocators.
pub struct Jailer {
    binary: PathBuf,
    cgroups: Cgroups,
    uids: Mutex<Uids>,
    seq: AtomicU64,
}

impl std::fmt::Debug for Jailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Jailer {
    /// Detects the cgroup hierarchy, creates this server's cgroups and proves (by running the
    /// jail step up to the exec) that this host can jail. `runtime_dir` names the server's
    /// cgroups and holds the probe's root.
    pub fn start(cfg: &JailConfig, runtime_dir: &Path) -> Result<Arc<Jailer>, JailError> {
        let binary = cloude_image::paths::sibling_binary("cloude-jail", "CLOUDE_JAIL_BIN")
            .ok_or(JailError::NoBinary)?;
        let hierarchy = Hierarchy::detect(Path::new(CGROUP_MOUNT)).map_err(JailError::Cgroup)?;
        let name = runtime_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("cloude-server")
            .to_string();
        let cgroups = Cgroups::new(hierarchy, &name).map_err(JailError::Cgroup)?;
        if cgroups.swept() > 0 {
            tracing::warn!(
                "killed {} hypervisor or jailer process(es) left in the cgroups of servers that \
                 are gone (killed without cleaning up)",
                cgroups.swept()
            );
        }
        let [first, last] = cfg.uid_range;
        let jailer = Arc::new(Jailer {
            binary,
            cgroups,
            uids: Mutex::new(Uids {
                first,
                count: last - first + 1,
                next: 0,
                used: HashSet::new(),
            }),
            seq: AtomicU64::new(0),
        });
        if let Err(e) = jailer.probe(runtime_dir) {
            jailer.cgroups.remove();
            return Err(e);
        }
        Ok(jailer)
    }

    /// Runs the whole jail step once (in a throw-away cgroup) without an exec.
    fn probe(self: &Arc<Self>, runtime_dir: &Path) -> Result<(), JailError> {
        let root = runtime_dir.join("jail-probe");
        std::fs::create_dir_all(&root).map_err(JailError::Dir)?;
        let lease = self.lease(Limits {
            memory_bytes: 64 << 20,
            pids: 8,
            cpu_millis: 500,
        })?;
        let mut spec = cloude_jail::Spec::new(lease.uid, lease.uid, root.clone());
        spec.cgroup_procs = lease.procs_files();
        spec.probe = true;
        let out = std::process::Command::new(&self.binary)
            .args(spec.to_args())
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| JailError::Probe(format!("cannot run {}: {e}", self.binary.display())))?;
        drop(lease);
        let _ = std::fs::remove_dir(&root);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            return Err(JailError::Probe(if err.is_empty() {
                out.status.to_string()
            } else {
                err.trim_start_matches("cloude-jail: ").to_string()
            }));
        }
        Ok(())
    }

    /// One line for the logs and `/healthz`.
    pub fn describe(&self) -> String {
        let u = self.uids.lock().expect("uid lock is never poisoned");
        format!(
            "cgroup v{}, uids {}-{}",
            self.cgroups.hierarchy().version(),
            u.first,
            u.first + (u.count - 1),
        )
    }

    pub fn cgroup_version(&self) -> u8 {
        self.cgroups.hierarchy().version()
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// A uid of its own and a cgroup with `limits` for one VM.
    pub fn lease(self: &Arc<Self>, limits: Limits) -> Result<Lease, JailError> {
        let uid = {
            let mut u = self.uids.lock().expect("uid lock is never poisoned");
            let mut found = None;
            for _ in 0..u.count {
                let cand = u.first + u.next;
                u.next = (u.next + 1) % u.count;
                if u.used.insert(cand) {
                    found = Some(cand);
                    break;
                }
            }
            found.ok_or(JailError::NoUid)?
        };
        let mut lease = Lease {
            uid,
            group: None,
            jailer: self.clone(),
        };
        let name = format!("vm-{}", self.seq.fetch_add(1, Ordering::Relaxed));
        lease.group = Some(
            self.cgroups
                .create(&name, limits)
                .map_err(JailError::Cgroup)?,
        );
        Ok(lease)
    }

    /// Removes this server's cgroups (killing what is left in them): the end of serving.
    pub fn shutdown(&self) {
        self.cgroups.remove();
    }
}

impl Drop for Jailer {
    fn drop(&mut self) {
        // The last lease is gone too (each holds the jailer): nothing of this server is left.
        self.cgroups.remove();
    }
}

/// One VM's uid and cgroup; the cgroup is emptied and removed and the uid freed on drop
/// (blocking for as long as the processes take to die: drop it through [`Lease::release`]).
pub struct Lease {
    pub uid: u32,
    group: Option<Group>,
    jailer: Arc<Jailer>,
}

impl Lease {
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.group
            .as_ref()
            .map(Group::procs_files)
            .unwrap_or_default()
    }

    /// The cgroup's directories (tests read the limits there).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.group
            .as_ref()
            .map(|g| g.dirs().to_vec())
            .unwrap_or_default()
    }

    /// How many of the VM's processes its cgroup's memory limit killed (0 unjailed).
    pub fn oom_kills(&self) -> u64 {
        self.group.as_ref().map_or(0, Group::oom_kills)
    }

    /// Freezes or thaws the VM's processes (see [`Group::freeze`]); unjailed, an error.
    pub fn freeze(&self, frozen: bool) -> std::io::Result<()> {
        match &self.group {
            Some(g) => g.freeze(frozen).map_err(std::io::Error::other),
            None => Err(std::io::Error::other("the VM has no cgroup")),
        }
    }

    /// CPU time the VM's processes have used (see [`Group::cpu_time`]); `None` unjailed.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.group.as_ref().and_then(Group::cpu_time)
    }

    /// SIGKILLs the VM's processes but the jailer `spare` (see [`Group::kill_except`]).
    pub fn kill_except(&self, spare: Option<u32>) {
        if let Some(g) = &self.group {
            g.kill_except(spare.and_then(|p| i32::try_from(p).ok()));
        }
    }

    /// Kills what is left and frees the cgroup and the uid, off the async workers.
    pub fn release(self) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || drop(self));
            }
            Err(_) => drop(self),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut g) = self.group.take() {
            if let Err(e) = g.remove(RELEASE_WITHIN) {
                tracing::error!("cannot remove a VM's cgroup: {e}");
                // Keep the uid reserved: a process of it may still be alive.
                return;
            }
        }
        self.jailer
            .uids
            .lock()
            .expect("uid lock is never poisoned")
            .used
            .remove(&self.uid);
    }
}

/// Makes `dir` (the VM's directory) the jail's: owned by its uid, mode 0711 (only its owner
/// lists or writes it; the server can still reach `root/` in it without CAP_DAC_READ_SEARCH
/// when it runs as a non-root user; nobody else can reach the server's 0700 runtime directory
/// above it), with `root/` (the jail's mount point) in it. Every entry the server made in it (its listening sockets) is
/// handed to the uid too, so that the hypervisor can connect to them.
pub fn prepare_dir(dir: &Path, uid: u32) -> Result<PathBuf, JailError> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("root");
    std::fs::create_dir_all(&root).map_err(JailError::Dir)?;
    for e in std::fs::read_dir(dir).map_err(JailError::Dir)?.flatten() {
        std::os::unix::fs::lchown(e.path(), Some(uid), Some(uid)).map_err(JailError::Dir)?;
    }
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).map_err(JailError::Dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(JailError::Dir)?;
    Ok(root)
}
