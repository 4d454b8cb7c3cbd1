//! The few system calls that need `unsafe`: child set-up after `fork`, `wait4`, the SIGCHLD
//! self-pipe, signal dispositions and `SIOCSIFFLAGS`. Everything else uses safe `nix` wrappers.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

/// Signals the agent ignores so that nothing (a program, a stray `kill -TERM 1`) can stop it.
/// They are reset to their defaults in every child.
const IGNORED_SIGNALS: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTSTP,
];

/// How a child set up by [`prepare_child`] runs.
#[derive(Clone, Copy, Debug)]
pub struct ChildSetup {
    /// An open `cgroup.procs` of the stage's cgroup (written from the child before `exec`).
    pub cgroup_procs: Option<RawFd>,
    pub uid: u32,
    pub gid: u32,
    /// Move the child into a fresh network namespace (only loopback, brought up) before it drops
    /// its privileges: the program then reaches no network interface of the VM.
    pub new_netns: bool,
    /// Resource limits set (soft and hard) before `exec`.
    pub rlimits: Rlimits,
    /// Standard input is a terminal's slave end: make it the new session's controlling
    /// terminal (`TIOCSCTTY`), so that Ctrl-C and job control reach the foreground program.
    pub controlling_tty: bool,
}

/// `setrlimit` values for a child, each `None` when left as inherited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rlimits {
    pub stack_bytes: Option<u64>,
    pub file_size_bytes: Option<u64>,
    /// `RLIMIT_CPU` seconds per process: the backstop of the stage's CPU limit where no cgroup
    /// counts it (`SIGXCPU` at the limit, `SIGKILL` a second later).
    pub cpu_seconds: Option<u64>,
}

/// Makes `cmd`'s child join the cgroup, start its own session, drop every privilege and restore
/// default signal dispositions before `exec`. `PR_SET_NO_NEW_PRIVS` is set in every child, so
/// neither the program nor anything it runs can gain privileges through `execve` (a set-id
/// file, file capabilities), whatever the image holds.
pub fn prepare_child(cmd: &mut Command, setup: ChildSetup) {
    let hook = move || -> io::Result<()> {
        // SAFETY: only async-signal-safe calls (signal, write, setsid, ioctl, setrlimit, prctl,
        // fchown, setgroups, setgid, setuid) on values copied into the closure; no allocation.
        unsafe {
            for sig in IGNORED_SIGNALS.iter().chain(&[libc::SIGPIPE]) {
                libc::signal(*sig, libc::SIG_DFL);
            }
            if let Some(fd) = setup.cgroup_procs {
                // Writing "0" to cgroup.procs moves the writer itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if setup.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            let limits = [
                (libc::RLIMIT_STACK, setup.rlimits.stack_bytes, 0),
                (libc::RLIMIT_FSIZE, setup.rlimits.file_size_bytes, 0),
                (libc::RLIMIT_CPU, setup.rlimits.cpu_seconds, 1),
            ];
            for (resource, value, hard_extra) in limits {
                if let Some(v) = value {
                    let l = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v.saturating_add(hard_extra),
                    };
                    if libc::setrlimit(resource, &l) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            if setup.new_netns {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                loopback_up()?;
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::geteuid() == 0 {
                // The stdio pipes are the agent's (root's) inodes: give them to the program, as a
                // terminal belongs to its user, so that `open("/dev/stderr")` (shell scripts,
                // yabasic, ...) works. The agent's own ends are separate descriptors.
                for fd in 0..3 {
                    libc::fchown(fd, setup.uid, setup.gid);
                }
            }
            if libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(setup.gid) != 0
                    || libc::setuid(setup.uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook above is async-signal-safe (see inside), as `pre_exec` requires.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sets `lo` up in the calling thread's network namespace with two ioctls (async-signal-safe: no
/// allocation, only syscalls on stack values).
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket/ioctl/close on a stack `ifreq` that outlives the calls; the fd is closed on
    // every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Whether this machine (the VM) has a network interface besides loopback.
pub fn has_external_interface() -> bool {
    std::fs::read_dir("/sys/class/net")
        .map(|d| d.flatten().any(|e| e.file_name() != "lo"))
        .unwrap_or(false)
}

/// Status of a child collected by [`wait4`].
#[derive(Clone, Copy, Debug)]
pub struct Waited {
    pub pid: i32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// User + system CPU time of the child and the descendants it reaped.
    pub cpu_us: u64,
    pub maxrss_kib: u64,
}

/// `wait4(pid, WNOHANG)`: `Ok(None)` when no matching child has exited yet.
pub fn wait4_nohang(pid: i32) -> io::Result<Option<Waited>> {
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is a plain C struct of integers; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for writes for the duration of the call.
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    let tv_us = |tv: libc::timeval| (tv.tv_sec as u64) * 1_000_000 + tv.tv_usec as u64;
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    Ok(Some(Waited {
        pid: r,
        code,
        signal,
        cpu_us: tv_us(ru.ru_utime) + tv_us(ru.ru_stime),
        maxrss_kib: u64::try_from(ru.ru_maxrss).unwrap_or(0),
    }))
}

/// Write end of the SIGCHLD self-pipe (-1 until installed).
static SIGCHLD_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = SIGCHLD_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: errno is saved and restored; write(2) on a non-blocking pipe is
        // async-signal-safe and the buffer is a valid one-byte static.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, b"c".as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// Installs a SIGCHLD handler that writes a byte to a pipe; returns the pipe's read end.
/// Call once per process.
pub fn install_sigchld_pipe() -> io::Result<OwnedFd> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is valid for two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fresh descriptors; we own them from here on.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The write end lives for the rest of the process (the handler may run at any time).
    let write_fd = std::os::fd::IntoRawFd::into_raw_fd(write);
    SIGCHLD_PIPE.store(write_fd, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; we fill handler, mask and flags before use.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as usize;
    sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
    if unsafe { libc::sigemptyset(&mut sa.sa_mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sa` is fully initialised; the handler only touches async-signal-safe state.
    if unsafe { libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read)
}

/// Ignores the signals that could otherwise stop the agent.
pub fn ignore_signals() {
    for sig in IGNORED_SIGNALS {
        // SAFETY: SIG_IGN installs no handler code; changing dispositions is process-wide and
        // harmless here.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

/// Sets `IFF_UP` (and `IFF_RUNNING`) on an interface, e.g. `lo`.
pub fn set_link_up(name: &str) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: plain socket(2) call; the result is checked and owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: `ifreq` is a plain C struct/union; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; SIOCGIFFLAGS fills ifru_flags.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just initialised the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: same valid ifreq, now carrying the new flags.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`, returning an owned descriptor.
pub fn accept_nonblocking(listener: RawFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{accept4, SockFlag};
    let fd = accept4(listener, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers an owned descriptor with the current tokio reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that it alone closes, and its
    // `as_raw_fd` always returns that same descriptor until the `AsyncFd` drops it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_run_with_no_new_privs() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep NoNewPrivs /proc/self/status"]);
        prepare_child(
            &mut cmd,
            ChildSetup {
                cgroup_procs: None,
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                new_netns: false,
                rlimits: Rlimits::default(),
                controlling_tty: false,
            },
        );
        let out = cmd.output().expect("run sh");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            ["NoNewPrivs:", "1"]
        );
    }

    #[test]
    fn rlimits_reach_the_program_and_cannot_be_raised() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "ulimit -s; ulimit -f; ulimit -t; ulimit -s 65536 2>/dev/null || echo refused",
        ]);
        prepare_child(
            &mut cmd,
            ChildSetup {
                cgroup_procs: None,
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                new_netns: false,
                rlimits: Rlimits {
                    stack_bytes: Some(4096 << 10),
                    file_size_bytes: Some(100 << 10),
                    cpu_seconds: Some(7),
                },
                controlling_tty: false,
            },
        );
        let out = cmd.output().expect("run sh");
        let text = String::from_utf8_lossy(&out.stdout);
        // dash and bash print KiB for -s, 512- or 1024-byte blocks for -f.
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "4096", "{text}");
        assert!(lines[1] == "200" || lines[1] == "100", "{text}");
        assert_eq!(lines[2], "7", "{text}");
        // Raising the soft limit past the hard one needs privileges no program keeps.
        if !nix::unistd::geteuid().is_root() {
            assert_eq!(lines[3], "refused", "{text}");
        }
    }
}

/// `struct rand_pool_info` of `<linux/random.h>` with room for [`MAX_WAKE_ENTROPY_BYTES`].
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; cloude_protocol::MAX_WAKE_ENTROPY_BYTES],
}

// RNDADDENTROPY is declared `_IOW('R', 0x03, int[2])`: the size in the number is the header's.
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    RandPoolInfo
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes `bytes` into the kernel's entropy pool, credited in full, and forces the CRNG to reseed
/// at once (`RNDADDENTROPY` + `RNDRESEEDCRNG` on `/dev/urandom`; needs `CAP_SYS_ADMIN`).
pub fn add_entropy_and_reseed(bytes: &[u8]) -> io::Result<()> {
    let mut info = RandPoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; cloude_protocol::MAX_WAKE_ENTROPY_BYTES],
    };
    let n = bytes.len().min(info.buf.len());
    info.buf[..n].copy_from_slice(&bytes[..n]);
    info.buf_size = libc::c_int::try_from(n).map_err(io::Error::other)?;
    info.entropy_count = info.buf_size * 8;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: the fd is open for the call; `info` is a live, properly laid out rand_pool_info
    // whose buf_size never exceeds its buffer.
    unsafe { rnd_add_entropy(f.as_raw_fd(), &info) }.map_err(io::Error::from)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { rnd_reseed_crng(f.as_raw_fd()) }.map_err(io::Error::from)?;
    Ok(())
}

/// Sets a terminal's size (`TIOCSWINSZ` on its master end): the kernel sends `SIGWINCH` to the
/// terminal's foreground process group.
pub fn set_winsize(master: std::os::fd::BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, a stack value that outlives the
    // call; the descriptor is borrowed, so it is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
