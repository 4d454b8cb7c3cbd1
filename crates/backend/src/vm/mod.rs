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
pub(crate) mod hostile;
pub mod jail;
mod launch;
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

pub use launch::describe_exit;
use launch::{check_transport, cmdline};
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

    /// Freezes the VM (its hypervisor runs no guest code and takes no CPU; its memory stays) or
    /// thaws it: its cgroup when jailed, else `SIGSTOP` / `SIGCONT` to the hypervisor.
    pub fn freeze(&self, frozen: bool) -> std::io::Result<()> {
        if let Some(l) = &self.lease {
            return l.freeze(frozen);
        }
        let pid = self
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| std::io::Error::other("the VM has no process"))?;
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(std::io::Error::from)
    }

    /// CPU time the hypervisor has used so far, measured by the host (its cgroup, or the
    /// process itself when unjailed): it bounds what the guest can have used, whatever the
    /// guest says.
    pub fn host_cpu_time(&self) -> Option<Duration> {
        if let Some(l) = &self.lease {
            return l.cpu_time();
        }
        let pid = i32::try_from(self.pid()?).ok()?;
        cloude_jail::cgroup::process_cpu_time(pid)
    }

    /// Whether the hypervisor process has exited, and how.
    /// Waits up to `within` for the hypervisor to exit (it may close the agent channel a moment
    /// before its exit is visible); returns how it ended, or `None` if it is still running.
    pub async fn exit_status_within(&mut self, within: Duration) -> Option<String> {
        let child = self.child.as_mut()?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(s)) => {
                self.slot.settle_console().await;
                let mut why = describe_exit(s, &self.slot.console_tail());
                if self.lease.as_ref().is_some_and(|l| l.oom_kills() > 0) {
                    why.push_str(
                        ": the hypervisor outgrew its cgroup's memory limit (guest memory plus its overhead) and the host killed it",
                    );
                }
                Some(why)
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
