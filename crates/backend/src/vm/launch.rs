//! What every driver's launch shares, in one place: the kernel command line (`cmdline`), the
//! transport check, the spawn (jail step, inherited descriptors, cgroup limits: `spawn`), the
//! race of a boot against the hypervisor's exit and the deadline (`during_boot`), the ready line
//! (`wait_ready`), the agent channel of each transport (`channels`), and a snapshot template's
//! seal and a clone's wake. The drivers (`qemu.rs`, `vmm.rs`) compose these with their own
//! arguments and channel set-up; `mod.rs` holds the types and dispatches by `Kind`.

use super::*;

/// How long writing a snapshot may take (guest RAM, written to disk), template boot excluded.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Seals a template's agent for its snapshot (runs refused until a wake); returns the connection
/// it answered on, left idle.
pub(crate) async fn seal(vm: &mut Vm, spec: &VmSpec) -> Result<crate::agent::AgentClient, VmError> {
    let mut agent = vm
        .agent()
        .await
        .map_err(|e| VmError::Snapshot(format!("agent: {e}")))?;
    if let Some(req) = &spec.warm_up {
        // The runtime's files in the guest's page cache before the snapshot: every clone then
        // starts its program from memory instead of reading the root again (block roots) and
        // finds the dynamic loader's and the runtime's first pages touched. Its outcome does not
        // matter (an empty program may fail to compile); only a broken agent fails the template.
        let t = std::time::Instant::now();
        match agent.run(req).await {
            Ok(r) => {
                tracing::debug!(ms = t.elapsed().as_millis() as u64, status = ?r.run.as_ref().map(|s| s.status), "template warmed up")
            }
            Err(e) => return Err(VmError::Snapshot(format!("warming the template up: {e}"))),
        }
    }
    agent
        .prepare_snapshot()
        .await
        .map_err(|e| VmError::Snapshot(format!("sealing the agent: {e}")))?;
    Ok(agent)
}

/// `work` (writing a snapshot), cut off after [`SNAPSHOT_TIMEOUT`].
pub(crate) async fn within_snapshot_timeout<T>(
    work: impl std::future::Future<Output = Result<T, VmError>>,
) -> Result<T, VmError> {
    tokio::time::timeout(SNAPSHOT_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(VmError::Snapshot(format!(
                "not written within {} s",
                SNAPSHOT_TIMEOUT.as_secs()
            )))
        })
}

/// Makes the HTTP connection to a restored VM's agent and wakes it: the wake's answer is the
/// restored VM's "ready".
pub(crate) async fn wake(io: Box<dyn AgentIo>) -> Result<crate::agent::AgentClient, VmError> {
    let mut client = crate::agent::AgentClient::handshake(io)
        .await
        .map_err(|e| VmError::Wake(e.to_string()))?;
    let w = client
        .wake(GUEST_HOSTNAME)
        .await
        .map_err(|e| VmError::Wake(e.to_string()))?;
    tracing::debug!(skew_ms = w.clock_skew_ms, "restored VM woken");
    Ok(client)
}

/// The kernel command line, built here only: [`BASE_CMDLINE`], the block root's arguments, then
/// `extras` in order (the driver's own, a template's, QEMU's `ip=`; empty ones are skipped).
pub(crate) fn cmdline(spec: &VmSpec, extras: &[&str]) -> String {
    let mut c = format!("{BASE_CMDLINE}{}", root_cmdline(spec));
    for e in extras.iter().filter(|e| !e.is_empty()) {
        c.push(' ');
        c.push_str(e);
    }
    c
}

/// Refuses a spec whose transport the slot cannot serve (tcp needs the slot's tap; vsock must
/// not hand the guest a network device).
pub(super) fn check_transport(spec: &VmSpec, slot: &Slot) -> Result<(), VmError> {
    match (spec.transport, slot.tap.is_some()) {
        (Transport::Tcp, true) | (Transport::Vsock, false) => Ok(()),
        (t, _) => Err(VmError::Channel(std::io::Error::other(format!(
            "the {} transport does not match the VM's slot ({})",
            t.name(),
            if slot.tap.is_some() {
                "a tap"
            } else {
                "no tap"
            }
        )))),
    }
}

/// What a block root adds to the command line: the first disk (every driver attaches the root
/// image as the first virtio-blk device) and its filesystem, read by the agent at boot.
fn root_cmdline(spec: &VmSpec) -> String {
    use cloude_image::image::block::{ROOT_FSTYPE, ROOT_FSTYPE_PARAM, ROOT_PARAM};
    match spec.root {
        Some(_) => format!(" {ROOT_PARAM}=/dev/vda {ROOT_FSTYPE_PARAM}={ROOT_FSTYPE}"),
        None => String::new(),
    }
}

/// Most descriptors handed to one hypervisor.
const MAX_INHERITED_FDS: usize = 4;
/// Where inherited descriptors are parked in the child before they are moved to their numbers
/// (above anything they could collide with).
const FD_PARKING: RawFd = 512;

/// Hands the slot's tap (if any) to the hypervisor as fd [`net::CHILD_TAP_FD`], and `extra`
/// descriptors as `(open fd, number in the child)`.
#[allow(unsafe_code)]
fn inherit_fds(
    cmd: &mut tokio::process::Command,
    slot: &Slot,
    extra: &[(RawFd, RawFd)],
) -> Result<(), VmError> {
    let mut fds = [(-1, -1); MAX_INHERITED_FDS];
    let mut n = 0;
    let tap = slot.tap.as_ref().map(|t| (t.raw_fd(), net::CHILD_TAP_FD));
    for (i, pair) in tap.iter().chain(extra).enumerate() {
        if i >= MAX_INHERITED_FDS {
            return Err(VmError::Spawn(
                "hypervisor".into(),
                std::io::Error::other("too many inherited descriptors"),
            ));
        }
        fds[i] = *pair;
        n = i + 1;
    }
    if n == 0 {
        return Ok(());
    }
    let hook = move || -> std::io::Result<()> {
        // Park every source first, so that moving one to its number cannot overwrite another.
        let mut parked = [-1; MAX_INHERITED_FDS];
        for i in 0..n {
            // SAFETY: fcntl on an integer fd is async-signal-safe and touches no memory.
            let p = unsafe { libc::fcntl(fds[i].0, libc::F_DUPFD_CLOEXEC, FD_PARKING) };
            if p < 0 {
                return Err(std::io::Error::last_os_error());
            }
            parked[i] = p;
        }
        for i in 0..n {
            // SAFETY: dup2 on integer fds is async-signal-safe; the target has no CLOEXEC.
            if unsafe { libc::dup2(parked[i], fds[i].1) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook is async-signal-safe (no allocation, only fcntl/dup2), as `pre_exec` needs.
    unsafe {
        cmd.pre_exec(hook);
    }
    Ok(())
}

/// What a hypervisor gets beside its usual files (snapshots): directories bound into its jail
/// (unjailed, it uses the host paths) and inherited descriptors.
#[derive(Default)]
pub(crate) struct Extras {
    /// `(host directory, path in the jail, writable)`.
    pub binds: Vec<(PathBuf, &'static str, bool)>,
    /// `(open fd, number in the child)`.
    pub fds: Vec<(RawFd, RawFd)>,
    /// The largest file the hypervisor may write, when more than the console size (a
    /// cloude-vmm template writes the guest's memory).
    pub max_file_bytes: Option<u64>,
    /// Memory beyond the driver's profile, MiB: a template's snapshot file is page cache
    /// charged to its cgroup while it is written (without it the cgroup's OOM killer ended a
    /// Python template mid-write).
    pub extra_memory_mib: u64,
}

/// A spawned hypervisor (or its jailer) and, jailed, its uid and cgroup. Dropping it kills both.
pub(crate) struct Process {
    child: Option<Child>,
    lease: Option<jail::Lease>,
}

impl Process {
    /// The hypervisor's uid when jailed (`None`: it runs as the server).
    pub fn uid(&self) -> Option<u32> {
        self.lease.as_ref().map(|l| l.uid)
    }

    pub fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("a process holds its child until it is taken")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        reap_later(self.child.take(), self.lease.take());
    }
}

impl Driver {
    /// The paths the hypervisor sees for `spec` and `slot`.
    pub(crate) fn paths(&self, spec: &VmSpec, slot: &Slot) -> Paths {
        if self.jail.is_some() {
            Paths {
                kernel: JAIL_KERNEL.into(),
                initrd: JAIL_INITRD.into(),
                root: spec.root.as_ref().map(|_| JAIL_ROOT_IMAGE.into()),
                dir: JAIL_DIR.into(),
            }
        } else {
            Paths {
                kernel: spec.kernel.clone(),
                initrd: spec.initrd.clone(),
                root: spec.root.clone(),
                dir: slot.dir.clone(),
            }
        }
    }

    fn profile(&self) -> JailProfile {
        match self.kind {
            Kind::Qemu { .. } => qemu::JAIL_PROFILE,
            Kind::CloudeVmm => vmm::JAIL_PROFILE,
        }
    }
}

/// Spawns the hypervisor for `slot` (with its tap inherited, if any), jailed unless the jail is
/// off, and registers its pid.
pub(crate) fn spawn(
    driver: &Driver,
    spec: &VmSpec,
    slot: &Slot,
    args: Vec<String>,
    stdout: std::process::Stdio,
    stderr: std::process::Stdio,
    extras: &Extras,
) -> Result<Process, VmError> {
    let (mut cmd, lease) = match &driver.jail {
        None => {
            let mut cmd = tokio::process::Command::new(&driver.binary);
            cmd.args(args);
            (cmd, None)
        }
        Some(jailer) => {
            let p = driver.profile();
            let limits = cloude_jail::cgroup::Limits {
                memory_bytes: (spec.memory_mib + p.overhead_mib + extras.extra_memory_mib) << 20,
                pids: u64::from(spec.vcpus) + p.extra_pids,
                cpu_millis: u64::from(spec.vcpus) * 1000 + p.device_cpu_millis,
            };
            let lease = jailer.lease(limits).map_err(VmError::Jail)?;
            let root = jail::prepare_dir(&slot.dir, lease.uid).map_err(VmError::Jail)?;
            let mut j = cloude_jail::Spec::new(lease.uid, lease.uid, root);
            j.cgroup_procs = lease.procs_files();
            j.max_files = p.max_files;
            j.max_file_bytes = driver.console_bytes.max(extras.max_file_bytes.unwrap_or(0));
            j.max_procs = limits.pids;
            // Never the host's network namespace, not even with a tap: the tap's descriptor
            // works from any namespace, and a hypervisor a guest has taken over must not reach
            // other VMs' agents or the host's loopback services.
            j.keep_netns = false;
            j.bind_ro(&spec.kernel, JAIL_KERNEL)
                .bind_ro(&spec.initrd, JAIL_INITRD)
                .bind_rw(&slot.dir, JAIL_DIR);
            if let Some(root) = &spec.root {
                j.bind_ro(root, JAIL_ROOT_IMAGE);
            }
            for (host, inside, writable) in &extras.binds {
                if *writable {
                    j.bind_rw(host, inside);
                } else {
                    j.bind_ro(host, inside);
                }
            }
            match driver.kind {
                Kind::Qemu { .. } => qemu::jail(driver, &mut j),
                Kind::CloudeVmm => vmm::jail(&mut j),
            }
            j.exec = Some(driver.binary.clone());
            j.args = args;
            let mut cmd = tokio::process::Command::new(jailer.binary());
            cmd.args(j.to_args());
            (cmd, Some(lease))
        }
    };
    inherit_fds(&mut cmd, slot, &extras.fds)?;
    die_with_server(&mut cmd);
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| VmError::Spawn(driver.binary.display().to_string(), e))?;
    slot.register_pid(child.id());
    Ok(Process {
        child: Some(child),
        lease,
    })
}

/// Makes the spawned process (the jailer, or an unjailed hypervisor) get SIGKILL when the
/// server dies, even by SIGKILL, and exit at once if the server is already gone by the time
/// the signal is armed. The jailer re-arms it after dropping its uid (which clears it).
///
/// The parent-death signal follows the *thread* that forked: VMs are spawned from the tokio
/// runtime's worker threads, which live as long as the server (no `block_in_place` anywhere).
#[allow(unsafe_code)]
fn die_with_server(cmd: &mut tokio::process::Command) {
    let server = std::process::id() as libc::pid_t;
    let hook = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid are plain system calls on this process's
        // own state, async-signal-safe as `pre_exec` requires; nothing is allocated.
        let armed = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        if armed != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != server {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook is async-signal-safe (two system calls, no allocation).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// How a hypervisor process ended, in words; a seccomp kill is named as such, with the system
/// call the VMM reported on its console (`cloude-vmm: seccomp: forbidden system call N`).
pub fn describe_exit(status: std::process::ExitStatus, console: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    if status.signal() == Some(libc::SIGSYS) {
        let nr = console
            .lines()
            .rev()
            .find_map(|l| l.split(cloude_protocol::SECCOMP_KILL_MARK).nth(1))
            .map(|n| n.trim().to_string());
        return match nr {
            Some(n) => format!("killed by its seccomp filter: SIGSYS on forbidden system call {n}"),
            None => "killed by its seccomp filter (SIGSYS)".to_string(),
        };
    }
    status.to_string()
}

/// The agent channel of a booted VM and, for the tcp transport, the ready channel held open.
pub(crate) struct Channels {
    io: Box<dyn AgentIo>,
    control: Option<Box<dyn AgentIo>>,
}

/// After the ready line arrived on `ready`: with a tap the agent is reached over TCP on the VM's
/// address (and `ready` is held open); otherwise `direct` makes the channel from `ready`.
pub(crate) async fn channels<R, F, Fut>(
    transport: Transport,
    slot: &Slot,
    ready: R,
    direct: F,
) -> Result<Channels, VmError>
where
    R: AgentIo,
    F: FnOnce(R) -> Fut,
    Fut: std::future::Future<Output = Result<Box<dyn AgentIo>, VmError>>,
{
    if transport == Transport::Tcp {
        let tcp = connect_tcp(slot).await?;
        return Ok(Channels {
            io: Box::new(tcp),
            control: Some(Box::new(ready)),
        });
    }
    Ok(Channels {
        io: direct(ready).await?,
        control: None,
    })
}

impl Vm {
    /// A VM whose agent is ready on `ch`.
    pub(crate) fn ready(mut p: Process, slot: Slot, ch: Channels, started: Instant) -> Vm {
        Vm {
            child: p.child.take(),
            slot,
            io: Some(ch.io),
            _control: ch.control,
            lease: p.lease.take(),
            boot: started.elapsed(),
            source: Source::Cold,
            client: None,
        }
    }

    /// A VM restored from a snapshot whose agent was woken over `client`.
    pub(crate) fn restored(
        mut p: Process,
        slot: Slot,
        client: crate::agent::AgentClient,
        started: Instant,
    ) -> Vm {
        Vm {
            child: p.child.take(),
            slot,
            io: None,
            _control: None,
            lease: p.lease.take(),
            boot: started.elapsed(),
            source: Source::Snapshot,
            client: Some(client),
        }
    }
}

/// tcp transport: once the agent is ready, connects to it on the VM's own address.
async fn connect_tcp(slot: &Slot) -> Result<tokio::net::TcpStream, VmError> {
    let Some(tap) = &slot.tap else {
        return Err(VmError::Channel(std::io::Error::other("the VM has no tap")));
    };
    let addr = std::net::SocketAddr::from((tap.guest, cloude_protocol::AGENT_TCP_PORT));
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| VmError::Channel(std::io::Error::new(e.kind(), format!("{addr}: {e}"))))?;
    let _ = s.set_nodelay(true);
    // The agent serves nothing before this line: the VM's secret, from its command line.
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        cloude_protocol::agent_auth_line(&tap.token).as_bytes(),
    )
    .await
    .map_err(VmError::Channel)?;
    Ok(s)
}

/// Reads one `\n`-terminated line byte by byte (never reads past it), at most `max` bytes.
pub(crate) async fn read_line<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<String> {
    let mut buf = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() >= max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        buf.push(b);
    }
}

/// Waits for the ready line on `io`; skips blank lines and noise before it (bounded).
pub(crate) async fn wait_ready<R: AsyncRead + Unpin>(io: &mut R) -> Result<(), VmError> {
    /// Lines of noise tolerated before the ready line.
    const MAX_NOISE_LINES: usize = 64;
    for _ in 0..MAX_NOISE_LINES {
        let line = read_line(io, 256).await.map_err(VmError::Channel)?;
        match cloude_protocol::parse_ready_line(&line) {
            Some(v) if v == cloude_protocol::PROTOCOL_VERSION => return Ok(()),
            Some(_) => return Err(VmError::BadReady(line)),
            None => continue,
        }
    }
    Err(VmError::BadReady("no ready line".into()))
}

/// Races `fut` against the child's exit and the boot deadline.
pub(crate) async fn during_boot<T>(
    child: &mut Child,
    slot: &Slot,
    spec: &VmSpec,
    started: Instant,
    fut: impl std::future::Future<Output = Result<T, VmError>>,
) -> Result<T, VmError> {
    let left = spec.boot_timeout.saturating_sub(started.elapsed());
    tokio::select! {
        r = tokio::time::timeout(left, fut) => match r {
            Ok(r) => r,
            Err(_) => Err(VmError::BootTimeout(spec.boot_timeout.as_millis(), slot.console_tail())),
        },
        s = child.wait() => {
            slot.settle_console().await;
            Err(VmError::ExitedDuringBoot {
                status: s.map(|s| describe_exit(s, &slot.console_tail())).unwrap_or_else(|e| e.to_string()),
                console: slot.console_tail(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_the_slot_cannot_serve_is_refused() {
        let rt = Runtime::new().expect("runtime");
        let slot = rt.slot().expect("slot");
        let mut spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            root: None,
            warm_up: None,
            memory_mib: 256,
            vcpus: 1,
            boot_timeout: Duration::from_secs(1),
            transport: Transport::Vsock,
        };
        assert!(check_transport(&spec, &slot).is_ok());
        spec.transport = Transport::Tcp;
        let e = check_transport(&spec, &slot).expect_err("tcp without a tap");
        assert!(
            e.to_string()
                .contains("the tcp transport does not match the VM's slot (no tap)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn ready_line_after_noise() {
        let (mut a, mut b) = tokio::io::duplex(256);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"\nboot noise\nCLOUDE-READY 1\nGET")
            .await
            .expect("write");
        wait_ready(&mut b).await.expect("ready");
        let mut rest = [0u8; 3];
        b.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"GET", "nothing past the ready line is consumed");
    }

    #[tokio::test]
    async fn wrong_version_rejected() {
        let (mut a, mut b) = tokio::io::duplex(256);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"CLOUDE-READY 9\n")
            .await
            .expect("write");
        assert!(matches!(
            wait_ready(&mut b).await,
            Err(VmError::BadReady(_))
        ));
    }
}
