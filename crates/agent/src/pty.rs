//! The agent's side of a pseudo-terminal (an interactive run with a `tty`): the master end as
//! tokio reader and writer. The program has the slave end as its standard streams and
//! controlling terminal (`sys::ChildSetup::controlling_tty`).

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use cloude_protocol::TtySize;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
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

/// One descriptor of the master end, non-blocking, driven by tokio.
pub struct Master(AsyncFd<OwnedFd>);

impl Master {
    /// Wraps a (duplicate of the) master descriptor.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(Master(crate::sys::async_fd(fd)?))
    }
}

impl AsyncRead for Master {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match nix::unistd::read(guard.get_inner().as_raw_fd(), unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Every slave descriptor closed: the terminal's end of file.
                Err(nix::errno::Errno::EIO) => return Poll::Ready(Ok(())),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl AsyncWrite for Master {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match nix::unistd::write(guard.get_inner().as_fd(), data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
