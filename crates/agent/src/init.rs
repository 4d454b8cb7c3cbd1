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

/// Kernel command-line parameters of a block root (`cloude_image::image::block::ROOT_PARAM`
/// and `ROOT_FSTYPE_PARAM`; the agent does not link the image builder).
const ROOT_PARAM: &str = "cloude.root";
const ROOT_FSTYPE_PARAM: &str = "cloude.rootfstype";
/// Filesystems a block root may have.
const ROOT_FSTYPES: &[&str] = &["erofs", "squashfs", "ext4"];
/// In the boot initramfs: the root's layers (a tmpfs holding the read-only lower mount, the
/// writable upper directory and overlayfs's work directory) and the merged root.
const LAYERS: &str = "/.layers";
const MERGED: &str = "/.root";
/// Size cap of the writable layer (only root in the guest can write outside /tmp and /work).
const UPPER_OPTS: &str = "mode=0755,size=40%";

/// Everything PID 1 sets up before serving.
pub fn boot() {
    sys::ignore_signals();
    switch_to_block_root();
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

/// The block root named on the kernel command line (`cloude.root=/dev/vda
/// cloude.rootfstype=erofs`), if any: device and filesystem, checked.
pub fn block_root_of(cmdline: &str) -> Result<Option<(String, String)>, String> {
    let mut dev = None;
    let mut fstype = "erofs".to_string();
    for word in cmdline.split_ascii_whitespace() {
        if let Some(v) = word
            .strip_prefix(ROOT_PARAM)
            .and_then(|r| r.strip_prefix('='))
        {
            dev = Some(v.to_string());
        } else if let Some(v) = word
            .strip_prefix(ROOT_FSTYPE_PARAM)
            .and_then(|r| r.strip_prefix('='))
        {
            fstype = v.to_string();
        }
    }
    let Some(dev) = dev else {
        return Ok(None);
    };
    let name = dev.strip_prefix("/dev/").unwrap_or("");
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("{ROOT_PARAM}={dev} is not a device like /dev/vda"));
    }
    if !ROOT_FSTYPES.contains(&fstype.as_str()) {
        return Err(format!(
            "{ROOT_FSTYPE_PARAM}={fstype} is not one of {}",
            ROOT_FSTYPES.join(", ")
        ));
    }
    Ok(Some((dev, fstype)))
}

/// With a block root on the command line: mounts it read-only under a tmpfs overlay and makes
/// the overlay the root (the boot initramfs stays below, unreachable). Without one: nothing.
/// A failure is logged and boot goes on in the initramfs (the server then sees a VM whose
/// programs cannot start, with this message on its console).
fn switch_to_block_root() {
    mkdir("/proc");
    mount_fs(
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "",
    );
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let _ = nix::mount::umount("/proc");
    let (dev, fstype) = match block_root_of(&cmdline) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            log(&format!("block root refused: {e}"));
            return;
        }
    };
    if let Err(e) = mount_block_root(&dev, &fstype) {
        log(&format!(
            "cannot mount the block root {dev} ({fstype}): {e}"
        ));
    }
}

fn mount_block_root(dev: &str, fstype: &str) -> Result<(), String> {
    let step = |what: &str, r: nix::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    mkdir("/dev");
    step(
        "mounting devtmpfs",
        mount(
            Some("devtmpfs"),
            "/dev",
            Some("devtmpfs"),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ),
    )?;
    let lower = format!("{LAYERS}/lower");
    let upper = format!("{LAYERS}/upper");
    let work = format!("{LAYERS}/work");
    mkdir(LAYERS);
    let mounted = (|| {
        step(
            "mounting the writable layer",
            mount(
                Some("tmpfs"),
                LAYERS,
                Some("tmpfs"),
                MsFlags::MS_NOSUID,
                Some(UPPER_OPTS),
            ),
        )?;
        for d in [&lower, &upper, &work] {
            fs::create_dir(d).map_err(|e| format!("creating {d}: {e}"))?;
        }
        fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{upper}: {e}"))?;
        step(
            "mounting the root device read-only",
            mount(
                Some(dev),
                lower.as_str(),
                Some(fstype),
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                None::<&str>,
            ),
        )?;
        mkdir(MERGED);
        let opts = format!("lowerdir={lower},upperdir={upper},workdir={work}");
        step(
            "mounting the overlay",
            mount(
                Some("overlay"),
                MERGED,
                Some("overlay"),
                MsFlags::MS_NODEV,
                Some(opts.as_str()),
            ),
        )
    })();
    // The initramfs's /dev is no longer needed (boot mounts a fresh one in the new root); the
    // root device stays open through its mount.
    let _ = nix::mount::umount("/dev");
    mounted?;
    step("entering the new root", nix::unistd::chdir(MERGED))?;
    step(
        "moving the new root to /",
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
    )?;
    step("chroot", nix::unistd::chroot("."))?;
    step("chdir /", nix::unistd::chdir("/"))
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
    use cloude_protocol::sandbox::{SANDBOX_HOME, SANDBOX_USER};
    let passwd_line =
        format!("{SANDBOX_USER}:x:{RUN_UID}:{RUN_GID}:{SANDBOX_USER}:{SANDBOX_HOME}:/bin/sh\n");
    let group_line = format!("{SANDBOX_USER}:x:{RUN_GID}:\n");
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

#[cfg(test)]
mod tests {
    use super::block_root_of;

    #[test]
    fn block_roots_come_from_the_command_line_and_are_checked() {
        assert_eq!(block_root_of("console=ttyS0 quiet"), Ok(None));
        assert_eq!(
            block_root_of("quiet cloude.root=/dev/vda"),
            Ok(Some(("/dev/vda".into(), "erofs".into())))
        );
        assert_eq!(
            block_root_of("cloude.rootfstype=squashfs cloude.root=/dev/vdb"),
            Ok(Some(("/dev/vdb".into(), "squashfs".into())))
        );
        for bad in [
            "cloude.root=/dev/../etc",
            "cloude.root=vda",
            "cloude.root=/dev/",
            "cloude.root=/dev/vda cloude.rootfstype=nfs",
        ] {
            assert!(block_root_of(bad).is_err(), "{bad}");
        }
    }
}
