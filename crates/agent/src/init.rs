//! PID 1 duties: the file systems, console descriptors, loopback, hostname, a user entry for
//! `/etc/passwd`-less images, and signal immunity. Every step logs its failure and goes on:
//! PID 1 must never panic or exit (that panics the kernel).

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::fd::IntoRawFd as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::sys;

/// Host name of every guest.
pub const HOSTNAME: &str = "cloude";
/// Parent of the per-request work directories in the guest (a size-capped tmpfs).
pub const WORK_ROOT: &str = "/work";
/// Where cgroup v2 is mounted in the guest.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Size caps of the guest's tmpfs mounts, as a share of RAM (pages written there are also
/// charged to the writer's cgroup, so a program is bounded by its memory limit first).
const TMP_OPTS: &str = "mode=1777,size=40%";
const WORK_OPTS: &str = "mode=0755,size=40%";
const SHM_OPTS: &str = "mode=1777,size=20%";
/// The unprivileged user programs run as (numeric: images may have no `/etc/passwd`).
pub const RUN_UID: u32 = 1000;
pub const RUN_GID: u32 = 1000;

/// Everything PID 1 sets up before serving.
pub fn boot() {
    sys::ignore_signals();
    // The initramfs root's mode comes from the kernel (tmpfs roots are 1777): make it root's
    // alone, so the unprivileged program can only write where it is meant to (/tmp, its work dir).
    if let Err(e) = nix::unistd::chown("/", Some(0.into()), Some(0.into())) {
        log(&format!("cannot give the root directory to root: {e}"));
    }
    if let Err(e) = fs::set_permissions("/", fs::Permissions::from_mode(0o755)) {
        log(&format!("cannot restrict the root directory: {e}"));
    }
    mkdir("/dev");
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    );
    fix_std_fds();
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let noexec = nosuid | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", noexec, "");
    mount_fs("sysfs", "/sys", "sysfs", noexec, "");
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0620,ptmxmode=0666",
    );
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid, SHM_OPTS);
    mount_fs("cgroup2", CGROUP_ROOT, "cgroup2", noexec, "");
    mount_fs("tmpfs", "/tmp", "tmpfs", nosuid, TMP_OPTS);
    mount_fs("tmpfs", WORK_ROOT, "tmpfs", nosuid, WORK_OPTS);
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            if let Err(e) = std::os::unix::fs::symlink(target, link) {
                log(&format!("cannot link {link}: {e}"));
            }
        }
    }
    if let Err(e) = nix::unistd::sethostname(HOSTNAME) {
        log(&format!("cannot set the hostname: {e}"));
    }
    if let Err(e) = sys::set_link_up("lo") {
        log(&format!("cannot bring lo up: {e}"));
    }
    ensure_user();
}

fn mkdir(path: &str) {
    if let Err(e) = fs::create_dir_all(path) {
        log(&format!("cannot create {path}: {e}"));
    }
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: &str) {
    mkdir(target);
    let data = (!data.is_empty()).then_some(data);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => {}
        // Already mounted (e.g. devtmpfs by CONFIG_DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => log(&format!("cannot mount {fstype} on {target}: {e}")),
    }
}

/// Gives PID 1 a stdin/stdout/stderr when the kernel could not (no `/dev/console` in the
/// initramfs): output goes to the console, input comes from `/dev/null`.
fn fix_std_fds() {
    let valid = |fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok();
    for (fd, path) in [(0, "/dev/null"), (1, "/dev/console"), (2, "/dev/console")] {
        if valid(fd) {
            continue;
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(fd != 0)
            .custom_flags(libc::O_NOCTTY)
            .open(path);
        match opened {
            Ok(f) => {
                let raw = f.into_raw_fd();
                if raw != fd {
                    let _ = nix::unistd::dup2(raw, fd);
                    let _ = nix::unistd::close(raw);
                }
            }
            Err(e) => log(&format!("cannot open {path}: {e}")),
        }
    }
}

/// Adds the run user to `/etc/passwd` and `/etc/group` when they lack it, so that `whoami`,
/// `getpwuid` and friends work; numeric ids work without it anyway.
fn ensure_user() {
    let passwd_line = format!("cloude:x:{RUN_UID}:{RUN_GID}:cloude:{WORK_ROOT}:/bin/sh\n");
    let group_line = format!("cloude:x:{RUN_GID}:\n");
    mkdir("/etc");
    for (file, line, id) in [
        ("/etc/passwd", passwd_line, RUN_UID),
        ("/etc/group", group_line, RUN_GID),
    ] {
        let existing = fs::read_to_string(file).unwrap_or_default();
        let has_id = existing
            .lines()
            .any(|l| l.split(':').nth(2) == Some(id.to_string().as_str()));
        if has_id {
            continue;
        }
        let res = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = res {
            log(&format!("cannot add the run user to {file}: {e}"));
        }
    }
}

/// Boot-time message to the console (before tracing is set up).
fn log(msg: &str) {
    eprintln!("cloude-agent: {msg}");
}
