//! virtio-serial: the agent channel of the QEMU fallback, where there is no vsock.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

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
