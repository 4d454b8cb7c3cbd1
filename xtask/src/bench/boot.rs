//! Boot-to-ready: `cloude-vmm` against QEMU microvm on the same KVM, kernel, initramfs and
//! command line, from process spawn to the agent's ready marker on the serial console.
//!
//! Runs where `/dev/kvm` boots Linux: inside the KVM lab on our machines (this module's
//! `bench-boot` entry point is what the lab executes), directly on hosts with VT-x/AMD-V.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloude_protocol::vmm_wire;
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
    let restore = restore_to_ready(&a).unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    let v = json!({
        "cloude_p50": r1(c), "qemu_microvm_p50": r1(q),
        "ratio": if q > 0.0 { (c / q * 1000.0).round() / 1000.0 } else { 0.0 },
        "runs": a.runs, "cloude_samples": ours, "qemu_samples": theirs, "failed_runs": failures,
        "boot_exits": exits, "cloude_restore": restore,
    });
    println!("{v}");
    Ok(0)
}

/// cloude-vmm snapshot restore beside its cold boot, same image and shape: boots a template with
/// vsock and a control socket until the agent's ready marker, snapshots it, then times `runs`
/// restores from spawn until the agent answers `GET /v1/health` over vsock (stricter than the
/// boot's serial marker: the answer needs the restored devices and the guest's vsock reset).
fn restore_to_ready(a: &BootArgs) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir()?;
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap)?;
    let ctl = dir.path().join("ctl.sock");
    let mut t = cloude_vmm(a);
    t.arg("--vsock-cid")
        .arg("3")
        .arg("--vsock-uds")
        .arg(dir.path().join("t.sock"))
        .arg("--snapshot-control")
        .arg(&ctl);
    let t0 = Instant::now();
    let mut template = t
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the template")?;
    let mut out = BufReader::new(template.stdout.take().context("stdout is piped")?);
    let mut seen = Vec::new();
    while !seen.windows(MARKER.len()).any(|w| w == MARKER) {
        let mut buf = Vec::new();
        if out.read_until(b'\n', &mut buf)? == 0 || t0.elapsed() > BOOT_TIMEOUT {
            let _ = template.kill();
            bail!("the template never got ready");
        }
        seen.extend(buf);
    }
    let boot_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Drain the console so the guest never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let t1 = Instant::now();
    let mut c = UnixStream::connect(&ctl)?;
    c.write_all(vmm_wire::snapshot_line(&snap).as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&c).read_line(&mut answer)?;
    let _ = template.wait();
    if !vmm_wire::control_ok(&answer) {
        bail!("the template answered {answer:?}");
    }
    let snapshot_ms = t1.elapsed().as_secs_f64() * 1000.0;
    let mut samples = Vec::new();
    for i in 0..a.runs {
        let uds = dir.path().join(format!("r{i}.sock"));
        let t = Instant::now();
        let mut child = Command::new(&a.vmm)
            .arg("--restore")
            .arg(&snap)
            .args(["--memory-mib", "256", "--vcpus", "1", "--vsock-cid"])
            .arg((10 + i).to_string())
            .arg("--vsock-uds")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start a restore")?;
        let answered = loop {
            if t.elapsed() > BOOT_TIMEOUT {
                break false;
            }
            if health_over_vsock(&uds).is_ok() {
                break true;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let _ = child.kill();
        let _ = child.wait();
        if !answered {
            bail!("restore {i} never answered");
        }
        eprintln!("bench-boot: restore {i}: {ms:.1} ms");
        samples.push(ms);
    }
    let p50 = percentile(&samples, 50.0).unwrap_or(0.0);
    Ok(json!({
        "template_boot_ms": r1(boot_ms), "snapshot_ms": r1(snapshot_ms),
        "restore_to_ready_p50": r1(p50), "restore_to_ready_p90": percentile(&samples, 90.0).map(r1),
        "samples": samples,
    }))
}

/// `CONNECT <agent port>` through the hybrid-vsock socket, then `GET /v1/health`: Ok once
/// answered 200.
fn health_over_vsock(uds: &Path) -> anyhow::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(vmm_wire::connect_line(cloude_protocol::AGENT_VSOCK_PORT).as_bytes())?;
    // Byte by byte: what follows the line belongs to the HTTP exchange.
    let mut ok = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' && ok.len() < 64 {
        s.read_exact(&mut b)?;
        ok.push(b[0]);
    }
    let ok = String::from_utf8_lossy(&ok);
    if !vmm_wire::is_connected(&ok) {
        bail!("vsock handshake answered {ok:?}");
    }
    let a = cloude_api::client::exchange(&mut s, "GET", "/v1/health", None)?;
    if a.status != 200 {
        bail!("health answered {}", a.status);
    }
    Ok(())
}
