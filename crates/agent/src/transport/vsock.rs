//! AF_VSOCK: the HTTP listener on [`AGENT_VSOCK_PORT`] and the readiness connection to the host.

use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};

use cloude_protocol::ready_line;
use nix::sys::socket::{
    bind, connect, getpeername, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use tokio::io::unix::AsyncFd;

use super::FdStream;
use crate::sys;

/// Any local CID (the guest's own).
const VMADDR_CID_ANY: u32 = u32::MAX;
/// The host's CID.
pub const VMADDR_CID_HOST: u32 = 2;
/// Pending connections queued by the kernel.
const BACKLOG: i32 = 16;

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` of any local CID. Fails when the VM has no vsock device.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(BACKLOG).map_err(io::Error::from)?)?;
        Ok(VsockListener {
            fd: crate::sys::async_fd(fd)?,
        })
    }

    /// Waits for the next connection; returns it with the peer's CID.
    pub async fn accept(&self) -> io::Result<(FdStream, u32)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::accept_nonblocking(fd.get_ref().as_raw_fd())) {
                Ok(res) => {
                    let fd = res?;
                    let peer: VsockAddr = getpeername(fd.as_raw_fd())?;
                    return Ok((FdStream::new(fd)?, peer.cid()));
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// Connects to the host (CID 2) on `port` and writes the ready line. Blocking (the kernel's
/// vsock connect timeout bounds it); run it on a blocking thread.
pub fn announce_ready(port: u32) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_HOST, port))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(ready_line().as_bytes())
}
