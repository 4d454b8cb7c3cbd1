//! Per-server runtime directory, vsock CID allocation and the registry of live VM processes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::fence::Fence;
use super::net::{NetPlan, Tap};

/// Lowest guest CID (0-2 are reserved by vsock).
const FIRST_CID: u32 = 3;
/// Highest CID we hand out before wrapping around.
const LAST_CID: u32 = 0x00ff_ffff;
/// Bytes of the console log shown in error messages.
const CONSOLE_TAIL_BYTES: u64 = 2048;
/// Bytes of a hypervisor's own stderr shown in error messages.
const STDERR_TAIL_BYTES: u64 = 4096;

struct Inner {
    dir: tempfile::TempDir,
    state: Mutex<State>,
    /// Per-VM taps and addresses (tcp transport), or none (vsock).
    net: Option<NetPlan>,
    /// Host-side rules around every tap (`None`: `[network] host_rules = false`, or vsock).
    fence: Option<Arc<Fence>>,
}

#[derive(Default)]
struct State {
    next_cid: u32,
    used: HashSet<u32>,
    /// Live hypervisor pids by CID.
    pids: HashMap<u32, u32>,
    /// Address blocks in use, and the next one to try (round robin, so that a block is reused as
    /// late as possible, long after its old tap has gone).
    next_block: u32,
    used_blocks: HashSet<u32>,
}

/// The server's runtime directory (removed when the last handle is dropped) and allocators.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// Creates `cloude-<random>` under `$CLOUDE_RUNTIME_DIR`, else the system temp directory.
    pub fn new() -> std::io::Result<Self> {
        Self::with_network(None)
    }

    /// Like [`Runtime::new`]; with a plan, every slot also gets its own configured tap.
    pub fn with_network(net: Option<NetPlan>) -> std::io::Result<Self> {
        Self::with_rules(net, None)
    }

    /// Like [`Runtime::with_network`]; every tap also gets `fence`'s host-side rules.
    pub fn with_rules(net: Option<NetPlan>, fence: Option<Arc<Fence>>) -> std::io::Result<Self> {
        let base = std::env::var_os("CLOUDE_RUNTIME_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new()
            .prefix("cloude-")
            .tempdir_in(base)?;
        // Only the server: jailed hypervisors (other uids) reach their own directory through a
        // bind mount, never through this path.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let state = State {
            next_cid: FIRST_CID,
            ..State::default()
        };
        Ok(Runtime {
            inner: Arc::new(Inner {
                dir,
                state: Mutex::new(state),
                net,
                fence,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .expect("runtime state lock is never poisoned")
    }

    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// Whether VMs get taps (tcp transport).
    pub fn has_network(&self) -> bool {
        self.inner.net.is_some()
    }

    /// The transport of this runtime's VMs: tcp when it hands out taps, else vsock.
    pub fn transport(&self) -> super::Transport {
        if self.has_network() {
            super::Transport::Tcp
        } else {
            super::Transport::Vsock
        }
    }

    /// The host-side rules around the taps, when they are on.
    pub fn fence(&self) -> Option<&Arc<Fence>> {
        self.inner.fence.as_ref()
    }

    /// Reserves a unique CID and a private directory for one VM.
    pub fn slot(&self) -> std::io::Result<Slot> {
        let cid = {
            let mut st = self
                .inner
                .state
                .lock()
                .expect("runtime state lock is never poisoned");
            loop {
                let c = st.next_cid;
                st.next_cid = if c >= LAST_CID { FIRST_CID } else { c + 1 };
                if st.used.insert(c) {
                    break c;
                }
            }
        };
        let dir = self.dir().join(format!("vm-{cid}"));
        let mut slot = Slot {
            cid,
            dir,
            runtime: self.clone(),
            block: None,
            tap: None,
            console: None,
            stderr_log: None,
        };
        std::fs::create_dir(&slot.dir)?;
        if let Some(plan) = self.inner.net {
            let block = {
                let mut st = self.lock();
                let mut found = None;
                for _ in 0..plan.blocks() {
                    let b = st.next_block;
                    st.next_block = (b + 1) % plan.blocks();
                    if st.used_blocks.insert(b) {
                        found = Some(b);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    std::io::Error::other("network.subnet has no free address block left")
                })?
            };
            slot.block = Some(block);
            let (host, guest) = plan.addresses(block);
            let mut tap = Tap::create(&format!("cld{cid}"), host, guest)?;
            if let Some(f) = &self.inner.fence {
                tap.fence(f)?;
            }
            slot.tap = Some(tap);
        }
        Ok(slot)
    }

    /// Number of VMs whose hypervisor process is registered as running.
    pub fn live_vms(&self) -> usize {
        self.inner
            .state
            .lock()
            .expect("runtime state lock is never poisoned")
            .pids
            .len()
    }

    /// SIGKILLs every registered hypervisor process (shutdown path).
    pub fn kill_all(&self) -> usize {
        let pids: Vec<u32> = {
            let st = self
                .inner
                .state
                .lock()
                .expect("runtime state lock is never poisoned");
            st.pids.values().copied().collect()
        };
        for pid in &pids {
            if let Ok(p) = i32::try_from(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        pids.len()
    }
}

/// One VM's CID, directory and (tcp transport) tap; freed and removed on drop.
pub struct Slot {
    pub cid: u32,
    pub dir: PathBuf,
    runtime: Runtime,
    block: Option<u32>,
    /// The VM's tap (tcp transport): the hypervisor inherits its fd.
    pub tap: Option<Tap>,
    /// Copies the hypervisor's output into `console.log` (bounded).
    console: Option<super::console::Pump>,
    /// The hypervisor's own stderr file (QEMU), read only through this descriptor.
    stderr_log: Option<std::fs::File>,
}

impl Slot {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn console_path(&self) -> PathBuf {
        self.path("console.log")
    }

    /// Starts the VM's bounded console (`console.log`, at most `limit` bytes); returns the pipe
    /// the hypervisor writes it through.
    pub fn start_console(&mut self, limit: u64) -> std::io::Result<std::io::PipeWriter> {
        let (pump, writer) = super::console::Pump::start(&self.console_path(), limit)?;
        self.console = Some(pump);
        Ok(writer)
    }

    /// After the hypervisor exited: lets the console catch up with its last output.
    pub async fn settle_console(&self) {
        if let Some(p) = &self.console {
            p.settle(std::time::Duration::from_millis(300)).await;
        }
    }

    /// Records the hypervisor's pid so that shutdown can kill it.
    pub fn register_pid(&self, pid: Option<u32>) {
        if let Some(pid) = pid {
            let mut st = self
                .runtime
                .inner
                .state
                .lock()
                .expect("runtime state lock is never poisoned");
            st.pids.insert(self.cid, pid);
        }
    }

    /// Creates `name` in the VM's directory for the hypervisor's stderr and keeps a descriptor
    /// to read its end later ([`Slot::stderr_tail`]); returns the file to hand to the child.
    pub fn stderr_file(&mut self, name: &str) -> std::io::Result<std::fs::File> {
        let f = super::hostile::create_new(&self.path(name))?;
        self.stderr_log = Some(f.try_clone()?);
        Ok(f)
    }

    /// The end (at most `STDERR_TAIL_BYTES`) of the hypervisor's stderr, if it has one.
    pub fn stderr_tail(&self) -> String {
        self.stderr_log
            .as_ref()
            .map(|f| super::hostile::tail(f, STDERR_TAIL_BYTES))
            .unwrap_or_default()
    }

    /// The end of the guest console log, read through the console's own descriptor (never by
    /// path: the hypervisor may have swapped the entry for a FIFO or a symlink).
    pub fn console_tail(&self) -> String {
        let Some(pump) = &self.console else {
            return String::from("(no console output)");
        };
        let text = pump.tail(CONSOLE_TAIL_BYTES).trim().to_string();
        if text.is_empty() {
            String::from("(no console output)")
        } else {
            text
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Take the directory back from the VM's uid first (a non-root server could neither
        // list nor empty it otherwise); the entry itself sits in the server's own 0700
        // directory, where no hypervisor can swap it.
        let _ = std::os::unix::fs::lchown(
            &self.dir,
            Some(nix::unistd::geteuid().as_raw()),
            Some(nix::unistd::getegid().as_raw()),
        );
        let _ = std::fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        let mut st = self
            .runtime
            .inner
            .state
            .lock()
            .expect("runtime state lock is never poisoned");
        st.used.remove(&self.cid);
        st.pids.remove(&self.cid);
        if let Some(b) = self.block {
            st.used_blocks.remove(&b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_and_cleaned() {
        let rt = Runtime::new().expect("runtime dir");
        let a = rt.slot().expect("slot");
        let b = rt.slot().expect("slot");
        assert_ne!(a.cid, b.cid);
        assert!(a.cid >= FIRST_CID);
        assert!(a.dir.is_dir() && b.dir.is_dir());
        a.register_pid(Some(u32::MAX));
        assert_eq!(rt.live_vms(), 1);
        let dir = a.dir.clone();
        drop(a);
        assert!(!dir.exists());
        assert_eq!(rt.live_vms(), 0);
        let top = rt.dir().to_path_buf();
        drop(b);
        drop(rt);
        assert!(!top.exists(), "runtime dir removed with the last handle");
    }
}
