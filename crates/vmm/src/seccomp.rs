//! Seccomp filters, one allowlist per thread kind (as Firecracker does): the device event loop
//! installs its own before it handles any guest event, every vCPU thread its own right before its
//! first `KVM_RUN`, and the main thread its own once every other thread is running (threads
//! inherit the filter of the thread that creates them, so the main thread's comes last).
//!
//! Anything outside the allowlist traps: the `SIGSYS` handler writes
//! [`cloude_protocol::SECCOMP_KILL_MARK`] and the call's number to stderr (the console) and the
//! process then dies by `SIGSYS`. `--no-seccomp` turns the filters off for debugging only.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which filter a thread gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Waits for the VM to end, then cleans up and exits.
    Main,
    /// Runs `KVM_RUN` and emulates port and MMIO accesses (serial, i8042, virtio-mmio registers).
    Vcpu,
    /// The device event loop: virtio queues, vsock sockets, the tap, the disks.
    Devices,
    /// The `--snapshot-control` socket: reads one command, pauses the vCPUs (signals), reads
    /// the VM's KVM state and writes the state and memory files.
    Snapshot,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, String),
    #[error("cannot install the {0:?} seccomp filter: {1}")]
    Install(ThreadKind, String),
}

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`): the only KVM ioctl a vCPU thread makes once running.
const KVM_RUN: u64 = 0xae80;
/// `FIONBIO`: how the standard library makes accepted and connected sockets non-blocking.
const FIONBIO: u64 = 0x5421;

/// Linux `_IOC(dir, KVMIO, nr, size)`.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn kvm_ior<T>(nr: u64) -> u64 {
    kvm_ioc(IOC_READ, nr, std::mem::size_of::<T>())
}
const fn kvm_iowr<T>(nr: u64) -> u64 {
    kvm_ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>())
}

/// The vCPU ioctls that read state, made by a vCPU thread on itself when it pauses for a
/// snapshot (`vstate::vcpu::save_state`).
const VCPU_SAVE_IOCTLS: &[u64] = &[
    kvm_ior::<kvm_bindings::kvm_regs>(0x81),  // KVM_GET_REGS
    kvm_ior::<kvm_bindings::kvm_sregs>(0x83), // KVM_GET_SREGS
    kvm_iowr::<kvm_bindings::kvm_msrs>(0x88), // KVM_GET_MSRS
    kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e), // KVM_GET_LAPIC
    kvm_iowr::<kvm_bindings::kvm_cpuid2>(0x91), // KVM_GET_CPUID2
    kvm_ior::<kvm_bindings::kvm_mp_state>(0x98), // KVM_GET_MP_STATE
    kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f), // KVM_GET_VCPU_EVENTS
    kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1), // KVM_GET_DEBUGREGS
    kvm_ioc(0, 0xa3, 0),                      // KVM_GET_TSC_KHZ
    kvm_ior::<kvm_bindings::kvm_xsave>(0xa4), // KVM_GET_XSAVE
    kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6),  // KVM_GET_XCRS
];

/// The VM ioctls the snapshot thread makes (`Vm::save_state`).
const VM_SAVE_IOCTLS: &[u64] = &[
    kvm_iowr::<kvm_bindings::kvm_irqchip>(0x62), // KVM_GET_IRQCHIP
    kvm_ior::<kvm_bindings::kvm_clock_data>(0x7c), // KVM_GET_CLOCK
    kvm_ior::<kvm_bindings::kvm_pit_state2>(0x9f), // KVM_GET_PIT2
];

/// System calls every thread makes (memory, locks, signals, its own exit, the console).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_restart_syscall,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&nr| (nr, Vec::new())).collect();
    let arg_eq = |idx: u8, v: u64| -> Result<SeccompRule, String> {
        let c = SeccompCondition::new(idx, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            .map_err(|e| e.to_string())?;
        SeccompRule::new(vec![c]).map_err(|e| e.to_string())
    };
    match kind {
        ThreadKind::Main => {
            // Removing the vsock socket files at exit.
            m.insert(libc::SYS_unlink, Vec::new());
            m.insert(libc::SYS_unlinkat, Vec::new());
        }
        ThreadKind::Vcpu => {
            let mut ioctls = vec![arg_eq(1, KVM_RUN)?];
            for nr in VCPU_SAVE_IOCTLS {
                ioctls.push(arg_eq(1, *nr)?);
            }
            m.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadKind::Snapshot => {
            for nr in [
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_setsockopt,
                libc::SYS_ftruncate,
                libc::SYS_pwrite64,
                libc::SYS_fsync,
                libc::SYS_tgkill,
            ] {
                m.insert(nr, Vec::new());
            }
            // The state and memory files, created with exactly these flags.
            let create = crate::snapshot::control::CREATE_FLAGS as u64;
            m.insert(libc::SYS_openat, vec![arg_eq(2, create)?]);
            let mut ioctls = Vec::new();
            for nr in VM_SAVE_IOCTLS {
                ioctls.push(arg_eq(1, *nr)?);
            }
            m.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadKind::Devices => {
            for nr in [
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_readv,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_fcntl,
                // virtio-blk: positional reads and writes on the disks, FLUSH.
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_fdatasync,
            ] {
                m.insert(nr, Vec::new());
            }
            // Unix sockets only (guest-initiated vsock connections to `<uds>_<port>`).
            m.insert(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
            m.insert(libc::SYS_ioctl, vec![arg_eq(1, FIONBIO)?]);
        }
    }
    Ok(m)
}

/// The compiled filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |e: String| SeccompError::Build(kind, e);
    let f = SeccompFilter::new(
        rules(kind).map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(f).map_err(|e| build(e.to_string()))
}

/// Installs the filter for `kind` on the calling thread.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind)?;
    warm_allocator();
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(kind, e.to_string()))
}

/// Keeps glibc's allocator from opening files once the filters are in: with more than one
/// arena, shrinking a thread arena's heap after large frees reads
/// `/proc/sys/vm/overcommit_memory` (`openat`, which no allowlist has; found by the lab's vsock
/// flood test, where the device thread frees megabytes of reset connections' buffers). One arena
/// (the main one, which trims with `brk`) never does; the VMM's threads barely allocate on their
/// hot paths, so sharing it costs nothing measurable. Call before any thread is started.
#[allow(unsafe_code)]
pub fn prepare_allocator() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

fn warm_allocator() {
    // A thread's first allocation sets up its allocator state (tcache): done before its filter.
    let v: Vec<u8> = Vec::with_capacity(64);
    std::hint::black_box(&v);
}

/// Offset of `si_syscall` in x86_64's `siginfo_t` (after `si_signo`, `si_errno`, `si_code`,
/// padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; `si_syscall` is an int at this
    // offset of the x86_64 layout.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // Format without allocating (signal context).
    let mark = cloude_protocol::SECCOMP_KILL_MARK.as_bytes();
    let mut buf = [0u8; 96];
    let mut len = 0;
    for &b in mark.iter().take(buf.len() - 16) {
        buf[len] = b;
        len += 1;
    }
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        buf[len] = b'-';
        len += 1;
    }
    while d > 0 {
        d -= 1;
        buf[len] = digits[d];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) and syscall(2) are async-signal-safe; `buf` is ours. SIGSYS is blocked
    // while this handler runs, so the forbidden call below makes the kernel kill the process
    // with SIGSYS (a blocked SIGSYS from seccomp is forced to its default action).
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0);
        // Not reached unless kexec_load was allowed: end the process anyway.
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Installs the `SIGSYS` reporter (process-wide; before any filter).
pub fn install_reporter() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; we set a handler with the
    // SA_SIGINFO signature and an empty mask.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(SeccompError::Install(
            ThreadKind::Main,
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(VCPU_SAVE_IOCTLS[0], 0x8090_ae81); // KVM_GET_REGS
        assert_eq!(VCPU_SAVE_IOCTLS[1], 0x8138_ae83); // KVM_GET_SREGS
        assert_eq!(VCPU_SAVE_IOCTLS[2], 0xc008_ae88); // KVM_GET_MSRS
        assert_eq!(VCPU_SAVE_IOCTLS[8], 0xaea3); // KVM_GET_TSC_KHZ
        assert_eq!(VCPU_SAVE_IOCTLS[9], 0x9000_aea4); // KVM_GET_XSAVE
        assert_eq!(VM_SAVE_IOCTLS[0], 0xc208_ae62); // KVM_GET_IRQCHIP
        assert_eq!(VM_SAVE_IOCTLS[1], 0x8030_ae7c); // KVM_GET_CLOCK
    }

    #[test]
    fn every_filter_compiles() {
        for k in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Devices,
            ThreadKind::Snapshot,
        ] {
            assert!(!filter(k).expect("compiles").is_empty());
        }
    }

    /// The device thread's filter lets the block device do its I/O: `pread64`, `pwrite64` and
    /// `fdatasync` on a disk succeed under it (in a child process).
    #[test]
    fn the_device_filter_allows_disk_io() {
        use std::os::fd::AsRawFd;
        let disk = tempfile::tempfile().expect("tmp");
        disk.set_len(4096).expect("size");
        let fd = disk.as_raw_fd();
        let prog = filter(ThreadKind::Devices).expect("compiles");
        // SAFETY: the test process forks; the child only makes raw calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let ok = install_reporter().is_ok() && seccompiler::apply_filter(&prog).is_ok();
            let mut buf = [7u8; 512];
            // SAFETY: raw calls on an fd the child inherited and a buffer it owns.
            let io = unsafe {
                libc::pwrite64(fd, buf.as_ptr().cast(), 512, 1024) == 512
                    && libc::pread64(fd, buf.as_mut_ptr().cast(), 512, 0) == 512
                    && libc::fdatasync(fd) == 0
            };
            // SAFETY: leaving the child.
            unsafe {
                libc::_exit(if !ok {
                    3
                } else if io {
                    0
                } else {
                    4
                })
            };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        let mut back = [0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(&disk, &mut back, 1024).expect("read");
        assert_eq!(back, [7u8; 512], "the child's write landed");
    }

    #[test]
    fn a_forbidden_call_kills_the_thread_group_by_sigsys() {
        // In a child process: install the reporter and the main filter, then make a call the
        // filter forbids (a socket that is not AF_UNIX). The filter is built before the fork:
        // the child of a multi-threaded test process must not allocate.
        let prog = filter(ThreadKind::Main).expect("compiles");
        // SAFETY: the test process forks; the child only makes raw calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let ok = install_reporter().is_ok() && seccompiler::apply_filter(&prog).is_ok();
            if !ok {
                // SAFETY: leaving the child.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: a plain system call; the filter stops it.
            unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
    }

    /// Runs `call` in a child process under `kind`'s filter (built before the fork: the child of
    /// a multi-threaded test process must not allocate); returns the child's wait status. The
    /// child exits 0 when `call` returned true, 4 when false, 3 when the filter did not install.
    fn under_filter(kind: ThreadKind, call: &dyn Fn() -> bool) -> i32 {
        let prog = filter(kind).expect("compiles");
        // SAFETY: the test process forks; the child only makes raw calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let ok = install_reporter().is_ok() && seccompiler::apply_filter(&prog).is_ok();
            let code = if !ok {
                3
            } else if call() {
                0
            } else {
                4
            };
            // SAFETY: leaving the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_ok(status: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    /// Each thread's own rules, driven: what its allowlist names passes, the same call with
    /// another argument dies by SIGSYS.
    #[test]
    fn each_thread_kind_refuses_what_its_rules_do_not_name() {
        let tmp = tempfile::tempdir().expect("tmp");
        let state =
            std::ffi::CString::new(tmp.path().join("state").to_str().expect("utf-8 temp path"))
                .expect("path");
        let passwd = std::ffi::CString::new("/etc/passwd").expect("path");
        let create = crate::snapshot::control::CREATE_FLAGS;
        let unix_socket = || {
            // SAFETY: a plain system call on constants; nothing is allocated after the fork.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0 }
        };
        let inet_socket = || {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 }
        };
        let fionbio = || {
            let mut on: libc::c_int = 1;
            // SAFETY: an ioctl on fd 0 with a pointer to a live local.
            unsafe { libc::ioctl(0, libc::FIONBIO, &mut on) == 0 }
        };
        let winsize = || {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: an ioctl on fd 0 with a pointer to a live local.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
            true
        };
        let create_state = || {
            // SAFETY: openat with a NUL-terminated path made before the fork.
            unsafe { libc::openat(libc::AT_FDCWD, state.as_ptr(), create, 0o600) >= 0 }
        };
        let read_passwd = || {
            // SAFETY: as above.
            unsafe { libc::openat(libc::AT_FDCWD, passwd.as_ptr(), libc::O_RDONLY) >= 0 }
        };
        let cases: [(ThreadKind, &str, &dyn Fn() -> bool, bool); 8] = [
            (ThreadKind::Devices, "socket(AF_UNIX)", &unix_socket, true),
            (ThreadKind::Devices, "socket(AF_INET)", &inet_socket, false),
            (ThreadKind::Devices, "ioctl(FIONBIO)", &fionbio, true),
            (ThreadKind::Devices, "ioctl(TIOCGWINSZ)", &winsize, false),
            (
                ThreadKind::Snapshot,
                "openat(CREATE_FLAGS)",
                &create_state,
                true,
            ),
            (
                ThreadKind::Snapshot,
                "openat(O_RDONLY)",
                &read_passwd,
                false,
            ),
            (ThreadKind::Vcpu, "ioctl(FIONBIO)", &fionbio, false),
            (ThreadKind::Main, "openat(O_RDONLY)", &read_passwd, false),
        ];
        for (kind, what, call, allowed) in cases {
            let status = under_filter(kind, call);
            if allowed {
                assert!(exited_ok(status), "{kind:?}: {what} status {status:#x}");
            } else {
                assert!(
                    killed_by_sigsys(status),
                    "{kind:?}: {what} not killed by SIGSYS (status {status:#x})"
                );
            }
        }
    }
}
