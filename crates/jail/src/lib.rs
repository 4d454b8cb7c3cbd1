//! `cloude-jail`: the step between the server and every hypervisor process (both drivers), in the
//! spirit of Firecracker's jailer. The server runs `cloude-jail [OPTIONS] -- ARGS...`; the jailer
//!
//! 0. arms `PR_SET_PDEATHSIG` (SIGKILL) and checks that its starter is still its parent, so
//!    that it never outlives the server, even one killed with SIGKILL,
//! 1. joins the VM's cgroup(s) (made by the server, see [`cgroup`]; children inherit them),
//! 2. opens the hypervisor binary, then unshares mount, pid, ipc and uts namespaces (and network,
//!    unless the VM has an inherited tap),
//! 3. forks: the child becomes PID 1 of the new pid namespace and
//!    - builds a root of its own: a fresh tmpfs holding only the bind mounts it was given
//!      (kernel and image read-only, the VM's own socket directory) and private device nodes
//!      (`/dev/kvm`, owned by the jail's uid, mode 0600), then
//!      `pivot_root` into it (or `MS_MOVE` + `chroot` where the host root is an initramfs), the
//!      old root detached and the new root remounted read-only;
//!    - sets rlimits (open files, file size, no core dumps, processes), ignores `SIGXFSZ` (a
//!      console over its size cap then fails writes instead of killing the VM);
//!    - drops every privilege: no supplementary groups, the VM's own gid and uid (never 0), all
//!      capability sets empty (effective, permitted, inheritable, bounding, ambient),
//!      `PR_SET_NO_NEW_PRIVS`, and `PR_SET_PDEATHSIG` so that it dies with the jailer;
//!    - `fexecve`s the hypervisor with only the environment it was given;
//! 4. the parent drops to the same uid, re-arms its parent-death signal (every credential
//!    change clears it) and checks its parent again, forwards `SIGTERM`/`SIGINT`, waits, and ends the way the
//!    hypervisor ended (the same exit code, or the same signal — `SIGSYS` from a seccomp kill
//!    reaches the server as such).
//!
//! The command line is built by [`Spec::to_args`] and parsed by the same [`Spec`], so the
//! server and the jailer cannot disagree about it.

pub mod cgroup;
mod setup;

use std::ffi::OsString;
use std::path::PathBuf;

/// Exit code of the jailer when the jail could not be set up (before the hypervisor ran).
pub const SETUP_FAILED: i32 = 125;
/// The hostname inside every jail (its own uts namespace).
pub const HOSTNAME: &str = "cloude-jail";

/// Everything the jail step needs, as command-line options.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Parser)]
#[command(
    name = "cloude-jail",
    version,
    about = "Runs a hypervisor unprivileged, namespaced, chrooted and in its cgroup"
)]
pub struct Spec {
    /// The uid the hypervisor runs as (never 0).
    #[arg(long)]
    pub uid: u32,
    /// The gid the hypervisor runs as (never 0).
    #[arg(long)]
    pub gid: u32,
    /// An empty directory on the host; the jail's root tmpfs is mounted on it (in the jail's
    /// own mount namespace only, so nothing is left mounted on the host).
    #[arg(long)]
    pub root: PathBuf,
    /// `cgroup.procs` files the jailer joins before anything else (one per v1 controller, or
    /// one for cgroup v2).
    #[arg(long = "cgroup-procs")]
    pub cgroup_procs: Vec<PathBuf>,
    /// Bind-mount SRC read-only at DST (a path inside the jail).
    #[arg(long = "bind-ro", num_args = 2, value_names = ["SRC", "DST"])]
    pub bind_ro: Vec<PathBuf>,
    /// Bind-mount SRC read-write (no exec, no suid, no devices) at DST.
    #[arg(long = "bind-rw", num_args = 2, value_names = ["SRC", "DST"])]
    pub bind_rw: Vec<PathBuf>,
    /// Create at DST a device node of the same kind and number as the host's SRC, owned by the
    /// jail's uid with mode 0600 (the host's node and its permissions stay as they are).
    #[arg(long = "device", num_args = 2, value_names = ["SRC", "DST"])]
    pub devices: Vec<PathBuf>,
    /// Create the symbolic link LINK -> TARGET inside the jail.
    #[arg(long, num_args = 2, value_names = ["TARGET", "LINK"])]
    pub symlink: Vec<PathBuf>,
    /// Keep the host's network namespace (the VM has an inherited tap); otherwise the
    /// hypervisor gets an empty network namespace.
    #[arg(long)]
    pub keep_netns: bool,
    /// RLIMIT_NOFILE.
    #[arg(long, default_value_t = 256)]
    pub max_files: u64,
    /// RLIMIT_FSIZE in bytes: no file the hypervisor writes (its console) grows past this.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_file_bytes: u64,
    /// RLIMIT_NPROC (threads of the jail's uid; the cgroup's pids limit is the other bound).
    #[arg(long, default_value_t = 64)]
    pub max_procs: u64,
    /// Environment variables (NAME=VALUE) the hypervisor gets; nothing else is passed.
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// Only check that this host can jail (everything up to the exec), then exit 0.
    #[arg(long)]
    pub probe: bool,
    /// The hypervisor binary (a host path; opened before the jail is built).
    #[arg(long, required_unless_present = "probe")]
    pub exec: Option<PathBuf>,
    /// The hypervisor's arguments (paths as seen inside the jail).
    #[arg(last = true)]
    pub args: Vec<String>,
}

impl Spec {
    /// A spec with the given identity and root and the defaults for everything else.
    pub fn new(uid: u32, gid: u32, root: PathBuf) -> Spec {
        Spec {
            uid,
            gid,
            root,
            max_files: 256,
            max_file_bytes: 16 << 20,
            max_procs: 64,
            ..Spec::default()
        }
    }

    /// The jailer's command line for this spec (what [`clap::Parser::parse`] reads back).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut opt = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        opt("--uid", self.uid.to_string().into());
        opt("--gid", self.gid.to_string().into());
        opt("--root", self.root.clone().into());
        for p in &self.cgroup_procs {
            opt("--cgroup-procs", p.clone().into());
        }
        opt("--max-files", self.max_files.to_string().into());
        opt("--max-file-bytes", self.max_file_bytes.to_string().into());
        opt("--max-procs", self.max_procs.to_string().into());
        for e in &self.env {
            opt("--env", e.into());
        }
        for (flag, list) in [
            ("--bind-ro", &self.bind_ro),
            ("--bind-rw", &self.bind_rw),
            ("--device", &self.devices),
            ("--symlink", &self.symlink),
        ] {
            for pair in list.chunks(2) {
                a.push(flag.into());
                a.extend(pair.iter().map(|p| p.clone().into_os_string()));
            }
        }
        if self.keep_netns {
            a.push("--keep-netns".into());
        }
        if self.probe {
            a.push("--probe".into());
        }
        if let Some(e) = &self.exec {
            a.push("--exec".into());
            a.push(e.clone().into());
        }
        a.push("--".into());
        a.extend(self.args.iter().map(OsString::from));
        a
    }

    /// Adds a read-only bind mount of `src` at `dst` (inside the jail).
    pub fn bind_ro(&mut self, src: impl Into<PathBuf>, dst: impl Into<PathBuf>) -> &mut Self {
        self.bind_ro.extend([src.into(), dst.into()]);
        self
    }

    /// Adds a read-write bind mount of `src` at `dst`.
    pub fn bind_rw(&mut self, src: impl Into<PathBuf>, dst: impl Into<PathBuf>) -> &mut Self {
        self.bind_rw.extend([src.into(), dst.into()]);
        self
    }

    /// Adds a private device node at `dst` like the host's `src`.
    pub fn device(&mut self, src: impl Into<PathBuf>, dst: impl Into<PathBuf>) -> &mut Self {
        self.devices.extend([src.into(), dst.into()]);
        self
    }

    /// Adds the symlink `link -> target`.
    pub fn symlink(&mut self, target: impl Into<PathBuf>, link: impl Into<PathBuf>) -> &mut Self {
        self.symlink.extend([target.into(), link.into()]);
        self
    }

    /// Checks what the parser cannot: identities, pairs, inside paths.
    pub fn validate(&self) -> Result<(), String> {
        if self.uid == 0 || self.gid == 0 {
            return Err("the jail's uid and gid must not be 0".into());
        }
        for list in [&self.bind_ro, &self.bind_rw, &self.devices, &self.symlink] {
            for pair in list.chunks(2) {
                let dst = pair.get(1).ok_or("a mount or link needs two paths")?;
                if !dst.is_absolute()
                    || dst
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(format!(
                        "{} must be an absolute path without '..' inside the jail",
                        dst.display()
                    ));
                }
            }
        }
        for e in &self.env {
            if !e.contains('=') {
                return Err(format!("--env {e}: expected NAME=VALUE"));
            }
        }
        Ok(())
    }
}

/// Runs the jail step described by `spec`; returns the process exit code (the hypervisor's, or
/// [`SETUP_FAILED`]). A hypervisor killed by a signal makes the jailer die by the same signal.
pub fn run(spec: &Spec) -> i32 {
    if let Err(e) = spec.validate() {
        eprintln!("cloude-jail: {e}");
        return SETUP_FAILED;
    }
    setup::run(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn args_round_trip() {
        let mut s = Spec::new(10_001, 10_001, "/run/vm-3/root".into());
        s.cgroup_procs = vec!["/sys/fs/cgroup/cloude/x/vm-3/cgroup.procs".into()];
        s.bind_ro("/cache/vmlinux", "/kernel")
            .bind_rw("/run/vm-3/vm", "/vm")
            .device("/dev/kvm", "/dev/kvm")
            .symlink("usr/lib", "/lib");
        s.env = vec!["A=b".into()];
        s.exec = Some("/usr/bin/cloude-vmm".into());
        s.args = vec!["--kernel".into(), "/kernel".into(), "--".into()];
        let mut argv = vec![OsString::from("cloude-jail")];
        argv.extend(s.to_args());
        let back = Spec::try_parse_from(argv).expect("parses");
        assert_eq!(back, s);
        assert!(back.validate().is_ok());
    }

    #[test]
    fn root_identity_and_relative_targets_are_refused() {
        let s = Spec::new(0, 5, "/r".into());
        assert!(s.validate().is_err());
        let mut s = Spec::new(5, 5, "/r".into());
        s.bind_ro("/a", "kernel");
        assert!(s.validate().is_err());
        let mut s = Spec::new(5, 5, "/r".into());
        s.bind_ro("/a", "/x/../../etc");
        assert!(s.validate().is_err());
    }
}
