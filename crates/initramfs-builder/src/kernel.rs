//! Builds the guest kernel (and the KVM lab's kernel) from Debian's `linux-source` package.
//!
//! The configuration is the project's own fragment (`kernel/*.config`) merged over
//! `make allnoconfig`. Results are cached under `$CLOUDE_HOME/kernels/<flavor>-<key>/` where the
//! key hashes the fragments and the source package version; a lock file serialises builders.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::paths;
use crate::progress::Progress;

const GUEST_CONFIG: &str = include_str!("../../../kernel/guest.config");
const LAB_CONFIG: &str = include_str!("../../../kernel/lab.config");
/// The Debian package whose tarball we build from.
/// The host's KVM, as far as booting our guest kernel goes: the one answer to "can this
/// `/dev/kvm` boot Linux", used by the server's hypervisor probe and by the bench.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostKvm {
    pub dev_kvm: bool,
    /// Loaded KVM vendor modules (`kvm_intel`, `kvm_amd`, `kvm_pvm`).
    pub modules: Vec<String>,
}

impl HostKvm {
    /// Reads `/dev/kvm` and `/sys/module`.
    pub fn gather() -> Self {
        HostKvm {
            dev_kvm: Path::new("/dev/kvm").exists(),
            modules: ["kvm_intel", "kvm_amd", "kvm_pvm"]
                .iter()
                .filter(|m| Path::new("/sys/module").join(m).exists())
                .map(|m| m.to_string())
                .collect(),
        }
    }

    /// True when `/dev/kvm` is `kvm_pvm`: it takes the KVM API but cannot boot a stock Linux
    /// guest.
    pub fn is_pvm(&self) -> bool {
        self.modules.iter().any(|m| m == "kvm_pvm")
    }

    /// The hardware virtualisation module (`kvm_intel` or `kvm_amd`) when `/dev/kvm` boots a
    /// stock Linux guest; None without KVM, or with `kvm_pvm`.
    pub fn linux_capable(&self) -> Option<&str> {
        if !self.dev_kvm || self.is_pvm() {
            return None;
        }
        self.modules
            .iter()
            .find(|m| *m == "kvm_intel" || *m == "kvm_amd")
            .map(String::as_str)
    }
}

pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Debian packages the build needs.
pub const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "cpio",
];
/// Roughly how many objects a build of the guest config compiles (for the progress bar).
const APPROX_BUILD_STEPS: u64 = 1700;

/// Which kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// The guest kernel every VM boots.
    Guest,
    /// The KVM lab's test machine: the guest config plus a KVM (AMD SVM) host.
    Lab,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Guest => "guest",
            Flavor::Lab => "lab",
        }
    }

    /// The configuration fragments, in merge order.
    pub fn fragments(self) -> Vec<&'static str> {
        match self {
            Flavor::Guest => vec![GUEST_CONFIG],
            Flavor::Lab => vec![GUEST_CONFIG, LAB_CONFIG],
        }
    }
}

/// A built kernel in the cache.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Compressed boot image (bzImage), bootable by QEMU and `cloude-vmm`.
    pub bzimage: PathBuf,
    /// Uncompressed ELF (PVH entry), the faster one to boot.
    pub vmlinux: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel build needs Debian packages that are missing ({0}); run as root so they can be installed with apt, or install them")]
    MissingPackages(String),
    #[error("apt-get could not install the kernel build packages (exit status {0})")]
    AptFailed(String),
    #[error("cannot read the version of {SOURCE_PACKAGE}: {0}")]
    SourceVersion(String),
    #[error("{step} failed ({status}); the last lines of its output:\n{tail}")]
    Step {
        step: String,
        status: String,
        tail: String,
    },
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the guest kernel config does not have {0} as kernel/guest.config asks (a Kconfig dependency or a missing CONFIG_EXPERT overrides it)")]
    Surface(String),
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |e| KernelError::Io(p.to_path_buf(), e)
}

/// Returns the cached kernel for `flavor`, building it first if needed.
pub fn ensure_kernel(flavor: Flavor, progress: &Progress) -> Result<Kernel, KernelError> {
    if let Some(k) = cached_kernel(flavor)? {
        return Ok(k);
    }
    ensure_build_packages(progress)?;
    let version = source_version()?;
    let out = cache_dir(flavor, &version);
    let parent = out.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let lock_path = parent.join(format!(".{}.lock", flavor.name()));
    let _lock = crate::lock::FileLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
    if let Some(k) = existing(&out) {
        return Ok(k);
    }
    build(flavor, &out, progress)?;
    existing(&out).ok_or_else(|| {
        KernelError::Io(
            out.clone(),
            std::io::Error::other("the build finished without a kernel image"),
        )
    })
}

/// The cached kernel for `flavor`, if it has been built for the installed source version.
pub fn cached_kernel(flavor: Flavor) -> Result<Option<Kernel>, KernelError> {
    match source_version() {
        Ok(v) => Ok(existing(&cache_dir(flavor, &v))),
        Err(_) => Ok(None),
    }
}

fn existing(dir: &Path) -> Option<Kernel> {
    let k = Kernel {
        bzimage: dir.join("bzImage"),
        vmlinux: dir.join("vmlinux"),
    };
    (k.bzimage.is_file() && k.vmlinux.is_file()).then_some(k)
}

/// Options the guest kernel must not have, whatever Kconfig dependencies say: system calls that
/// untrusted code does not need and kernel exploits like (see `kernel/guest.config`).
pub const SURFACE_OFF: &[&str] = &[
    "CONFIG_IO_URING",
    "CONFIG_BPF_SYSCALL",
    "CONFIG_USERFAULTFD",
    "CONFIG_X86_IOPL_IOPERM",
    "CONFIG_DEVMEM",
    "CONFIG_DEVPORT",
    "CONFIG_MODIFY_LDT_SYSCALL",
    "CONFIG_KEXEC",
    "CONFIG_KEXEC_FILE",
    "CONFIG_CHECKPOINT_RESTORE",
    "CONFIG_KCMP",
    "CONFIG_USER_NS",
    "CONFIG_MODULES",
];

/// Hardening options the guest kernel must have on.
pub const SURFACE_ON: &[&str] = &[
    // x86 always selects PERF_EVENTS; this makes perf_event_open root-only (paranoid level 3).
    "CONFIG_SECURITY_PERF_EVENTS_RESTRICT",
];

/// Features the server depends on: a kernel without them boots but cannot mount a block root.
pub const FEATURES_ON: &[&str] = &[
    "CONFIG_VIRTIO_BLK",
    "CONFIG_EROFS_FS",
    "CONFIG_EROFS_FS_ZIP",
    "CONFIG_OVERLAY_FS",
    "CONFIG_SQUASHFS",
];

/// The [`SURFACE_OFF`] options that a final `.config` still has on, and the [`SURFACE_ON`] and
/// [`FEATURES_ON`] ones it does not have on.
pub fn surface_left_on(config: &str) -> Vec<&'static str> {
    let on = |opt: &str| {
        config.lines().any(|l| {
            l.strip_prefix(opt)
                .and_then(|rest| rest.strip_prefix('='))
                .is_some_and(|v| v == "y" || v == "m")
        })
    };
    let mut bad: Vec<&'static str> = SURFACE_OFF.iter().copied().filter(|o| on(o)).collect();
    bad.extend(
        SURFACE_ON
            .iter()
            .chain(FEATURES_ON)
            .copied()
            .filter(|o| !on(o)),
    );
    bad
}

/// The cache key: hash of the fragments and the source version.
pub fn cache_key(flavor: Flavor, source_version: &str) -> String {
    let mut h = Sha256::new();
    for f in flavor.fragments() {
        h.update(f.as_bytes());
        h.update(b"\n--\n");
    }
    h.update(source_version.as_bytes());
    hex::encode(&h.finalize()[..8])
}

fn cache_dir(flavor: Flavor, version: &str) -> PathBuf {
    paths::kernels_dir().join(format!("{}-{}", flavor.name(), cache_key(flavor, version)))
}

fn source_version() -> Result<String, KernelError> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| KernelError::SourceVersion(e.to_string()))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() || !Path::new(SOURCE_TARBALL).is_file() {
        return Err(KernelError::SourceVersion(
            "the package is not installed".into(),
        ));
    }
    Ok(v)
}

fn missing_packages() -> Vec<&'static str> {
    BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .stderr(Stdio::null())
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// Installs the build packages with apt when they are missing (root only).
pub fn ensure_build_packages(progress: &Progress) -> Result<(), KernelError> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing, progress)
}

/// `apt-get install` of `packages` (running `apt-get update` first), with a spinner.
pub fn apt_install(packages: &[&str], progress: &Progress) -> Result<(), KernelError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(KernelError::MissingPackages(packages.join(" ")));
    }
    let bar = progress.spinner(format!("apt-get install {}", packages.join(" ")));
    let run = |args: &[&str]| -> Result<(), KernelError> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| KernelError::AptFailed(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(KernelError::Step {
                step: format!("apt-get {}", args.join(" ")),
                status: out.status.to_string(),
                tail: tail(&String::from_utf8_lossy(&out.stderr), 15),
            })
        }
    };
    run(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    run(&args)?;
    bar.finish_with_message(format!("installed {}", packages.join(" ")));
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run_step(cmd: &mut Command, step: &str) -> Result<(), KernelError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::Step {
            step: step.to_string(),
            status: "could not start".into(),
            tail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut all = String::from_utf8_lossy(&out.stdout).to_string();
    all.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(KernelError::Step {
        step: step.to_string(),
        status: out.status.to_string(),
        tail: tail(&all, 20),
    })
}

fn build(flavor: Flavor, out: &Path, progress: &Progress) -> Result<(), KernelError> {
    let version = source_version()?;
    let tree_root = paths::build_dir().join(format!("linux-{version}"));
    let src = tree_root.join("src");
    if !src.join("Makefile").is_file() {
        let bar = progress.spinner(format!("unpacking {SOURCE_TARBALL}"));
        let staging = tree_root.join("unpack.tmp");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        run_step(
            Command::new("tar")
                .arg("-xf")
                .arg(SOURCE_TARBALL)
                .arg("-C")
                .arg(&staging),
            "unpacking the kernel source",
        )?;
        let inner = staging.join(SOURCE_PACKAGE);
        let _ = fs::remove_dir_all(&src);
        fs::rename(&inner, &src).map_err(io_err(&src))?;
        let _ = fs::remove_dir_all(&staging);
        bar.finish_with_message("kernel source unpacked");
    }
    let obj = tree_root.join(format!("obj-{}", flavor.name()));
    fs::create_dir_all(&obj).map_err(io_err(&obj))?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", obj.display()))
            .args(args);
        c
    };
    // Configuration: allnoconfig + our fragments + olddefconfig.
    let frag_path = obj.join("cloude.fragment");
    fs::write(&frag_path, flavor.fragments().join("\n")).map_err(io_err(&frag_path))?;
    run_step(&mut make(&["-s", "allnoconfig"]), "make allnoconfig")?;
    run_step(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&obj)
            .args(["-m", "-O"])
            .arg(&obj)
            .arg(obj.join(".config"))
            .arg(&frag_path),
        "merging the kernel config fragment",
    )?;
    run_step(&mut make(&["-s", "olddefconfig"]), "make olddefconfig")?;
    let config = fs::read_to_string(obj.join(".config")).map_err(io_err(&obj))?;
    for missing in unmet_options(&flavor.fragments().join("\n"), &config) {
        tracing::warn!(option = %missing, "kernel option requested by the fragment is not in the final config");
    }
    if flavor == Flavor::Guest {
        let on = surface_left_on(&config);
        if !on.is_empty() {
            return Err(KernelError::Surface(on.join(", ")));
        }
    }

    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let bar = progress.bar(
        APPROX_BUILD_STEPS,
        format!("building the {} kernel ({jobs} jobs)", flavor.name()),
    );
    let mut child = make(&[&format!("-j{jobs}"), "bzImage"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| KernelError::Step {
            step: "make bzImage".into(),
            status: "could not start".into(),
            tail: e.to_string(),
        })?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(e) = stderr {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                lines.push(l);
                if lines.len() > 200 {
                    lines.remove(0);
                }
            }
        }
        lines
    });
    let mut last = Vec::new();
    if let Some(o) = child.stdout.take() {
        for l in BufReader::new(o).lines().map_while(Result::ok) {
            if l.trim_start().starts_with("CC") || l.trim_start().starts_with("AR") {
                bar.inc(1);
                if bar.position().is_multiple_of(250) {
                    progress.log_plain(format_args!(
                        "kernel build: {} of ~{APPROX_BUILD_STEPS} objects",
                        bar.position()
                    ));
                }
            }
            last.push(l);
            if last.len() > 40 {
                last.remove(0);
            }
        }
    }
    let status = child.wait().map_err(io_err(&obj))?;
    let errs = err_thread.join().unwrap_or_default();
    if !status.success() {
        bar.abandon_with_message("kernel build failed");
        last.extend(errs);
        return Err(KernelError::Step {
            step: "make bzImage".into(),
            status: status.to_string(),
            tail: tail(&last.join("\n"), 25),
        });
    }
    bar.finish_with_message(format!("{} kernel built", flavor.name()));

    // Publish atomically: copy into a temp dir beside the destination, then rename.
    let tmp = out.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    for (from, to) in [
        ("arch/x86/boot/bzImage", "bzImage"),
        ("vmlinux", "vmlinux"),
        (".config", "config"),
    ] {
        let f = obj.join(from);
        fs::copy(&f, tmp.join(to)).map_err(io_err(&f))?;
    }
    for f in ["bzImage", "vmlinux"] {
        let p = tmp.join(f);
        crate::integrity::seal(&p)
            .map_err(|e| KernelError::Io(p.clone(), std::io::Error::other(e.to_string())))?;
    }
    let _ = fs::remove_dir_all(out);
    fs::rename(&tmp, out).map_err(io_err(out))?;
    Ok(())
}

/// Options set to `y` in the fragment that the final config does not have (or `n` ones it does).
pub fn unmet_options(fragment: &str, config: &str) -> Vec<String> {
    let have: std::collections::HashMap<&str, &str> =
        config.lines().filter_map(|l| l.split_once('=')).collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| match *v {
            "n" => have.contains_key(k),
            _ => have.get(k) != Some(v),
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_flavor_and_version() {
        let a = cache_key(Flavor::Guest, "6.1.1");
        assert_eq!(a.len(), 16);
        assert_ne!(a, cache_key(Flavor::Guest, "6.1.2"));
        assert_ne!(a, cache_key(Flavor::Lab, "6.1.1"));
        assert_eq!(a, cache_key(Flavor::Guest, "6.1.1"));
    }

    #[test]
    fn guest_config_has_the_essentials() {
        for opt in [
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_VIRTIO_NET=y",
            "CONFIG_VIRTIO_BLK=y",
            "CONFIG_EROFS_FS=y",
            "CONFIG_OVERLAY_FS=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            "CONFIG_RD_ZSTD=y",
            "CONFIG_MEMCG=y",
            "CONFIG_CGROUP_PIDS=y",
            "CONFIG_MODULES=n",
        ] {
            assert!(GUEST_CONFIG.lines().any(|l| l == opt), "{opt}");
        }
    }

    #[test]
    fn surface_options_are_requested_off_and_detected() {
        for opt in SURFACE_OFF {
            let off = format!("{opt}=n");
            assert!(
                GUEST_CONFIG.lines().any(|l| l == off),
                "{off} in guest.config"
            );
        }
        for opt in SURFACE_ON {
            let on = format!("{opt}=y");
            assert!(
                GUEST_CONFIG.lines().any(|l| l == on),
                "{on} in guest.config"
            );
        }
        let cfg = "CONFIG_IO_URING=y\n# CONFIG_BPF_SYSCALL is not set\nCONFIG_KEXEC_FILE=y\nCONFIG_KEXEC_CORE=y\n";
        let mut expected = vec![
            "CONFIG_IO_URING",
            "CONFIG_KEXEC_FILE",
            "CONFIG_SECURITY_PERF_EVENTS_RESTRICT",
        ];
        expected.extend(FEATURES_ON);
        assert_eq!(surface_left_on(cfg), expected);
    }

    #[test]
    fn unmet_options_found() {
        let frag = "CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=y\n# x\n";
        let cfg = "CONFIG_A=y\nCONFIG_B=y\n";
        assert_eq!(unmet_options(frag, cfg), vec!["CONFIG_B=n", "CONFIG_C=y"]);
    }
}
