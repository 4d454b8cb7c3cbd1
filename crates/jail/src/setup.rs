//! The jail step itself (see the crate documentation for the order and the reasons).

use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::{Spec, HOSTNAME, SETUP_FAILED};

/// The child's pid, for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// A failed step: what was being done, and why it failed.
struct StepError(String);

fn step<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, StepError> {
    r.map_err(|e| StepError(format!("{what}: {e}")))
}

pub(crate) fn run(spec: &Spec) -> i32 {
    // Whoever started the jailer (the server) is the one it must not outlive.
    let starter = nix::unistd::getppid();
    if let Err(StepError(e)) = die_with(starter) {
        eprintln!("cloude-jail: {e}");
        return SETUP_FAILED;
    }
    match prepare(spec) {
        Ok((exe, pipe_r, pipe_w)) => fork_and_wait(spec, exe, pipe_r, pipe_w, starter),
        Err(StepError(e)) => {
            eprintln!("cloude-jail: {e}");
            SETUP_FAILED
        }
    }
}

/// What the jailer does before forking: cgroups, the binary, the namespaces.
fn prepare(spec: &Spec) -> Result<(Option<File>, OwnedFd, OwnedFd), StepError> {
    // No core dumps, from either process (a hypervisor killed by SIGSYS would otherwise dump).
    step("set RLIMIT_CORE", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    let me = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        step(
            &format!("join the cgroup {}", procs.display()),
            std::fs::write(procs, &me),
        )?;
    }
    let exe = match &spec.exec {
        Some(p) => Some(step(&format!("open {}", p.display()), File::open(p))?),
        None => None,
    };
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if !spec.keep_netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    step("unshare the namespaces", nix::sched::unshare(flags))?;
    let (r, w) = step("create a pipe", nix::unistd::pipe())?;
    Ok((exe, r, w))
}

/// Arms `PR_SET_PDEATHSIG` (SIGKILL) and checks that the process that started us is still our
/// parent: if it died before the signal was armed, we were re-parented and no signal will come.
/// Every credential change (setresuid, setresgid, setgroups) clears the parent-death signal,
/// so this runs again after each one.
fn die_with(starter: Pid) -> Result<(), StepError> {
    step(
        "set the parent-death signal",
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL),
    )?;
    if nix::unistd::getppid() != starter {
        return Err(StepError(format!(
            "the process that started the jailer ({starter}) has exited"
        )));
    }
    Ok(())
}

fn fork_and_wait(
    spec: &Spec,
    exe: Option<File>,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    starter: Pid,
) -> i32 {
    // SAFETY: the jailer is single-threaded, so the child may run any code after fork.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("cloude-jail: fork: {e}");
            SETUP_FAILED
        }
        Ok(ForkResult::Child) => {
            drop(pipe_w);
            let err = child(spec, exe, pipe_r);
            let _ = writeln!(std::io::stderr(), "cloude-jail: {}", err.0);
            // SAFETY: _exit ends the process at once; nothing is left to clean up in the child.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(pipe_r);
            drop(exe);
            parent(spec, child, pipe_w, starter)
        }
    }
}

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and touches no memory.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The jailer's parent half: forwards termination signals, waits, and ends as the child ended.
fn parent(spec: &Spec, child: Pid, pipe_w: OwnedFd, starter: Pid) -> i32 {
    CHILD.store(child.as_raw(), Ordering::Relaxed);
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only calls kill(2), which is async-signal-safe.
        let _ = unsafe { signal::signal(sig, SigHandler::Handler(forward)) };
    }
    // The parent has nothing left to do as root either.
    // Dropping the uid cleared the parent-death signal: re-arm it, so that the jailer (and with
    // it the hypervisor, whose own parent-death signal points at the jailer) dies with the
    // server even when the server is killed with SIGKILL.
    if let Err(StepError(e)) = drop_privileges(spec).and_then(|()| die_with(starter)) {
        eprintln!("cloude-jail: (waiting parent) {e}");
        let _ = signal::kill(child, Signal::SIGKILL);
    }
    let status = loop {
        match waitpid(child, None) {
            Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("cloude-jail: waitpid: {e}");
                break SETUP_FAILED;
            }
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // End by the same signal, so that the server sees how the hypervisor died.
                // SAFETY: restoring the default disposition of a signal.
                let _ = unsafe { signal::signal(sig, SigHandler::SigDfl) };
                let mut set = signal::SigSet::empty();
                set.add(sig);
                let _ = signal::sigprocmask(signal::SigmaskHow::SIG_UNBLOCK, Some(&set), None);
                let _ = signal::raise(sig);
                break 128 + sig as i32;
            }
            Ok(_) => continue,
        }
    };
    drop(pipe_w);
    status
}

/// The child half: root, mounts, limits, identity, then the hypervisor. Returns only on error.
fn child(spec: &Spec, exe: Option<File>, parent_alive: OwnedFd) -> StepError {
    match build(spec) {
        Ok(()) => {}
        Err(e) => return e,
    }
    if let Err(e) = drop_privileges(spec) {
        return e;
    }
    // Die with the jailer (set after the uid change, which clears it). If the jailer is
    // already gone, its end of the pipe is closed.
    if let Err(e) = step(
        "set the parent-death signal",
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL),
    ) {
        return e;
    }
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&parent_alive),
        nix::poll::PollFlags::POLLIN,
    )];
    if matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0) {
        return StepError("the jailer exited before the hypervisor started".into());
    }
    drop(parent_alive);
    if let Err(e) = verify_unprivileged() {
        return e;
    }
    let Some(exe) = exe else {
        // Probe: everything worked up to the exec.
        // SAFETY: _exit ends the process at once.
        unsafe { libc::_exit(0) }
    };
    let name = spec
        .exec
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_else(|| b"hypervisor".to_vec());
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| StepError("an argument has a NUL".into()));
    let mut argv = Vec::with_capacity(spec.args.len() + 1);
    let mut envp = Vec::with_capacity(spec.env.len());
    let mut build_vectors = || -> Result<(), StepError> {
        argv.push(cstr(&name)?);
        for a in &spec.args {
            argv.push(cstr(a.as_bytes())?);
        }
        for e in &spec.env {
            envp.push(cstr(e.as_bytes())?);
        }
        Ok(())
    };
    if let Err(e) = build_vectors() {
        return e;
    }
    match nix::unistd::fexecve(exe.as_raw_fd(), &argv, &envp) {
        Ok(never) => match never {},
        Err(e) => StepError(format!("exec {}: {e}", String::from_utf8_lossy(&name))),
    }
}

/// Mounts the jail's root and enters it.
fn build(spec: &Spec) -> Result<(), StepError> {
    // Nothing done in this namespace propagates back to the host.
    step(
        "make the mounts private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    let root = &spec.root;
    step(
        &format!("mount the jail's tmpfs on {}", root.display()),
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            // Not nodev: the jail's own device nodes live here (every bind is nodev itself).
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("size=1m,nr_inodes=256,mode=755"),
        ),
    )?;
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let rw = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (list, flags) in [(&spec.bind_ro, ro), (&spec.bind_rw, rw)] {
        for pair in list.chunks(2) {
            if let [src, dst] = pair {
                bind(root, src, dst, flags)?;
            }
        }
    }
    for pair in spec.devices.chunks(2) {
        if let [src, dst] = pair {
            device(root, src, dst, spec.uid, spec.gid)?;
        }
    }
    for pair in spec.symlink.chunks(2) {
        if let [target, link] = pair {
            let at = inside(root, link);
            mkdirs(at.parent())?;
            step(
                &format!("link {}", link.display()),
                std::os::unix::fs::symlink(target, &at),
            )?;
        }
    }
    step("set the hostname", nix::unistd::sethostname(HOSTNAME))?;
    enter(root)?;
    step(
        "make the jail's root read-only",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            // Still not nodev: /dev/kvm is a node of this tmpfs.
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    step("set RLIMIT_NOFILE", {
        setrlimit(Resource::RLIMIT_NOFILE, spec.max_files, spec.max_files)
    })?;
    step(
        "set RLIMIT_FSIZE",
        setrlimit(
            Resource::RLIMIT_FSIZE,
            spec.max_file_bytes,
            spec.max_file_bytes,
        ),
    )?;
    step(
        "set RLIMIT_NPROC",
        setrlimit(Resource::RLIMIT_NPROC, spec.max_procs, spec.max_procs),
    )?;
    // A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the hypervisor.
    // SAFETY: setting a disposition to SIG_IGN runs no code of ours.
    step("ignore SIGXFSZ", unsafe {
        signal::signal(Signal::SIGXFSZ, SigHandler::SigIgn)
    })?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    Ok(())
}

/// `dst` (absolute, inside the jail) under the jail's root on the host.
fn inside(root: &Path, dst: &Path) -> PathBuf {
    root.join(dst.strip_prefix("/").unwrap_or(dst))
}

fn mkdirs(dir: Option<&Path>) -> Result<(), StepError> {
    match dir {
        Some(d) => step(
            &format!("create {}", d.display()),
            std::fs::create_dir_all(d),
        ),
        None => Ok(()),
    }
}

/// Bind-mounts `src` at `dst` inside the jail's root, then applies `flags` to the bind.
fn bind(root: &Path, src: &Path, dst: &Path, flags: MsFlags) -> Result<(), StepError> {
    let at = inside(root, dst);
    mkdirs(at.parent())?;
    let meta = step(
        &format!("inspect {}", src.display()),
        std::fs::metadata(src),
    )?;
    if meta.is_dir() {
        step(
            &format!("create {}", at.display()),
            std::fs::create_dir_all(&at),
        )?;
    } else {
        step(&format!("create {}", at.display()), File::create(&at))?;
    }
    let what = format!("bind {} at {}", src.display(), dst.display());
    step(
        &what,
        mount(Some(src), &at, None::<&str>, MsFlags::MS_BIND, None::<&str>),
    )?;
    step(
        &what,
        mount(
            None::<&str>,
            &at,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
            None::<&str>,
        ),
    )
}

/// Creates at `dst` a character device node with the number of the host's `src`, owned by the
/// jail's uid (mode 0600): the hypervisor can open it, nobody else in the jail exists, and the
/// host's node keeps its own owner and mode.
fn device(root: &Path, src: &Path, dst: &Path, uid: u32, gid: u32) -> Result<(), StepError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = step(
        &format!("inspect {}", src.display()),
        std::fs::metadata(src),
    )?;
    if !meta.file_type().is_char_device() {
        return Err(StepError(format!(
            "{} is not a character device",
            src.display()
        )));
    }
    let at = inside(root, dst);
    mkdirs(at.parent())?;
    step(
        &format!("create the device node {}", dst.display()),
        nix::sys::stat::mknod(
            &at,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            meta.rdev(),
        ),
    )?;
    step(
        &format!("hand {} to the jail's uid", dst.display()),
        std::os::unix::fs::chown(&at, Some(uid), Some(gid)),
    )
}

/// Makes `root` the process's root: `pivot_root` with the old root detached, or, where the host
/// root is the initramfs (which cannot be pivoted away), `MS_MOVE` onto `/` and `chroot`.
fn enter(root: &Path) -> Result<(), StepError> {
    step("enter the jail's root", nix::unistd::chdir(root))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            step("detach the old root", umount2(".", MntFlags::MNT_DETACH))?;
        }
        Err(Errno::EINVAL) => {
            step(
                "move the jail's root onto /",
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
            )?;
            step("chroot into the jail", nix::unistd::chroot("."))?;
        }
        Err(e) => return Err(StepError(format!("pivot_root: {e}"))),
    }
    step("enter the jail's root", nix::unistd::chdir("/"))
}

/// No groups, the jail's gid and uid, every capability set empty, no new privileges.
fn drop_privileges(spec: &Spec) -> Result<(), StepError> {
    step("drop supplementary groups", nix::unistd::setgroups(&[]))?;
    let gid = Gid::from_raw(spec.gid);
    step("set the gid", nix::unistd::setresgid(gid, gid, gid))?;
    // Root, or a non-root server holding CAP_SETPCAP (the documented capability set): either
    // may empty the bounding set, and must, before the uid change.
    let setpcap = caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP)
        .unwrap_or(false);
    if Uid::effective().is_root() || setpcap {
        step(
            "clear the bounding capabilities",
            caps::clear(None, caps::CapSet::Bounding),
        )?;
    }
    step(
        "clear the inheritable capabilities",
        caps::clear(None, caps::CapSet::Inheritable),
    )?;
    step(
        "clear the ambient capabilities",
        caps::clear(None, caps::CapSet::Ambient),
    )?;
    let uid = Uid::from_raw(spec.uid);
    // From root to an all-nonzero uid the kernel clears the permitted and effective sets; from
    // a non-root server with capabilities it keeps them, so both are emptied explicitly below.
    step("set the uid", nix::unistd::setresuid(uid, uid, uid))?;
    step(
        "clear the effective capabilities",
        caps::clear(None, caps::CapSet::Effective),
    )?;
    step(
        "clear the permitted capabilities",
        caps::clear(None, caps::CapSet::Permitted),
    )?;
    step("set no_new_privs", nix::sys::prctl::set_no_new_privs())
}

/// Refuses to exec anything that still holds a privilege.
fn verify_unprivileged() -> Result<(), StepError> {
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
        caps::CapSet::Bounding,
        caps::CapSet::Ambient,
    ] {
        let held = step("read the capabilities", caps::read(None, set))?;
        if !held.is_empty() {
            return Err(StepError(format!(
                "capabilities still held after dropping them ({set:?}: {held:?})"
            )));
        }
    }
    if Uid::current().is_root() || Uid::effective().is_root() {
        return Err(StepError("still root after dropping the uid".into()));
    }
    Ok(())
}
