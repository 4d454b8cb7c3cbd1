//! The agent as PID 1: boot, start every transport the VM offers, announce readiness, serve.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloude_protocol::{
    ready_line, AGENT_TCP_PORT, AGENT_VSOCK_PORT, READY_VSOCK_PORT, SERIAL_PORT_NAME,
};

use crate::executor::{Executor, ExecutorConfig};
use crate::init::{self, CGROUP_ROOT, RUN_GID, RUN_UID, WORK_ROOT};
use crate::reaper::Reaper;
use crate::serve::Peers;
use crate::server::AgentState;
use crate::transport::{serial, tcp, vsock};
use crate::{cgroup, power, serve};

/// Worker threads of the guest's runtime (I/O only; programs run in their own processes).
const WORKER_THREADS: usize = 2;
/// How long to wait for the `cloude.agent` port when the VM has a virtio-serial device.
const SERIAL_WAIT: Duration = Duration::from_secs(5);

/// Entry point when running as PID 1. Never returns: on a fatal error it resets the VM.
pub fn run_pid1() -> ! {
    init::boot();
    crate::logging::init(true);
    let outcome = std::panic::catch_unwind(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .enable_all()
            .build();
        match rt {
            Ok(rt) => rt.block_on(guest_main()),
            Err(e) => tracing::error!("cannot start the runtime: {e}"),
        }
    });
    if outcome.is_err() {
        tracing::error!("agent panicked");
    }
    tracing::error!("agent stopped; resetting the VM");
    power::reset_now();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

async fn guest_main() {
    match Reaper::global() {
        Ok(r) => r.reap_all_children(),
        Err(e) => tracing::error!("{e}"),
    }
    let cgroup_root = Path::new(CGROUP_ROOT);
    let cgroup_root = if cgroup_root.join("cgroup.procs").exists() {
        cgroup::enable_controllers(cgroup_root);
        Some(cgroup_root.to_path_buf())
    } else {
        tracing::error!("no cgroup v2 at {CGROUP_ROOT}: programs run without limits");
        None
    };
    let mut cfg = ExecutorConfig::new(PathBuf::from(WORK_ROOT), cgroup_root);
    cfg.uid = RUN_UID;
    cfg.gid = RUN_GID;
    cfg.scratch_dirs = vec![PathBuf::from("/tmp"), PathBuf::from("/dev/shm")];
    let poweroff = std::env::var_os("CLOUDE_NO_POWEROFF").is_none();
    let state = AgentState::new(Executor::new(cfg), poweroff);

    let mut transports = 0;
    let vsock_ok = match vsock::VsockListener::bind(AGENT_VSOCK_PORT) {
        Ok(l) => {
            serve::spawn_vsock(l, state.clone(), Peers::HostOnly);
            transports += 1;
            true
        }
        Err(e) => {
            tracing::info!("no vsock listener: {e}");
            false
        }
    };
    if tcp::has_ipv4_interface() {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, AGENT_TCP_PORT));
        let token = std::fs::read_to_string("/proc/cmdline")
            .ok()
            .and_then(|c| cloude_protocol::agent_token_of(&c));
        match serve::start_tcp(addr, state.clone(), Peers::HostOnly, token).await {
            Ok(_) => transports += 1,
            Err(e) => tracing::error!("cannot listen on {addr}: {e}"),
        }
    }
    if serial::has_virtio_console() {
        // The port may appear a little after boot; serve it as soon as it does.
        transports += 1;
        let state = state.clone();
        tokio::spawn(async move {
            match serial::wait_for_port(SERIAL_PORT_NAME, SERIAL_WAIT).await {
                Some(port) => {
                    tracing::info!("serving on {}", port.display());
                    serve::spawn_serial(port, state);
                }
                None => tracing::info!("no virtio-serial port named {SERIAL_PORT_NAME}"),
            }
        });
    }
    if transports == 0 {
        tracing::error!("no transport to the host (no vsock, IP or {SERIAL_PORT_NAME} port)");
        tokio::time::sleep(Duration::from_secs(1)).await;
        return;
    }
    // The console marker (benchmarks watch the serial console for it).
    print!("{}", ready_line());
    if vsock_ok {
        tokio::task::spawn_blocking(|| {
            if let Err(e) = vsock::announce_ready(READY_VSOCK_PORT) {
                tracing::info!("vsock readiness connection failed: {e}");
            }
        });
    }
    std::future::pending::<()>().await;
}
