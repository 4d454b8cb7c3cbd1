//! Touching paths inside a VM's directory, which its jailed hypervisor (another uid, one that a
//! guest may have taken over) can write: it may swap any entry for a symlink to a host file, a
//! FIFO, a hard link, a socket of someone else's. The server (root) therefore never follows a
//! path there: it opens with `O_NOFOLLOW | O_NONBLOCK`, checks what it got with `fstat` (kind,
//! owner, link count, size), and acts on the descriptor (`fchown`, `fchmod`, `pread`), never
//! again on the path. Reads are bounded.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

/// What a file taken from a VM directory must be.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// The owner it must have (the VM's uid, or the server's for files the server made).
    pub uid: u32,
    /// The largest size accepted.
    pub max_bytes: u64,
}

fn refuse(path: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    )
}

/// Opens an existing regular file for reading without following a symlink or blocking on a
/// FIFO, and checks it: a regular file, owned by `expect.uid`, one link, at most
/// `expect.max_bytes`.
pub fn open_checked(path: &Path, expect: Expect) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(refuse(path, "not a regular file"));
    }
    if m.uid() != expect.uid {
        return Err(refuse(
            path,
            format_args!("owned by uid {}, not {}", m.uid(), expect.uid),
        ));
    }
    if m.nlink() != 1 {
        return Err(refuse(path, format_args!("has {} links", m.nlink())));
    }
    if m.len() > expect.max_bytes {
        return Err(refuse(
            path,
            format_args!("{} bytes, over {}", m.len(), expect.max_bytes),
        ));
    }
    Ok(f)
}

/// Creates a new file for the server (never an existing entry, never through a symlink).
pub fn create_new(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
}

/// The last `max` bytes of an open file, read at offsets (the descriptor's position is left
/// alone), as text.
pub fn tail(f: &File, max: u64) -> String {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let mut buf = vec![0u8; (len - start) as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], start + got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf.truncate(got);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Moves a file a hypervisor wrote (`from`, in its directory) to `to` (a directory only the
/// server writes), refusing anything but a regular file of `expect`; the result is root-owned,
/// mode 0444. Across file systems the bytes are copied from the checked descriptor.
pub fn import(from: &Path, to: &Path, expect: Expect) -> std::io::Result<()> {
    let src = open_checked(from, expect)?;
    let (dev, ino) = {
        let m = src.metadata()?;
        (m.dev(), m.ino())
    };
    let dst = match std::fs::rename(from, to) {
        Ok(()) => {
            // The entry renamed may not be the one checked (swapped in between): the same
            // inode, or nothing.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(to)?;
            let m = f.metadata()?;
            if (m.dev(), m.ino()) != (dev, ino) {
                let _ = std::fs::remove_file(to);
                return Err(refuse(from, "replaced while it was being moved"));
            }
            f
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let mut out = create_new(to)?;
            let copied = std::io::copy(&mut (&src).take(expect.max_bytes), &mut out);
            if let Err(e) = copied {
                let _ = std::fs::remove_file(to);
                return Err(e);
            }
            let _ = std::fs::remove_file(from);
            out
        }
        Err(e) => return Err(e),
    };
    seal(&dst)
}

/// Root-owned, read-only for everyone (through the descriptor).
pub fn seal(f: &File) -> std::io::Result<()> {
    nix::unistd::fchown(f.as_raw_fd(), Some(0.into()), Some(0.into()))?;
    nix::sys::stat::fchmod(
        f.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(0o444),
    )?;
    Ok(())
}

/// Creates the directory `path` (which must not exist) for a hypervisor of uid `uid`: made by
/// the server, then opened without following a link and checked to be the server's own before
/// it is handed over through the descriptor.
pub fn mkdir_for(path: &Path, uid: Option<u32>) -> std::io::Result<()> {
    std::fs::create_dir(path)?;
    let Some(uid) = uid else { return Ok(()) };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    if dir.metadata()?.uid() != nix::unistd::geteuid().as_raw() {
        return Err(refuse(path, "replaced before it was handed over"));
    }
    nix::unistd::fchown(dir.as_raw_fd(), Some(uid.into()), Some(uid.into()))?;
    Ok(())
}

/// Connects to a Unix socket a hypervisor created (its vsock muxer, QEMU's monitor), only if
/// the entry at `path` is a socket owned by `uid` (`None`: the server's own uid, unjailed): no
/// symlink to another socket on the host is ever followed. The connection goes through the
/// checked `O_PATH` descriptor (`/proc/self/fd/N`), so the entry cannot be swapped in between.
pub async fn connect_socket(
    path: &Path,
    uid: Option<u32>,
) -> std::io::Result<tokio::net::UnixStream> {
    let fd = open_path(path)?;
    let m = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(std::io::Error::from)?;
    if m.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(refuse(path, "not a socket"));
    }
    let want = uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    if m.st_uid != want {
        return Err(refuse(
            path,
            format_args!("owned by uid {}, not {want}", m.st_uid),
        ));
    }
    let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let s = tokio::net::UnixStream::connect(&via).await;
    drop(fd);
    s
}

fn open_path(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| refuse(path, "a NUL in the path"))?;
    let fd = nix::fcntl::open(
        c.as_c_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: `open` returned a new descriptor that nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn symlinks_fifos_devices_links_and_strangers_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let secret = d.path().join("secret");
        std::fs::write(&secret, "s3cret").expect("secret");
        let expect = Expect {
            uid: me(),
            max_bytes: 1 << 20,
        };
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).expect("symlink");
        assert!(open_checked(&link, expect).is_err(), "symlink");
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        let t = std::time::Instant::now();
        assert!(open_checked(&fifo, expect).is_err(), "fifo");
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "no hang");
        let zero = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        assert!(open_checked(&zero, expect).is_err(), "/dev/zero");
        assert!(open_checked(Path::new("/dev/zero"), expect).is_err());
        let hard = d.path().join("hard");
        std::fs::hard_link(&secret, &hard).expect("hard link");
        assert!(open_checked(&hard, expect).is_err(), "two links");
        std::fs::remove_file(&hard).expect("rm");
        let stranger = Expect {
            uid: me() + 1,
            ..expect
        };
        assert!(open_checked(&secret, stranger).is_err(), "owner");
        let small = Expect {
            max_bytes: 3,
            ..expect
        };
        assert!(open_checked(&secret, small).is_err(), "size");
        assert!(open_checked(&secret, expect).is_ok());
    }

    #[test]
    fn import_refuses_a_symlink_and_moves_a_real_file_sealed() {
        let d = tempfile::tempdir().expect("tmp");
        let secret = d.path().join("secret");
        std::fs::write(&secret, "s3cret").expect("secret");
        let out = d.path().join("out");
        std::fs::create_dir(&out).expect("out");
        let expect = Expect {
            uid: me(),
            max_bytes: 1 << 20,
        };
        let link = d.path().join("memory");
        std::os::unix::fs::symlink(&secret, &link).expect("symlink");
        assert!(import(&link, &out.join("memory"), expect).is_err());
        assert!(!out.join("memory").exists());
        std::fs::remove_file(&link).expect("rm");
        std::fs::write(&link, "guest memory").expect("file");
        import(&link, &out.join("memory"), expect).expect("import");
        let m = std::fs::symlink_metadata(out.join("memory")).expect("meta");
        assert!(m.file_type().is_file());
        assert_eq!(m.mode() & 0o777, 0o444);
        assert_eq!(
            std::fs::read_to_string(out.join("memory")).expect("read"),
            "guest memory"
        );
    }

    #[test]
    fn tail_reads_the_end_through_the_descriptor() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("log");
        let f = create_new(&p).expect("create");
        f.write_all_at(b"0123456789", 0).expect("write");
        // The path now names something else: the descriptor still reads the original.
        std::fs::remove_file(&p).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", &p).expect("symlink");
        assert_eq!(tail(&f, 4), "6789");
        assert!(create_new(&p).is_err(), "never through an existing entry");
    }

    #[tokio::test]
    async fn a_symlink_to_another_socket_is_never_connected() {
        let d = tempfile::tempdir().expect("tmp");
        let real = d.path().join("real.sock");
        let _l = std::os::unix::net::UnixListener::bind(&real).expect("bind");
        let link = d.path().join("qmp.sock");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(connect_socket(&link, None).await.is_err());
        assert!(connect_socket(&real, Some(me() + 1)).await.is_err());
        assert!(connect_socket(&real, None).await.is_ok());
    }
}
