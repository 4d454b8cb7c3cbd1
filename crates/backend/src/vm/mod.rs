//! Starting and stopping micro-VMs through one small interface with two drivers.
//!
//! Lifecycle: [`Runtime::slot`] reserves a CID and a private directory, [`Driver::boot`] spawns the
//! hypervisor and waits for the agent's ready line, returning a [`Vm`] with an open channel to the
//! agent. Dropping the [`Vm`] kills the hypervisor process and removes the directory (every exit
//! path: success, timeout, client disconnect, error). The warm pool (`crate::pool`) is another
//! producer of ready [`Vm`]s (see `Executor::acquire_vm`), and so is [`Driver::restore`]: a VM
//! restored from a snapshot ([`snapshot`]) of a booted template, woken as a new machine.

pub mod console;
pub mod fence;
pub mod jail;
pub mod net;
pub mod probe;
mod qemu;
pub mod qmp;
mod runtime;
pub mod snapshot;
mod vmm;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::process::Child;

pub use crate::config::Transport;

pub use probe::{choose, Choice};
pub use runtime::{Runtime, Slot};

/// Which hypervisor starts the VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Our own VMM on KVM.
    CloudeVmm,
    /// QEMU `-M microvm`, with KVM acceleration (`kvm`) when it works, else TCG.
    Qemu { kvm: bool },
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::CloudeVmm => "cloude-vmm",
            Kind::Qemu { .. } => "qemu",
        }
    }

    /// The accelerator the guest runs on: "kvm", or "tcg" (QEMU's software emulation).
    pub fn accel(self) -> &'static str {
        match self {
            Kind::Qemu { kvm: false } => "tcg",
            Kind::Qemu { kvm: true } | Kind::CloudeVmm => "kvm",
        }
    }

    /// The kernel image this hypervisor loads: QEMU's microvm a bzImage, cloude-vmm the ELF
    /// vmlinux.
    pub fn kernel(self, bzimage: PathBuf, vmlinux: PathBuf) -> PathBuf {
        match self {
            Kind::Qemu { .. } => bzimage,
            Kind::CloudeVmm => vmlinux,
        }
    }
}

/// A configured driver.
#[derive(Clone, Debug)]
pub struct Driver {
    pub kind: Kind,
    /// The hypervisor binary.
    pub binary: PathBuf,
    /// The jail around every hypervisor process (`None`: unjailed, `[jail] enabled = false`).
    pub jail: Option<Arc<jail::Jailer>>,
    /// Guest console kept per VM, bytes (`[vm] console_bytes`; `console.rs`); also the largest
    /// file a jailed hypervisor may write.
    pub console_bytes: u64,
}

/// Where the hypervisor finds its files: host paths, or the jail's view of them.
pub(crate) struct Paths {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The read-only root filesystem image (block-format images).
    pub root: Option<PathBuf>,
    /// The VM's directory (sockets, console).
    pub dir: PathBuf,
}

impl Paths {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Inside the jail: the kernel, the image and the VM's directory.
const JAIL_KERNEL: &str = "/kernel";
const JAIL_INITRD: &str = "/initrd";
const JAIL_ROOT_IMAGE: &str = "/root.img";
const JAIL_DIR: &str = "/vm";

/// What a driver's hypervisor costs on top of the guest's memory and vCPUs (its cgroup's limits
/// and its jail's contents).
#[derive(Clone, Copy, Debug)]
pub(crate) struct JailProfile {
    /// Memory of the hypervisor itself (measured, plus headroom), MiB.
    pub overhead_mib: u64,
    /// Threads beside the vCPUs (measured, plus headroom).
    pub extra_pids: u64,
    /// CPU share of the device/IO threads beside the vCPUs, thousandths of a CPU.
    pub device_cpu_millis: u64,
    /// Open files.
    pub max_files: u64,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// A block-format image's read-only root (the guest's /dev/vda, mounted by the agent under a
    /// tmpfs overlay); `None` for an initramfs image.
    pub root: Option<PathBuf>,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// From spawn to the agent's ready line.
    pub boot_timeout: Duration,
    /// How the host reaches the agent: vsock (or QEMU's virtio-serial), or TCP to the VM's own
    /// address over a tap, which the slot must then carry (checked before every spawn).
    pub transport: Transport,
    /// Run once in a snapshot template before it is sealed (`seal`): the language's commands on
    /// an empty program.
    pub warm_up: Option<cloude_protocol::RunRequest>,
}

/// Kernel command line shared by both drivers. `reboot=t` (triple fault): QEMU microvm has no
/// i8042, so `reboot=k` stalls for a minute under emulation; a triple fault ends both QEMU
/// (`-no-reboot`) and cloude-vmm (KVM_EXIT_SHUTDOWN) at once. `rootfstype=ramfs`: the initramfs
/// root is ramfs rather than a tmpfs capped at half the RAM, which cut big images (Python, Node)
/// short while unpacking.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=1 quiet loglevel=4 rootfstype=ramfs";

/// The byte stream to the agent (virtio-serial or vsock through a Unix socket).
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentIo for T {}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot prepare the VM's runtime directory: {0}")]
    RuntimeDir(std::io::Error),
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("the hypervisor exited during boot ({status}); console: {console}")]
    ExitedDuringBoot { status: String, console: String },
    #[error("the VM did not become ready within {0} ms; console: {1}")]
    BootTimeout(u128, String),
    #[error("agent channel: {0}")]
    Channel(std::io::Error),
    #[error("the agent sent an unexpected ready line {0:?}")]
    BadReady(String),
    #[error("the vsock handshake failed: {0}")]
    Handshake(String),
    #[error("cannot jail the hypervisor: {0}")]
    Jail(jail::JailError),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("the restored VM's agent could not be woken: {0}")]
    Wake(String),
}

/// Where a VM came from (`timings.vm_source` adds `pool` for either kind taken from the pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Booted from its kernel and image.
    Cold,
    /// Restored from a snapshot and woken.
    Snapshot,
}

/// A running VM with its agent channel. Dropping it kills the VM and frees its slot.
pub struct Vm {
    /// `None` only after drop or shutdown took it.
    pub(crate) child: Option<Child>,
    pub(crate) slot: Slot,
    pub(crate) io: Option<Box<dyn AgentIo>>,
    /// tcp transport: the channel the ready line came on, held open for the VM's life.
    pub(crate) _control: Option<Box<dyn AgentIo>>,
    /// The VM's uid and cgroup (jailed VMs).
    pub(crate) lease: Option<jail::Lease>,
    /// From spawn to a ready agent (restored VMs: to the answered wake).
    pub boot: Duration,
    pub source: Source,
    /// Restored VMs: the agent connection the wake went over (runs continue on it).
    pub(crate) client: Option<crate::agent::AgentClient>,
}

impl Vm {
    /// Takes the agent channel (once).
    pub fn take_io(&mut self) -> Option<Box<dyn AgentIo>> {
        self.io.take()
    }

    /// Takes the HTTP connection to the agent (once): the one a restored VM was woken over, or
    /// a new one over the channel.
    pub async fn agent(&mut self) -> Result<crate::agent::AgentClient, crate::agent::AgentError> {
        if let Some(c) = self.client.take() {
            return Ok(c);
        }
        match self.io.take() {
            Some(io) => crate::agent::AgentClient::handshake(io).await,
            None => Err(crate::agent::AgentError::Body(
                "the VM has no agent channel".into(),
            )),
        }
    }

    /// Process id of the hypervisor, or of its jailer (for logs and fault injection).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The VM's uid and cgroup directories, when it is jailed.
    pub fn jail(&self) -> Option<(u32, Vec<PathBuf>)> {
        self.lease.as_ref().map(|l| (l.uid, l.cgroup_dirs()))
    }

    pub fn cid(&self) -> u32 {
        self.slot.cid
    }

    /// What lets the guest open connections through its tap (a request with `network: true`),
    /// when host-side rules guard it (`None` without them). It runs `nft`: call it off the async
    /// workers.
    pub fn network_opener(
        &self,
    ) -> Option<impl FnOnce() -> Result<(), fence::FenceError> + Send + 'static> {
        self.slot
            .tap
            .as_ref()
            .and_then(net::Tap::rules)
            .map(fence::Rules::opener)
    }

    /// Resolves when the hypervisor process exits (never, once it has been taken).
    pub async fn exited(&mut self) {
        match self.child.as_mut() {
            Some(c) => {
                let _ = c.wait().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Whether the hypervisor process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Whether the hypervisor process has exited, and how.
    /// Waits up to `within` for the hypervisor to exit (it may close the agent channel a moment
    /// before its exit is visible); returns how it ended, or `None` if it is still running.
    pub async fn exit_status_within(&mut self, within: Duration) -> Option<String> {
        let child = self.child.as_mut()?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(s)) => {
                self.slot.settle_console().await;
                Some(describe_exit(s, &self.slot.console_tail()))
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => None,
        }
    }

    /// The last lines of the guest console (for error messages in logs).
    pub fn console_tail(&self) -> String {
        self.slot.console_tail()
    }

    /// Waits up to `grace` for the VM to power off by itself, then kills it.
    pub async fn shutdown(mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            reap(Some(child), self.lease.take()).await;
        } else if let Some(l) = self.lease.take() {
            l.release();
        }
    }
}

/// How long a jailer may take to end after its hypervisor was killed, before it is killed too.
const JAILER_EXIT_GRACE: Duration = Duration::from_secs(2);

/// Ends a hypervisor for good: kills it (jailed: the hypervisor first, so that its jailer reaps
/// it and exits by itself, leaving no orphan), reaps the child and frees the VM's uid and cgroup.
async fn reap(child: Option<Child>, lease: Option<jail::Lease>) {
    let Some(mut child) = child else {
        if let Some(l) = lease {
            l.release();
        }
        return;
    };
    match &lease {
        Some(l) => {
            l.kill_except(child.id());
            if tokio::time::timeout(JAILER_EXIT_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        None => {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    if let Some(l) = lease {
        l.release();
    }
}

/// [`reap`] in the background (from `Drop`); the kill itself happens at once.
fn reap_later(mut child: Option<Child>, lease: Option<jail::Lease>) {
    match (&mut child, &lease) {
        (Some(c), Some(l)) => l.kill_except(c.id()),
        (Some(c), None) => {
            let _ = c.start_kill();
        }
        _ => {}
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(reap(child, lease));
        }
        Err(_) => {
            if let Some(mut c) = child {
                let _ = c.start_kill();
            }
            drop(lease);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Kill now, and reap in the background so that no zombie is left (tokio only reaps
        // dropped children lazily).
        reap_later(self.child.take(), self.lease.take());
    }
}

impl Driver {
    /// Boots one fresh VM in `slot` and waits until its agent is ready.
    pub async fn boot(&self, spec: &VmSpec, slot: Slot) -> Result<Vm, VmError> {
        check_transport(spec, &slot)?;
        match self.kind {
            Kind::Qemu { .. } => qemu::boot(self, spec, slot, qemu::Mode::Boot).await,
            Kind::CloudeVmm => vmm::boot(self, spec, slot, None).await,
        }
    }

    /// Boots a template VM in `slot`, waits for its agent, seals it and writes its snapshot into
    /// `out` (a staging directory). Returns the names of the files written and the template's
    /// boot time. The template is destroyed afterwards.
    pub async fn snapshot(
        &self,
        spec: &VmSpec,
        slot: Slot,
        tag: &str,
        out: &Path,
    ) -> Result<(Vec<&'static str>, Duration), VmError> {
        if spec.transport == Transport::Tcp {
            return Err(VmError::Snapshot(
                "snapshots need the vsock transport (a restored VM cannot take a new IP address yet)"
                    .into(),
            ));
        }
        match self.kind {
            Kind::Qemu { .. } => qemu::snapshot(self, spec, slot, out).await,
            Kind::CloudeVmm => vmm::snapshot(self, spec, slot, tag, out).await,
        }
    }

    /// Restores a VM from `snap` in `slot` and wakes its agent as a new machine (fresh entropy,
    /// clock, hostname) before anything else can reach it.
    pub async fn restore(
        &self,
        spec: &VmSpec,
        snap: &snapshot::Snapshot,
        slot: Slot,
    ) -> Result<Vm, VmError> {
        if spec.transport == Transport::Tcp {
            return Err(VmError::Snapshot(
                "snapshots need the vsock transport".into(),
            ));
        }
        snap.still_intact()
            .map_err(|e| VmError::Snapshot(e.to_string()))?;
        match self.kind {
            Kind::Qemu { .. } => qemu::restore(self, spec, snap, slot).await,
            Kind::CloudeVmm => vmm::restore(self, spec, snap, slot).await,
        }
    }

    /// The kernel command line templates boot with (part of a snapshot's identity).
    /// `init_on_free=1`: pages the guest frees (the compressed initramfs, above all) are zeroed,
    /// so the snapshot skips them (QEMU's migration stream shrank from 132 to 80 MB for Python).
    pub fn snapshot_cmdline(&self, spec: &VmSpec) -> String {
        match self.kind {
            Kind::Qemu { .. } => cmdline(spec, &[SNAPSHOT_CMDLINE_EXTRA]),
            Kind::CloudeVmm => cmdline(spec, &[vmm::VMM_CMDLINE_EXTRA, SNAPSHOT_CMDLINE_EXTRA]),
        }
    }
}

/// What a template's kernel command line adds (see [`Driver::snapshot_cmdline`]).
const SNAPSHOT_CMDLINE_EXTRA: &str = "init_on_free=1";

/// The hostname every VM has (re-applied by a wake).
pub const GUEST_HOSTNAME: &str = "cloude";

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
fn check_transport(spec: &VmSpec, slot: &Slot) -> Result<(), VmError> {
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
            j.keep_netns = spec.transport == Transport::Tcp;
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
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| VmError::Channel(std::io::Error::new(e.kind(), format!("{addr}: {e}"))))?;
    let _ = s.set_nodelay(true);
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
