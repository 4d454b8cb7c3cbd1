//! Runs the lab machine (L2) under QEMU TCG and relays the command's output and exit status.
//!
//! Channels: the serial console (kernel and init noise) goes to a log file; the command's stdout,
//! stderr and exit status travel over three virtio-serial ports, each backed by a Unix socket
//! that QEMU connects to at start-up. QEMU runs under `setpriv --pdeathsig KILL`, so it dies with
//! us even if we are killed outright; every other way out of [`run`] kills and reaps it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::script::{PORT_STATUS, PORT_STDERR, PORT_STDOUT};

/// How often the supervisor looks at QEMU, the clock and the signal flag.
const POLL: Duration = Duration::from_millis(20);
/// Largest exit-status message we accept from the machine.
const MAX_STATUS_BYTES: u64 = 256;

/// The kernel command line of the lab machine.
/// `reboot=t`: reset by triple fault at once (microvm has no i8042; `reboot=k` stalls).
/// `tsc=reliable`: TCG's TSC is the host's; without it the watchdog, comparing with jiffies under
/// emulation jitter, marks it unstable.
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 rdinit=/init printk.time=1 tsc=reliable";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start {0}: {1}")]
    Spawn(PathBuf, io::Error),
    #[error("I/O error at {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("waiting for QEMU failed: {0}")]
    Wait(io::Error),
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    /// Host TSC frequency for the lab kernel (see [`host_tsc_khz`]).
    pub tsc_khz: Option<u64>,
    pub timeout: Duration,
    /// Receives the serial console and QEMU's own messages.
    pub console_log: PathBuf,
    /// A private directory for the port sockets.
    pub socket_dir: PathBuf,
}

/// How the run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and exited with this code.
    Exited(i32),
    /// The timeout struck; QEMU was killed.
    TimedOut,
    /// We received this signal; QEMU was killed.
    Interrupted(i32),
    /// QEMU ended without an exit status from the command (boot failure, crash).
    NoStatus(String),
}

/// Kills and reaps QEMU when dropped, whatever path we leave by.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Escapes a value inside a QEMU `key=value,...` option list (commas are doubled).
fn opt_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The QEMU command line (without the `setpriv` wrapper).
pub fn qemu_args(cfg: &VmConfig) -> Vec<String> {
    let sock = |name: &str| opt_value(&cfg.socket_dir.join(format!("{name}.sock")));
    let mut a: Vec<String> = [
        "-M",
        "microvm,pit=on,pic=on,rtc=on,acpi=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("-m".into());
    a.push(format!("{}M", cfg.memory_mib));
    a.push("-kernel".into());
    a.push(cfg.kernel.display().to_string());
    a.push("-initrd".into());
    a.push(cfg.initrd.display().to_string());
    a.push("-append".into());
    let mut append = match cfg.tsc_khz {
        Some(khz) => format!("{KERNEL_CMDLINE} tsc_early_khz={khz}"),
        None => KERNEL_CMDLINE.to_string(),
    };
    // Extra kernel parameters for experiments with the lab machine itself.
    if let Some(extra) = std::env::var("CLOUDE_LAB_APPEND")
        .ok()
        .filter(|e| !e.is_empty())
    {
        append.push(' ');
        append.push_str(&extra);
    }
    a.push(append);
    a.push("-chardev".into());
    a.push(format!(
        "file,id=console,path={},append=on",
        opt_value(&cfg.console_log)
    ));
    a.push("-serial".into());
    a.push("chardev:console".into());
    a.push("-device".into());
    a.push("virtio-serial-device,max_ports=4".into());
    for (i, port) in [PORT_STDOUT, PORT_STDERR, PORT_STATUS].iter().enumerate() {
        a.push("-chardev".into());
        a.push(format!("socket,id=port{i},path={}", sock(port)));
        a.push("-device".into());
        a.push(format!("virtserialport,chardev=port{i},name={port}"));
    }
    a
}

/// Accepts QEMU's connection on `listener` (until `done`) and hands the stream to `sink`.
fn serve<T: Send + 'static>(
    listener: UnixListener,
    done: Arc<AtomicBool>,
    sink: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> JoinHandle<Option<T>> {
    std::thread::spawn(move || loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                return Some(sink(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if done.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    })
}

/// Copies `from` to `to` as data arrives, flushing each chunk.
fn relay(mut from: UnixStream, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = to.flush();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn listen(dir: &Path, name: &str) -> Result<UnixListener, VmError> {
    let path = dir.join(format!("{name}.sock"));
    let l = UnixListener::bind(&path).map_err(|e| VmError::Io(path.clone(), e))?;
    l.set_nonblocking(true).map_err(|e| VmError::Io(path, e))?;
    Ok(l)
}

/// Boots the machine and waits for it; `signal` becomes non-zero when we should stop.
pub fn run(cfg: &VmConfig, signal: &AtomicUsize) -> Result<Outcome, VmError> {
    let done = Arc::new(AtomicBool::new(false));
    let out = serve(listen(&cfg.socket_dir, PORT_STDOUT)?, done.clone(), |s| {
        relay(s, io::stdout())
    });
    let err = serve(listen(&cfg.socket_dir, PORT_STDERR)?, done.clone(), |s| {
        relay(s, io::stderr())
    });
    let status = serve(listen(&cfg.socket_dir, PORT_STATUS)?, done.clone(), |s| {
        let mut text = String::new();
        let _ = s.take(MAX_STATUS_BYTES).read_to_string(&mut text);
        text
    });

    let log = File::options()
        .create(true)
        .append(true)
        .open(&cfg.console_log)
        .map_err(|e| VmError::Io(cfg.console_log.clone(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| VmError::Io(cfg.console_log.clone(), e))?;
    let child = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&cfg.qemu)
        .args(qemu_args(cfg))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| VmError::Spawn(cfg.qemu.clone(), e));
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            done.store(true, Ordering::SeqCst);
            return Err(e);
        }
    };
    let mut guard = Guard(child);
    let started = Instant::now();
    let ended = loop {
        match guard.0.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => {}
            Err(e) => break Err(VmError::Wait(e)),
        }
        let sig = signal.load(Ordering::SeqCst);
        if sig != 0 {
            break Ok(ExitStatus::default());
        }
        if started.elapsed() >= cfg.timeout {
            break Ok(ExitStatus::default());
        }
        std::thread::sleep(POLL);
    };
    let killed_by_us = matches!(guard.0.try_wait(), Ok(None));
    drop(guard);
    done.store(true, Ordering::SeqCst);
    let _ = out.join();
    let _ = err.join();
    let status_text = status.join().ok().flatten().unwrap_or_default();
    let qemu_status = ended?;
    let sig = signal.load(Ordering::SeqCst);
    if killed_by_us && sig != 0 {
        return Ok(Outcome::Interrupted(sig as i32));
    }
    if killed_by_us {
        return Ok(Outcome::TimedOut);
    }
    Ok(match parse_status(&status_text) {
        Some(code) => Outcome::Exited(code),
        None => Outcome::NoStatus(format!("QEMU {qemu_status}")),
    })
}

/// The host's TSC frequency in kHz, which is also the lab machine's: TCG's `rdtsc` reads the
/// host's counter. The lab kernel cannot calibrate it reliably against the emulated PIT on a
/// busy host, and with an unknown TSC frequency KVM never enters its guests (the clock update
/// request is retried forever), so we pass it as `tsc_early_khz=`.
/// `CLOUDE_LAB_TSC_KHZ` overrides; else the `cpu MHz` of `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    if let Some(v) = std::env::var("CLOUDE_LAB_TSC_KHZ")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(v);
    }
    parse_cpu_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first `cpu MHz` of a `/proc/cpuinfo` text, in kHz.
fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split_once(':')?
        .1
        .trim()
        .parse()
        .ok()?;
    (mhz > 1.0).then(|| (mhz * 1000.0).round() as u64)
}

/// Parses the `exit N` line that `/init` writes on the status port.
pub fn parse_status(text: &str) -> Option<i32> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("exit "))
        .and_then(|n| n.trim().parse().ok())
}

/// The last `n` lines of the console log (lossy UTF-8, carriage returns removed).
pub fn log_tail(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsed() {
        assert_eq!(parse_status("exit 0\n"), Some(0));
        assert_eq!(parse_status("exit 127\n"), Some(127));
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("exit x\n"), None);
    }

    #[test]
    fn args_name_the_ports_and_files() {
        let cfg = VmConfig {
            qemu: "qemu".into(),
            kernel: "/k/bzImage".into(),
            initrd: "/t/initrd".into(),
            memory_mib: 2048,
            tsc_khz: Some(2_299_998),
            timeout: Duration::from_secs(1),
            console_log: "/l/console.log".into(),
            socket_dir: "/t".into(),
        };
        let a = qemu_args(&cfg).join(" ");
        assert!(a.contains("-m 2048M"));
        assert!(a.contains("-kernel /k/bzImage -initrd /t/initrd"));
        assert!(a.contains("socket,id=port0,path=/t/lab.stdout.sock"));
        assert!(a.contains("virtserialport,chardev=port2,name=lab.status"));
        assert!(a.contains("-accel tcg -cpu max"));
        assert!(a.contains(
            "reboot=t panic=-1 rdinit=/init printk.time=1 tsc=reliable tsc_early_khz=2299998"
        ));
    }

    #[test]
    fn cpu_khz_parsed() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2299.998\ncache size\t: 1 KB\n";
        assert_eq!(parse_cpu_khz(text), Some(2_299_998));
        assert_eq!(parse_cpu_khz("flags: x\n"), None);
    }
}
