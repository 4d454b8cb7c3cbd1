//! The `--snapshot-control` socket and the thread that takes the snapshot (see the contract in
//! [`crate::snapshot`]).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloude_protocol::vmm_wire;

use super::{DevicesState, VmState, VMM_VERSION};
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::Vm;
use crate::vstate::VmExit;

/// Longest command line accepted, newline included.
pub const MAX_LINE: usize = 4096;
/// A client that has not sent its line by then is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the vCPUs get to stop and save their state.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between kicks while waiting for the vCPUs to pause.
const KICK_INTERVAL: Duration = Duration::from_millis(20);
/// Flags the state and memory files are opened with (the snapshot thread's seccomp filter
/// allows `openat` with exactly these).
pub const CREATE_FLAGS: i32 = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;

/// Parses one command line (without its newline): `SNAPSHOT <absolute dir>`.
pub fn parse_command(line: &[u8]) -> Result<PathBuf, String> {
    let Some(rest) = line
        .strip_prefix(vmm_wire::SNAPSHOT_COMMAND.as_bytes())
        .and_then(|r| r.strip_prefix(b" "))
    else {
        return Err("unknown command (expected SNAPSHOT <dir>)".into());
    };
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    if rest.is_empty() {
        return Err("SNAPSHOT needs a directory".into());
    }
    if rest.contains(&0) || std::str::from_utf8(rest).is_err() {
        return Err("the directory is not a valid UTF-8 path".into());
    }
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(rest));
    if !dir.is_absolute() {
        return Err("the directory must be an absolute path".into());
    }
    Ok(dir)
}

/// Reads one line of at most [`MAX_LINE`] bytes (newline excluded from the result).
pub fn read_line(stream: &mut impl Read) -> Result<Vec<u8>, String> {
    let mut line = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err("the connection closed before a full line".into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("no command line within the time limit".into())
            }
            Err(e) => return Err(format!("cannot read the command: {e}")),
        };
        let chunk = &buf[..n];
        if let Some(pos) = chunk.iter().position(|b| *b == b'\n') {
            if line.len() + pos + 1 > MAX_LINE {
                return Err(format!("the command line is longer than {MAX_LINE} bytes"));
            }
            line.extend_from_slice(&chunk[..pos]);
            // Anything after the newline is a second command: refused.
            if pos + 1 != n {
                return Err("one command per connection".into());
            }
            return Ok(line);
        }
        line.extend_from_slice(chunk);
        if line.len() >= MAX_LINE {
            return Err(format!("the command line is longer than {MAX_LINE} bytes"));
        }
    }
}

/// Everything the snapshot thread needs.
pub struct Snapshotter {
    pub listener: UnixListener,
    pub vm: Arc<Vm>,
    pub tag: Option<String>,
    pub exit: Sender<VmExit>,
    pub pause: Arc<AtomicBool>,
    pub saved: Receiver<(u8, Result<VcpuState, String>)>,
    /// The vCPU threads, to kick out of KVM_RUN.
    pub vcpu_threads: Vec<libc::pthread_t>,
    pub serial: Arc<Mutex<SerialDevice<std::io::Stdout>>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The disks' shapes, recorded in the state.
    pub disks: Vec<crate::devices::virtio::block::DiskState>,
    /// Set when KVM's XSAVE area does not fit a snapshot (found before the filters).
    pub xsave_problem: Option<String>,
}

fn answer(s: &mut UnixStream, text: &str) {
    let _ = s.write_all(text.as_bytes());
    let _ = s.flush();
}

impl Snapshotter {
    /// Serves the socket until a snapshot is taken (then never returns: the main thread exits
    /// the process) or the listener fails.
    pub fn serve(self) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("cloude-vmm: the snapshot control socket failed: {e}");
                    return;
                }
            };
            let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
            let dir = match read_line(&mut stream).and_then(|l| parse_command(&l)) {
                Ok(d) => d,
                Err(e) => {
                    answer(&mut stream, &vmm_wire::control_error_line(&e));
                    continue;
                }
            };
            self.take(stream, &dir);
        }
    }

    /// Pauses the VM, writes the snapshot, answers and asks the main thread to exit.
    fn take(&self, mut stream: UnixStream, dir: &Path) -> ! {
        let exit = match self.write_snapshot(dir) {
            Ok(()) => {
                answer(&mut stream, vmm_wire::CONTROL_OK);
                VmExit::Stopped("snapshot taken")
            }
            Err(e) => {
                let e = e.replace('\n', " ");
                answer(&mut stream, &vmm_wire::control_error_line(&e));
                VmExit::Failed(format!("snapshot failed: {e}"))
            }
        };
        drop(stream);
        let _ = self.exit.send(exit);
        // The vCPUs stay paused and the devices locked until the process exits.
        loop {
            std::thread::park();
        }
    }

    fn pause_vcpus(&self) -> Result<Vec<VcpuState>, String> {
        self.pause.store(true, Ordering::SeqCst);
        let n = self.vcpu_threads.len();
        let mut states: Vec<Option<VcpuState>> = (0..n).map(|_| None).collect();
        let mut got = 0;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while got < n {
            for (i, t) in self.vcpu_threads.iter().enumerate() {
                if states[i].is_none() {
                    // SAFETY: the thread handles stay valid: vCPU threads are never joined and
                    // only end when the process does (or after sending their exit, in which
                    // case the VM is stopping anyway and the kick is harmless).
                    unsafe { libc::pthread_kill(*t, crate::vstate::vcpu::kick_signal()) };
                }
            }
            match self.saved.recv_timeout(KICK_INTERVAL) {
                Ok((i, r)) => {
                    let slot = states
                        .get_mut(usize::from(i))
                        .ok_or_else(|| format!("vCPU {i} is unknown"))?;
                    if slot.is_none() {
                        *slot = Some(r?);
                        got += 1;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "only {got} of {n} vCPUs paused within {PAUSE_TIMEOUT:?}"
                        ));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the vCPU threads ended".into())
                }
            }
        }
        Ok(states.into_iter().flatten().collect())
    }

    fn write_snapshot(&self, dir: &Path) -> Result<(), String> {
        if let Some(p) = &self.xsave_problem {
            return Err(p.clone());
        }
        // Both files first: a directory that is missing or not writable fails before the guest
        // is paused. The state is written last, so a state file that decodes means the memory
        // file is complete (an interrupted snapshot leaves an empty state: refused).
        let create = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))
        };
        let mut state_file = create("state")?;
        let memory_file = create("memory")?;
        let vcpus = self.pause_vcpus()?;
        // Quiesce the devices: with every transport and device locked, the device thread can
        // neither change device state nor touch guest memory. The guards are held until exit.
        let serial = lock(&self.serial);
        let transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
        let devices: Vec<_> = transports.iter().map(|t| t.device()).collect();
        let device_guards: Vec<_> = devices.iter().map(|d| lock(d)).collect();
        let virtio = transports
            .iter()
            .zip(&device_guards)
            .map(|(t, d)| t.save_with(&**d))
            .collect();
        let state = VmState {
            vmm_version: VMM_VERSION.to_string(),
            tag: self.tag.clone(),
            mem_size: vm_memory::GuestMemoryBackend::iter(&self.vm.mem)
                .map(vm_memory::GuestMemoryRegion::len)
                .sum(),
            vcpus,
            vm: self.vm.save_state()?,
            devices: DevicesState {
                serial: serial.save(),
                i8042: (),
                virtio,
                disks: self.disks.clone(),
            },
        };
        let bytes = super::encode(&state)?;
        super::memory::write_memory(&self.vm.mem, &memory_file)
            .map_err(|e| format!("cannot write the memory file: {e}"))?;
        state_file
            .write_all(&bytes)
            .and_then(|()| state_file.sync_all())
            .map_err(|e| format!("cannot write the state file: {e}"))?;
        // The guards go out of scope only when the process exits (take() never returns).
        std::mem::forget(device_guards);
        std::mem::forget(transports);
        std::mem::forget(serial);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_parsed_strictly() {
        assert_eq!(
            parse_command(b"SNAPSHOT /tmp/x").expect("ok"),
            PathBuf::from("/tmp/x")
        );
        assert_eq!(
            parse_command(b"SNAPSHOT /tmp/x\r").expect("ok"),
            PathBuf::from("/tmp/x")
        );
        for bad in [
            &b""[..],
            b"SNAPSHOT",
            b"SNAPSHOT ",
            b"snapshot /tmp",
            b"SNAPSHOT relative/dir",
            b"SNAPSHOT /tmp/\0x",
            b"SNAPSHOT /tmp/\xff",
            b"RESTORE /tmp",
            b"\x00\x01\x02",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_are_bounded_and_single() {
        let mut ok: &[u8] = b"SNAPSHOT /a\n";
        assert_eq!(read_line(&mut ok).expect("line"), b"SNAPSHOT /a");
        let long = vec![b'A'; MAX_LINE + 10];
        assert!(read_line(&mut long.as_slice())
            .expect_err("long")
            .contains("longer"));
        let mut long_nl = vec![b'A'; MAX_LINE];
        long_nl.push(b'\n');
        assert!(read_line(&mut long_nl.as_slice()).is_err());
        let mut two: &[u8] = b"SNAPSHOT /a\nSNAPSHOT /b\n";
        assert!(read_line(&mut two).is_err());
        let mut eof: &[u8] = b"SNAPSHOT /a";
        assert!(read_line(&mut eof).is_err());
    }

    /// Garbage, over-long and silent clients over a real socket: each gets ERR (or is dropped
    /// after the timeout) and the next client is still served.
    #[test]
    fn socket_refuses_garbage() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let mut answers = 0;
            while answers < 3 {
                let (mut s, _) = listener.accept().expect("accept");
                let r = read_line(&mut s).and_then(|l| parse_command(&l));
                if let Err(e) = r {
                    answer(&mut s, &vmm_wire::control_error_line(&e));
                }
                answers += 1;
            }
        });
        for input in [
            &b"HELLO\n"[..],
            &vec![b'x'; 3 * MAX_LINE],
            b"SNAPSHOT rel\n",
        ] {
            let mut c = UnixStream::connect(&path).expect("connect");
            let _ = c.write_all(input);
            let mut got = String::new();
            let _ = c.read_to_string(&mut got);
            assert!(got.starts_with("ERR "), "{got:?}");
            assert!(got.ends_with('\n') && got.lines().count() == 1, "{got:?}");
        }
        server.join().expect("server");
    }
}
