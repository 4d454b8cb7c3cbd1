//! virtio-serial: the agent channel of the QEMU fallback, where there is no vsock.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::FdStream;

/// Where the kernel lists virtio-serial ports and their names.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// The device node of the virtio-serial port called `name`, if there is one.
pub fn find_port(name: &str) -> Option<PathBuf> {
    find_port_in(Path::new(VIRTIO_PORTS), Path::new("/dev"), name)
}

fn find_port_in(class_dir: &Path, dev_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(class_dir).ok()?;
    entries.flatten().find_map(|e| {
        let port_name = fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim_end() == name).then(|| dev_dir.join(e.file_name()))
    })
}

/// Where the kernel lists virtio devices (`device` holds the virtio device id).
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";
/// Virtio device id of a console / virtio-serial device.
const VIRTIO_ID_CONSOLE: &str = "0x0003";
/// How often [`wait_for_port`] looks again.
const PORT_POLL: Duration = Duration::from_millis(10);

/// Whether the VM has a virtio-serial (console) device at all.
pub fn has_virtio_console() -> bool {
    let Ok(entries) = fs::read_dir(VIRTIO_DEVICES) else {
        return false;
    };
    entries.flatten().any(|e| {
        fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == VIRTIO_ID_CONSOLE)
    })
}

/// Waits (up to `timeout`) for the port called `name`: the driver creates ports only once
/// the device announces them, which can be after PID 1 started.
pub async fn wait_for_port(name: &str, timeout: Duration) -> Option<PathBuf> {
    let start = std::time::Instant::now();
    loop {
        if let Some(p) = find_port(name) {
            return Some(p);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(PORT_POLL).await;
    }
}

/// Opens the port (or any pollable character device / FIFO / socket path) as a stream.
pub fn open(path: &Path) -> io::Result<FdStream> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    FdStream::new(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let d = tempfile::tempdir().expect("tempdir");
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0\n"),
            ("vport0p2", "cloude.agent\n"),
        ] {
            fs::create_dir(d.path().join(port)).expect("mkdir");
            fs::write(d.path().join(port).join("name"), name).expect("write");
        }
        let found = find_port_in(d.path(), Path::new("/dev"), "cloude.agent");
        assert_eq!(found, Some(PathBuf::from("/dev/vport0p2")));
        assert_eq!(find_port_in(d.path(), Path::new("/dev"), "other"), None);
    }
}
