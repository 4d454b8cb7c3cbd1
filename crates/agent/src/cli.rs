//! Command line: as PID 1 the arguments (from the kernel command line) are ignored and the
//! guest boot runs; otherwise `cloude-agent serve ...` runs the same server on the host (tests,
//! debugging) without any PID 1 duty and without ever powering the machine off.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloude_protocol::{ready_line, AGENT_VSOCK_PORT};

use crate::executor::{Executor, ExecutorConfig};
use crate::serve::Peers;
use crate::server::AgentState;
use crate::transport::vsock::VsockListener;
use crate::{cgroup, guest, serve};

#[derive(Debug, Parser)]
#[command(
    name = "cloude-agent",
    version,
    about = "Cloude guest agent (PID 1 of every VM)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the agent API without PID 1 duties (host tests, debugging).
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Listen on this TCP address (port 0 picks one; the bound address is printed).
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// Also listen on vsock port 1024.
    #[arg(long)]
    vsock: bool,
    /// Serve one HTTP connection at a time over this byte stream (e.g. a virtio-serial port).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// cgroup v2 directory under which each stage gets its own child (created if missing).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Parent of the per-request work directories (created if missing).
    #[arg(long, default_value = "/tmp/cloude-agent")]
    work_root: PathBuf,
    /// User id programs run as (when the agent is root).
    #[arg(long, default_value_t = 1000)]
    uid: u32,
    /// Group id programs run as (when the agent is root).
    #[arg(long, default_value_t = 1000)]
    gid: u32,
    /// Memory limit when a request sets none (default: below the machine's available memory).
    #[arg(long)]
    memory_limit_mib: Option<u64>,
    /// Accepted for symmetry with the guest; outside PID 1 the agent never powers off.
    #[arg(long)]
    no_poweroff: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    if std::process::id() == 1 {
        guest::run_pid1();
    }
    let cli = Cli::parse();
    crate::logging::init(false);
    let Cmd::Serve(args) = cli.cmd;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloude-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve_host(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloude-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_host(args: ServeArgs) -> anyhow::Result<()> {
    if args.tcp.is_empty() && !args.vsock && args.serial.is_none() {
        anyhow::bail!("nothing to serve: give --tcp, --vsock or --serial");
    }
    std::fs::create_dir_all(&args.work_root)
        .with_context(|| format!("creating {}", args.work_root.display()))?;
    if let Some(root) = &args.cgroup_root {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        cgroup::enable_controllers(root);
    }
    let mut cfg = ExecutorConfig::new(args.work_root.clone(), args.cgroup_root.clone());
    cfg.uid = args.uid;
    cfg.gid = args.gid;
    if args.memory_limit_mib.is_some() {
        cfg.memory_limit_mib = args.memory_limit_mib;
    }
    let state = AgentState::new(Executor::new(cfg), !args.no_poweroff);
    let mut tasks = Vec::new();
    for addr in &args.tcp {
        let (local, task) = serve::start_tcp(*addr, state.clone(), Peers::Any, None)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        println!("listening tcp {local}");
        tasks.push(task);
    }
    if args.vsock {
        let l = VsockListener::bind(AGENT_VSOCK_PORT).context("listening on vsock")?;
        println!("listening vsock {AGENT_VSOCK_PORT}");
        tasks.push(serve::spawn_vsock(l, state.clone(), Peers::Any));
    }
    if let Some(path) = args.serial {
        tasks.push(serve::spawn_serial(path, state.clone()));
    }
    print!("{}", ready_line());
    for t in tasks {
        t.await.context("server task")?;
    }
    Ok(())
}
