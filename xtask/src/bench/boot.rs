//! Boot-to-ready: `cloude-vmm` against QEMU microvm on the same KVM, kernel, initramfs and
//! command line, from process spawn to the agent's ready marker on the serial console.
//!
//! Runs where `/dev/kvm` boots Linux: inside the KVM lab on our machines (this module's
//! `bench-boot` entry point is what the lab executes), directly on hosts with VT-x/AMD-V.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::stats::{percentile, r1};

/// The same command line for both VMMs (no devices: the agent still prints its ready marker).
pub const CMDLINE: &str = "console=ttyS0 reboot=t panic=1 quiet loglevel=4";
const MARKER: &[u8] = b"CLOUDE-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Arguments of the hidden `bench-boot` subcommand.
#[derive(clap::Args, Debug)]
pub struct BootArgs {
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    #[arg(long, default_value = "cloude-vmm")]
    pub vmm: PathBuf,
}

/// Spawns `cmd`, returns ms until the marker shows up on its stdout (and the VMM's stderr).
fn time_to_marker(mut cmd: Command) -> anyhow::Result<(f64, String)> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout is piped")?;
    let mut stderr = child.stderr.take().context("stderr is piped")?;
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        let _ = err_tx.send(err);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(MARKER.len()).any(|w| w == MARKER) {
                        let _ = tx.send(t0.elapsed());
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&seen).to_string()
    });
    let got = rx.recv_timeout(BOOT_TIMEOUT);
    // SIGTERM first: cloude-vmm then prints its VM-exit counts (CLOUDE_VMM_STATS=1).
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    // A VMM stuck in the kernel (seen with nested KVM) may not die at once: do not hang on it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = err_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    match got {
        Ok(d) => Ok((d.as_secs_f64() * 1000.0, err)),
        Err(_) => bail!("no ready marker within {BOOT_TIMEOUT:?}; stderr: {err}"),
    }
}

fn cloude_vmm(a: &BootArgs) -> Command {
    let mut c = Command::new(&a.vmm);
    c.env("CLOUDE_VMM_STATS", "1")
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .args(["--memory-mib", "256", "--vcpus", "1", "--cmdline", CMDLINE]);
    c
}

fn qemu(a: &BootArgs) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-smp",
        "1",
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio", "-kernel"])
    .arg(&a.kernel)
    .arg("-initrd")
    .arg(&a.initrd)
    .args(["-append", CMDLINE]);
    c
}

/// Runs the comparison (alternating the two VMMs) and prints one JSON object.
pub fn run(a: BootArgs) -> anyhow::Result<i32> {
    for p in [&a.kernel, &a.initrd] {
        if !Path::new(p).is_file() {
            bail!("{} does not exist", p.display());
        }
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut exits = serde_json::Value::Null;
    // A run that misses the marker is recorded and skipped (nested KVM under emulation stalls
    // now and then), so one stall does not void the whole comparison.
    let mut failures = Vec::new();
    for i in 0..a.runs {
        match time_to_marker(cloude_vmm(&a)) {
            Ok((ms, err)) => {
                ours.push(ms);
                if let Some(line) = err.lines().rev().find(|l| l.contains("\"vm_exits\"")) {
                    exits = serde_json::from_str(line).unwrap_or(serde_json::Value::Null);
                }
            }
            Err(e) => failures.push(format!("run {i} cloude-vmm: {e:#}")),
        }
        match time_to_marker(qemu(&a)) {
            Ok((ms, _)) => theirs.push(ms),
            Err(e) => failures.push(format!("run {i} qemu microvm: {e:#}")),
        }
        eprintln!(
            "bench-boot: run {i}: cloude-vmm {:?} ms, qemu microvm {:?} ms",
            ours.last(),
            theirs.last()
        );
    }
    if ours.is_empty() || theirs.is_empty() {
        bail!("no successful boots: {}", failures.join("; "));
    }
    let (c, q) = (
        percentile(&ours, 50.0).unwrap_or(0.0),
        percentile(&theirs, 50.0).unwrap_or(0.0),
    );
    let v = json!({
        "cloude_p50": r1(c), "qemu_microvm_p50": r1(q),
        "ratio": if q > 0.0 { (c / q * 1000.0).round() / 1000.0 } else { 0.0 },
        "runs": a.runs, "cloude_samples": ours, "qemu_samples": theirs, "failed_runs": failures,
        "boot_exits": exits,
    });
    println!("{v}");
    Ok(0)
}
