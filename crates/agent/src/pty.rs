//! The agent's side of a pseudo-terminal (an interactive run with a `tty`): the master end as
//! tokio reader and writer. The program has the slave end as its standard streams and
//! controlling terminal (`sys::ChildSetup::controlling_tty`).

use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use cloude_protocol::TtySize;

use crate::transport::FdStream;
use nix::fcntl::{fcntl, FcntlArg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A new terminal of `size`: (master, slave).
pub fn open(size: TtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let ws = nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let r = nix::pty::openpty(Some(&ws), None).map_err(io::Error::from)?;
    for fd in [&r.master, &r.slave] {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).map_err(io::Error::from)?;
        let flags = nix::fcntl::FdFlag::from_bits_truncate(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    }
    Ok((r.master, r.slave))
}

/// One descriptor of the master end: the agent's [`FdStream`], except that `EIO` (every slave
/// descriptor closed) is the terminal's end of file.
pub struct Master(FdStream);

impl Master {
    /// Wraps a (duplicate of the) master descriptor.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Master(FdStream::new(fd)?))
    }
}

impl AsyncRead for Master {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.0).poll_read(cx, buf)) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

impl AsyncWrite for Master {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A terminal has no half-close: its end of input is a character (`^D`).
        Poll::Ready(Ok(()))
    }
}
