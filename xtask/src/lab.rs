//! `cargo xtask lab`: the KVM lab, a Linux test machine (L2) booted under QEMU's software
//! emulator with an emulated AMD SVM CPU, so that `/dev/kvm` inside it is a real KVM and our VMM
//! can boot real Linux guests there (issue 3). Used where the host's own `/dev/kvm` cannot boot
//! Linux (e.g. `kvm_pvm`); hosts with VT-x/AMD-V do not need it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloude_image::kernel::{self, Flavor};
use cloude_image::paths;
use cloude_image::progress::Progress;

use crate::deps;

mod rootfs;
mod script;
mod tree;
mod vm;

/// Environment variables passed from the host into the lab (besides every `CLOUDE_*`).
const PASSED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];
/// How many console logs to keep under `$CLOUDE_HOME/lab/logs`.
const KEEP_LOGS: usize = 20;
/// Prefix of the per-run temporary directories (initrd, sockets): `cloude-lab-<pid>-XXXXXX`.
const RUN_DIR_PREFIX: &str = "cloude-lab-";
/// Lines of the console shown when something goes wrong.
const TAIL_LINES: usize = 40;

/// Arguments of `cargo xtask lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    /// Make this file or directory available in the lab at the same absolute path (repeatable).
    #[arg(long = "copy", value_name = "PATH")]
    pub copy: Vec<PathBuf>,
    /// Memory of the lab machine, in MiB (the initramfs, copies included, lives in it).
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub memory_mib: u32,
    /// Kill the lab machine after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub timeout: u64,
    /// Do not run `cargo build --release` first; use the binaries already in target/.
    #[arg(long)]
    pub no_build: bool,
    /// Report the steps and their durations on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// The command to run inside the lab, as root.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs the lab; returns the command's exit code.
pub fn run(args: LabArgs) -> anyhow::Result<i32> {
    if args.memory_mib < 256 {
        bail!("--memory-mib must be at least 256");
    }
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)
            .context("cannot install the signal handlers")?;
    }
    let t0 = Instant::now();
    let step = |what: &str| {
        if args.verbose {
            eprintln!("lab: [{:6.2}s] {what}", t0.elapsed().as_secs_f64());
        }
    };

    let progress = Progress::new(false);
    ensure_host_packages(&progress)?;
    step("host packages present");
    let lab_kernel = match std::env::var_os("CLOUDE_LAB_KERNEL").filter(|k| !k.is_empty()) {
        // For debugging the lab itself: boot another bzImage as the lab machine.
        Some(k) => PathBuf::from(k),
        None => {
            kernel::ensure_kernel(Flavor::Lab, &progress)
                .context("the lab kernel")?
                .bzimage
        }
    };
    let guest_kernel =
        kernel::ensure_kernel(Flavor::Guest, &progress).context("the guest kernel")?;
    step("kernels ready");
    if args.verbose {
        eprintln!("lab: guest kernel {}", guest_kernel.bzimage.display());
    }

    let bin_dir = deps::release_dir();
    if !args.no_build {
        build_release()?;
        step("release binaries built");
    }
    let binaries = our_binaries(&bin_dir);
    if binaries.is_empty() {
        eprintln!(
            "lab: warning: no cloude-* binaries in {}",
            bin_dir.display()
        );
    }

    let base_tree = rootfs::base_tree()?;
    let base = rootfs::ensure_base(&base_tree, args.verbose)?;
    step("base initramfs ready");

    let copies = args
        .copy
        .iter()
        .map(|p| std::path::absolute(p).with_context(|| format!("--copy {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let env = lab_env();
    let run_tree = rootfs::run_tree(&rootfs::RunSpec {
        command: &args.command,
        env: &env,
        cwd: &cwd,
        binaries: &binaries,
        bin_dir: &bin_dir,
        copies: &copies,
    })?;
    remove_stale_run_dirs();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{RUN_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .context("cannot create a temporary directory")?;
    let initrd = tmp.path().join("initrd.cpio");
    let size = rootfs::write_initrd(&base, &run_tree, &initrd)?;
    step(&format!("initrd written ({} MB)", size >> 20));
    if u64::from(args.memory_mib) * (1 << 20) < size * 2 + (256 << 20) {
        eprintln!(
            "lab: warning: the initramfs is {} MB; --memory-mib {} may be too small",
            size >> 20,
            args.memory_mib
        );
    }

    let log = new_log_path()?;
    let cfg = vm::VmConfig {
        qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
        kernel: lab_kernel,
        initrd,
        memory_mib: args.memory_mib,
        tsc_khz: vm::host_tsc_khz(),
        timeout: Duration::from_secs(args.timeout),
        console_log: log.clone(),
        socket_dir: tmp.path().to_path_buf(),
    };
    step("booting the lab machine");
    let outcome = vm::run(&cfg, &signal)?;
    step(&format!("lab machine stopped: {outcome:?}"));
    drop(tmp);
    match outcome {
        vm::Outcome::Exited(code) => {
            if code != 0 {
                eprintln!(
                    "lab: the command exited with status {code}; lab console log: {}",
                    log.display()
                );
            }
            Ok(code)
        }
        vm::Outcome::TimedOut => {
            eprintln!(
                "lab: the command did not finish within {} s; the lab machine was killed.\n\
                 lab: last lines of its console ({}):\n{}",
                args.timeout,
                log.display(),
                vm::log_tail(&log, TAIL_LINES)
            );
            Ok(124)
        }
        vm::Outcome::Interrupted(sig) => {
            eprintln!(
                "lab: interrupted (signal {sig}); the lab machine was stopped. Console log: {}",
                log.display()
            );
            Ok(128 + sig)
        }
        vm::Outcome::NoStatus(why) => bail!(
            "the lab machine stopped without the command's exit status ({why}).\n\
             Last lines of its console ({}):\n{}",
            log.display(),
            vm::log_tail(&log, TAIL_LINES)
        ),
    }
}

/// Installs the Debian packages the lab needs (root only) when their programs are missing.
fn ensure_host_packages(progress: &Progress) -> anyhow::Result<()> {
    let missing = rootfs::missing_host_programs();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
    pkgs.dedup();
    kernel::apt_install(&pkgs, progress).context("installing the lab's host packages")?;
    let still: Vec<&str> = rootfs::missing_host_programs()
        .iter()
        .map(|(p, _)| *p)
        .collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// `cargo build --release --keep-going` of every binary of the workspace but xtask. A package
/// that does not compile does not stop the lab (its binary is missing or stale, and we say so).
fn build_release() -> anyhow::Result<()> {
    let status = deps::cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "--keep-going",
            "--workspace",
            "--bins",
            "--exclude",
            "xtask",
        ])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        eprintln!(
            "lab: warning: cargo build --release failed ({status}); the binaries of the packages \
             that failed are missing or stale in the lab"
        );
    }
    Ok(())
}

/// The executables at the top of `dir` (the workspace's binaries: `cloude-*`, helpers like
/// `vsock-echo`, xtask itself).
fn our_binaries(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            !name.starts_with('.')
                && !name.ends_with(".d")
                && std::fs::metadata(p)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
        })
        .collect();
    v.sort();
    v
}

/// The environment of the command: every `CLOUDE_*` variable, a few Rust ones, `CLOUDE_HOME`
/// (the host's, even when it is the default) and `CLOUDE_LAB=1`.
fn lab_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("CLOUDE_") || PASSED_ENV.contains(&k.as_str()))
                && k != "CLOUDE_HOME"
                && k != "CLOUDE_LAB"
                && k != "CLOUDE_LAB_KERNEL"
                && k != "CLOUDE_LAB_TSC_KHZ"
                && k != "CLOUDE_LAB_APPEND"
                && script::valid_env_name(k)
        })
        .collect();
    env.push((
        "CLOUDE_HOME".into(),
        paths::cloude_home().to_string_lossy().into_owned(),
    ));
    env.push(("CLOUDE_LAB".into(), "1".into()));
    env.sort();
    env
}

/// A fresh console log path under `$CLOUDE_HOME/lab/logs` (older logs pruned).
fn new_log_path() -> anyhow::Result<PathBuf> {
    let dir = paths::cloude_home().join("lab").join("logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    logs.sort();
    let excess = logs.len().saturating_sub(KEEP_LOGS - 1);
    for p in logs.into_iter().take(excess) {
        let _ = std::fs::remove_file(p);
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Ok(dir.join(format!("{stamp}-{}.log", std::process::id())))
}

/// Removes run directories left by lab processes that were killed outright (SIGKILL): those
/// whose pid no longer exists.
fn remove_stale_run_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(rd) = std::fs::read_dir(&tmp) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(RUN_DIR_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
