//! Build-time commands run inside an image's root (the catalogue's `post_build`), for example
//! precompiling Python's standard library, which Debian does in maintainer scripts that the
//! builder never runs.
//!
//! The tree is written to a staging directory under [`crate::paths::build_dir`], each command runs
//! there through the host's `unshare` and `chroot`: as root, in new mount, PID, network (loopback
//! only, down), IPC and UTS namespaces, with `/proc`, a small `/dev` (null, zero, full, random,
//! urandom, shm), a tmpfs `/tmp`, a clean environment and a timeout. Those mounts live in the
//! private mount namespace only, so they vanish with it and are never read back. The directory is
//! then read back as the new tree.
//!
//! The commands execute the image's own programs as root on the build host (in a chroot, which
//! root can leave): only for images whose programs are trusted, i.e. Debian packages verified by
//! apt. The caller does not run them for OCI images.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::staging::{self, StagingError};
use super::tree::Tree;
use crate::progress::Progress;

/// Longest a single post-build command may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(900);
/// Most bytes of a failed command's output quoted in the error.
const MAX_DETAIL: usize = 4000;
/// The `PATH` the commands see.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mount points the sandbox needs in the root, created (and removed again) when missing.
const MOUNT_POINTS: &[(&str, u32)] = &[("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)];

/// Runs in the new namespaces (as `sh -c SCRIPT sh ROOT ARGV...`): mounts, then chroot.
const SANDBOX: &str = r#"set -eu
root=$1; shift
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid,size=1m tmpfs "$root/dev"
for d in null zero full random urandom; do
  : > "$root/dev/$d"
  mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir "$root/dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
exec chroot "$root" "$@"
"#;

#[derive(Debug, thiserror::Error)]
pub enum PostBuildError {
    #[error("post-build commands need root (chroot, namespaces, file owners)")]
    NotRoot,
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("the image's /{0} is not a directory, so it cannot be a mount point")]
    MountPoint(&'static str),
    #[error("post-build command `{cmd}` could not be started (are util-linux's unshare and coreutils' chroot installed?): {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("post-build command `{cmd}` failed ({status}): {detail}")]
    Failed {
        cmd: String,
        status: String,
        detail: String,
    },
    #[error("post-build command `{cmd}` did not finish within {secs} s")]
    Timeout { cmd: String, secs: u64 },
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> PostBuildError + '_ {
    move |e| PostBuildError::Io(p.to_path_buf(), e)
}

/// The host command running `argv` inside `root`.
pub fn sandbox_command(root: &Path, argv: &[String]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--net",
        "--ipc",
        "--uts",
        "--fork",
        "--kill-child",
        "--",
        "/bin/sh",
        "-c",
        SANDBOX,
        "sh",
    ])
    .arg(root)
    .args(argv)
    .env_clear()
    .env("PATH", PATH)
    .env("HOME", "/root")
    .env("LC_ALL", "C")
    .stdin(Stdio::null());
    c
}

/// Runs `commands` in order inside `tree` and returns the resulting tree.
pub fn run(
    tree: Tree,
    commands: &[Vec<String>],
    progress: &Progress,
) -> Result<Tree, PostBuildError> {
    if commands.is_empty() {
        return Ok(tree);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(PostBuildError::NotRoot);
    }
    let build = crate::paths::build_dir();
    fs::create_dir_all(&build).map_err(io(&build))?;
    let staging = tempfile::Builder::new()
        .prefix("post-build-")
        .tempdir_in(&build)
        .map_err(io(&build))?;
    let root = staging.path().join("root");
    fs::create_dir(&root).map_err(io(&root))?;
    let bar = progress.spinner("staging the image root for post-build commands");
    staging::materialize(&tree, &root)?;
    drop(tree);

    let mut created = Vec::new();
    for (name, mode) in MOUNT_POINTS {
        let p = root.join(name);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(PostBuildError::MountPoint(name)),
            Err(_) => {
                fs::create_dir(&p).map_err(io(&p))?;
                let perm = std::os::unix::fs::PermissionsExt::from_mode(*mode);
                fs::set_permissions(&p, perm).map_err(io(&p))?;
                created.push(p);
            }
        }
    }
    let log = staging.path().join("output.log");
    for argv in commands {
        let shown = argv.join(" ");
        bar.set_message(format!("post-build: {shown}"));
        run_one(&root, argv, &shown, &log)?;
    }
    for p in created {
        fs::remove_dir(&p).map_err(io(&p))?;
    }
    bar.set_message("reading the post-built image root back");
    let tree = staging::read_dir(&root)?;
    bar.finish_with_message(format!("{} post-build command(s) done", commands.len()));
    Ok(tree)
}

/// Why [`run_logged`] could not report an exit status.
#[derive(Debug)]
pub enum RunError {
    /// The sandbox could not be started.
    Spawn(std::io::Error),
    /// The log file or waiting failed.
    Io(std::io::Error),
}

/// Runs `argv` inside `root` ([`sandbox_command`], with `HOME` set to `home`), stdout and stderr
/// into the file `log`; kills it (and, through `--kill-child`, the namespace's processes) after
/// `timeout`. `Ok(None)`: it was killed.
pub fn run_logged(
    root: &Path,
    argv: &[String],
    home: &str,
    log: &Path,
    timeout: Duration,
) -> Result<Option<std::process::ExitStatus>, RunError> {
    let out = fs::File::create(log).map_err(RunError::Io)?;
    let err = out.try_clone().map_err(RunError::Io)?;
    let mut child = sandbox_command(root, argv)
        .env("HOME", home)
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(RunError::Spawn)?;
    let started = Instant::now();
    loop {
        match child.try_wait().map_err(RunError::Io)? {
            Some(st) => return Ok(Some(st)),
            None if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run_one(root: &Path, argv: &[String], shown: &str, log: &Path) -> Result<(), PostBuildError> {
    let status = match run_logged(root, argv, "/root", log, COMMAND_TIMEOUT) {
        Ok(Some(st)) => st,
        Ok(None) => {
            return Err(PostBuildError::Timeout {
                cmd: shown.to_string(),
                secs: COMMAND_TIMEOUT.as_secs(),
            })
        }
        Err(RunError::Spawn(source)) => {
            return Err(PostBuildError::Spawn {
                cmd: shown.to_string(),
                source,
            })
        }
        Err(RunError::Io(e)) => return Err(PostBuildError::Io(log.to_path_buf(), e)),
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(MAX_DETAIL);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    Err(PostBuildError::Failed {
        cmd: shown.to_string(),
        status: status.to_string(),
        detail: text[start..].trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tree::Meta;

    /// A root with the host's busybox (static) as `/bin/sh`.
    fn busybox_tree() -> Option<Tree> {
        let bb = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .find_map(|p| fs::read(p).ok())?;
        let mut t = Tree::new();
        t.insert_file("bin/busybox", Meta::root(0o755), bb)
            .expect("busybox");
        for l in ["sh", "cat", "echo", "grep", "wc", "tail", "cut", "tr", "rm"] {
            let comps =
                crate::image::tree::components(format!("bin/{l}").as_bytes()).expect("path");
            t.insert(
                &comps,
                crate::image::tree::Node::Symlink {
                    meta: Meta::root(0o777),
                    target: b"busybox".to_vec(),
                },
                l,
            )
            .expect("link");
        }
        t.insert_file("etc/keep", Meta::root(0o644), b"k".to_vec())
            .expect("keep");
        Some(t)
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn commands_change_the_tree_in_a_sandbox() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root");
            return;
        }
        let Some(t) = busybox_tree() else {
            println!("SKIPPED: needs a static busybox at /bin/busybox");
            return;
        };
        let cmds = [
            sh("echo made > /etc/made && rm /etc/keep"),
            // Sandbox facts, recorded in the image for the assertions below.
            sh("cat /proc/self/status | grep -c . > /etc/proc-ok; \
                echo $$ > /etc/pid; echo x > /tmp/scratch; echo z > /dev/null"),
        ];
        let out = run(t, &cmds, &Progress::new(true)).expect("post-build");
        let content = |p: &str| match out.lookup(p) {
            Some(crate::image::tree::Node::File(i)) => {
                String::from_utf8_lossy(&i.data).trim().to_string()
            }
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(content("etc/made"), "made");
        assert!(out.lookup("etc/keep").is_none(), "deletions are kept");
        assert_ne!(content("etc/proc-ok"), "0");
        assert_eq!(content("etc/pid"), "1", "own PID namespace");
        assert!(
            out.lookup("tmp").is_none(),
            "the mount point made for /tmp is gone"
        );
        assert!(out.lookup("proc").is_none() && out.lookup("dev").is_none());
        assert!(
            matches!(out.lookup("bin/sh"), Some(crate::image::tree::Node::Symlink { target, .. }) if target == b"busybox")
        );
    }

    #[test]
    fn no_network_and_failures_carry_output() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root");
            return;
        }
        let Some(t) = busybox_tree() else {
            println!("SKIPPED: needs a static busybox at /bin/busybox");
            return;
        };
        // Only a loopback interface, and it is down: no route to anything.
        let cmds = [sh(
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /etc/ifaces; \
                        echo boom >&2; exit 3",
        )];
        let err = run(t, &cmds, &Progress::new(true)).expect_err("exit 3");
        let msg = err.to_string();
        assert!(msg.contains("boom") && msg.contains('3'), "{msg}");

        let t = busybox_tree().expect("busybox");
        let cmds = [sh(
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /etc/ifaces",
        )];
        let out = run(t, &cmds, &Progress::new(true)).expect("ifaces");
        match out.lookup("etc/ifaces") {
            Some(crate::image::tree::Node::File(i)) => {
                assert_eq!(String::from_utf8_lossy(&i.data).trim(), "lo")
            }
            other => panic!("{other:?}"),
        }
    }
}
