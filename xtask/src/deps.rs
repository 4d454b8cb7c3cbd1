//! Host packages and builds every xtask command needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Debian packages the project uses at build, test or run time, besides the kernel build's
/// (`cloude_image::kernel::BUILD_PACKAGES`, also installed on demand by cloude-image).
pub const APT_PACKAGES: &[&str] = &[
    // Images and compression.
    "zstd",
    "lz4",
    // Block-device language roots (`cloude-image build --format block`).
    "erofs-utils",
    // The QEMU fallback hypervisor and the KVM lab.
    "qemu-system-x86",
    "busybox-static",
    "iproute2",
    // The VMM's disk tests in the lab make EROFS images (`mkfs.erofs`).
    "erofs-utils",
    // The tcp transport's host-side rules around every tap (`nft`).
    "nftables",
    // Registry tests.
    "docker-registry",
    "skopeo",
    // Judge0 API tests: the shared store (each test starts its own cluster) and a venv for the
    // published Judge0 client.
    "postgresql",
    "python3-venv",
    // The PostgreSQL TLS test makes its CA and server certificate.
    "openssl",
    // The playground's tests drive a real browser (Selenium from PyPI, in the tests' venv).
    "chromium",
    "chromium-driver",
];

/// The workspace root (the parent of xtask's manifest dir).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Directory of release binaries: `target/x86_64-unknown-linux-gnu/release` under
/// `CARGO_TARGET_DIR` when it is set, else under the workspace's `target`.
pub fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let target = std::path::absolute(&target).unwrap_or(target);
    target.join("x86_64-unknown-linux-gnu").join("release")
}

/// Installs the missing Debian packages (root only; otherwise says what to install).
pub fn ensure_apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = cloude_image::kernel::BUILD_PACKAGES
        .iter()
        .chain(APT_PACKAGES)
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages: {} (install them as root)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `cargo build --release` of every binary.
pub fn build_release() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))
}

/// A `cargo` command in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command, failing with its description when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns the last line of its stdout.
pub fn last_line(cmd: &mut Command) -> anyhow::Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {desc}"))?;
    if !out.status.success() {
        bail!("{desc} failed ({})", out.status);
    }
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .last()
        .map(str::to_string)
        .with_context(|| format!("{desc} printed nothing"))
}
