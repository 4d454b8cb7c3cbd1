//! `cloude-server` start-up: configuration, hypervisor probe, artifacts, serving, shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use cloude_image::catalog::Catalog;
use cloude_image::progress::Progress;

use crate::api::{router, AppState};
use crate::artifacts::Artifacts;
use crate::config::{Config, HypervisorChoice, Transport};
use crate::executor::{ExecSettings, Executor, ExecutorParts};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::snapshots::Snapshots;
use crate::vm::{self, probe::HostFacts, Runtime};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HypervisorArg {
    Auto,
    CloudeVmm,
    Qemu,
}

/// Runs each request in its own fresh micro-VM.
#[derive(Debug, Parser)]
#[command(name = "cloude-server", version)]
struct Args {
    /// Address to listen on (default from the configuration: 127.0.0.1:8787).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Configuration file (TOML; keys override the embedded default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Language catalogue (default: the embedded one, or $CLOUDE_CATALOG).
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Hypervisor driver (default: probe).
    #[arg(long, value_enum)]
    hypervisor: Option<HypervisorArg>,
    /// Build the kernel and images on first use instead of before serving.
    #[arg(long)]
    lazy: bool,
    /// Never build: use only a kernel and images already in the cache (implies --lazy).
    #[arg(long)]
    no_build: bool,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_config: bool,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config {
        print!("{}", crate::config::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOUDE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloude-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(args));
    // Dropping the runtime drops in-flight tasks; their VMs are killed on drop.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloude-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    config.limits.max_connections = raise_fd_limit(config.limits.max_connections);
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(h) = args.hypervisor {
        config.vm.hypervisor = match h {
            HypervisorArg::Auto => HypervisorChoice::Auto,
            HypervisorArg::CloudeVmm => HypervisorChoice::CloudeVmm,
            HypervisorArg::Qemu => HypervisorChoice::Qemu,
        };
    }
    let net_plan = match config.vm.transport {
        Transport::Tcp => {
            vm::net::preflight().map_err(anyhow::Error::msg)?;
            let plan = config.network.plan().map_err(anyhow::Error::msg)?;
            tracing::info!(
                subnet = %config.network.subnet,
                "transport: tcp (a tap and a /30 per VM in {}; agents on port {})",
                config.network.subnet,
                cloude_protocol::AGENT_TCP_PORT
            );
            Some(plan)
        }
        Transport::Vsock => None,
    };
    let catalog = Catalog::load_resolved(args.catalog.as_deref())?;
    let choice = vm::choose(config.vm.hypervisor, &HostFacts::gather())?;
    tracing::info!(
        hypervisor = choice.driver.kind.name(),
        binary = %choice.driver.binary.display(),
        "hypervisor: {} ({})",
        choice.driver.kind.name(),
        choice.reason
    );
    let fence = match (config.vm.transport, config.network.host_rules) {
        (Transport::Tcp, true) => {
            let f = vm::fence::Fence::start()?;
            tracing::info!("host rules: on ({})", f.describe());
            Some(f)
        }
        (Transport::Tcp, false) => {
            tracing::warn!(
                "host rules: OFF ([network] host_rules = false): root in a guest can spoof its \
                 addresses and reach every host service and other VMs through its tap; never do \
                 this with untrusted code"
            );
            None
        }
        (Transport::Vsock, _) => None,
    };
    let runtime = Runtime::with_rules(net_plan, fence.clone())
        .context("cannot create the runtime directory")?;
    let jailer = if config.jail.enabled {
        let j = vm::jail::Jailer::start(&config.jail, runtime.dir())?;
        tracing::info!("jail: on ({})", j.describe());
        Some(j)
    } else {
        tracing::warn!(
            "jail: OFF ([jail] enabled = false): hypervisors run with the server's privileges, \
             unconfined; never do this with untrusted code"
        );
        None
    };
    let mut driver = choice.driver.clone();
    driver.jail = jailer.clone();
    driver.console_bytes = config.vm.console_bytes;
    let metrics = Arc::new(Metrics::default());
    let artifacts = Arc::new(Artifacts::new(
        Progress::new(false),
        !args.no_build,
        config.images.format,
    ));
    let l = &config.limits;
    let executor = Arc::new(Executor::new(ExecutorParts {
        driver,
        runtime: runtime.clone(),
        artifacts: artifacts.clone(),
        limiter: Limiter::new(
            l.max_concurrent_vms,
            l.max_queue,
            Duration::from_millis(l.queue_timeout_ms),
        ),
        metrics: metrics.clone(),
        settings: ExecSettings {
            vcpus: config.vm.vcpus,
            boot_timeout: Duration::from_millis(l.boot_timeout_ms),
            output_limit_bytes: l.output_limit_bytes,
        },
        pool: Pool::new(config.pool.size, config.pool.languages.clone()),
        snapshots: Snapshots::new(
            config.snapshot.enabled,
            (!config.snapshot.dir.is_empty()).then(|| PathBuf::from(&config.snapshot.dir)),
            (config.vm.transport == Transport::Tcp).then(|| {
                "the tcp transport is on (a restored VM cannot take a new IP address yet)".into()
            }),
        ),
    }));
    match executor.snapshots().status() {
        None => tracing::info!("snapshots: on (requests are served by restored clones)"),
        Some(why) => tracing::info!("snapshots: off ({why}); every VM boots cold"),
    }
    if !args.lazy && !args.no_build {
        prepare(&artifacts, &catalog, &config.vm.prebuild).await;
        if executor.snapshots().active() {
            for l in catalog.languages.iter().filter(|l| {
                config
                    .vm
                    .prebuild
                    .iter()
                    .any(|p| p == "*" || p.eq_ignore_ascii_case(&l.name))
            }) {
                executor.prepare_snapshot(l).await;
            }
        }
    }
    if config.pool.size > 0 {
        let warm: Vec<_> = catalog
            .languages
            .iter()
            .filter(|l| executor.pool_wants(&l.name))
            .collect();
        tracing::info!(
            "warm pool: {} VM(s) each for {}",
            config.pool.size,
            warm.iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for l in warm {
            executor.refill(l);
        }
    }
    let judge0 = if config.judge0.enabled {
        let store = crate::store::Store::open(&config.store)
            .await
            .context("cannot open the Judge0 submission store ([store] url)")?;
        tracing::info!("judge0 API: on (store: {})", store.describe());
        Some(Arc::new(crate::judge0::Judge0::new(
            config.judge0.clone(),
            config.store.clone(),
            store,
        )))
    } else {
        None
    };
    let sandboxes = config.sandboxes.enabled.then(|| {
        let s = crate::sandbox::Sandboxes::new(executor.clone(), config.sandboxes.clone());
        s.start_reaper();
        tracing::info!(
            "sandboxes: on (at most {} running, idle timeout {} s by default)",
            config.sandboxes.max_running,
            config.sandboxes.default_timeout_s
        );
        s
    });
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    let state = Arc::new(AppState {
        config: config.clone(),
        catalog,
        executor: executor.clone(),
        metrics,
        hypervisor: choice.driver.kind.name().to_string(),
        hypervisor_reason: choice.reason.clone(),
        judge0: judge0.clone(),
        sandboxes: sandboxes.clone(),
    });
    if let Some(j) = &judge0 {
        crate::judge0::worker::start(state.clone(), j.clone()).await;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!("listening on http://{addr}");
    println!("cloude-server listening on http://{addr}");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let exec = executor.clone();
    let mut closing_rx = stop_rx.clone();
    tokio::spawn(async move {
        let _ = closing_rx.wait_for(|v| *v).await;
        tracing::info!(
            "shutting down: no new connections; in-flight requests get {} ms",
            grace.as_millis()
        );
        if let Some(j) = &judge0 {
            j.closing.store(true, std::sync::atomic::Ordering::SeqCst);
            j.wake.notify_waiters();
        }
        let pooled = exec.close();
        if pooled > 0 {
            tracing::info!("stopped {pooled} pooled VM(s)");
        }
        if let Some(s) = &sandboxes {
            let n = s.close().await;
            if n > 0 {
                tracing::info!("stopped {n} sandbox(es)");
            }
        }
    });
    let conns = crate::serve::ConnTable::new(crate::serve::ConnLimits {
        max_total: config.limits.max_connections,
        max_per_ip: config.limits.max_connections_per_ip,
        idle_timeout: crate::serve::HEADER_READ_TIMEOUT,
        min_idle_timeout: crate::serve::MIN_IDLE_TIMEOUT,
    });
    let serve = crate::serve::serve(listener, router(state), stop_rx.clone(), conns);
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => {}
        _ = async {
            let _ = stop_rx.wait_for(|v| *v).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("in-flight requests did not finish within the grace period; cancelling them");
            // Kill their VMs first, so that each cancelled request still answers its client
            // (internal_error) instead of having its connection cut.
            let killed = runtime.kill_all();
            tracing::warn!("killed {killed} VM(s) at shutdown");
            if tokio::time::timeout(CANCELLED_ANSWER_GRACE, &mut serve).await.is_err() {
                tracing::warn!("some connections were still open; closing them");
            }
        }
    }
    let killed = runtime.kill_all();
    if killed > 0 {
        tracing::warn!("killed {killed} VM(s) at shutdown");
    }
    if let Some(j) = &jailer {
        j.shutdown();
    }
    if let Some(f) = &fence {
        f.shutdown();
    }
    let _ = std::fs::remove_dir_all(runtime.dir());
    tracing::info!("stopped");
    Ok(())
}

/// After the shutdown grace, how long requests whose VMs were killed get to send their answer.
const CANCELLED_ANSWER_GRACE: Duration = Duration::from_secs(5);

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not shut down gracefully");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Builds (or finds cached) the kernel and the images of `which` ("*" = all), with progress.
async fn prepare(artifacts: &Artifacts, catalog: &Catalog, which: &[String]) {
    match artifacts.kernel().await {
        Ok(k) => tracing::info!("guest kernel: {}", k.bzimage.display()),
        Err(e) => {
            tracing::error!("{e}; executions will fail with 503 until it can be built");
            return;
        }
    }
    let all = which.iter().any(|w| w == "*");
    for lang in &catalog.languages {
        if !all && !which.iter().any(|w| w.eq_ignore_ascii_case(&lang.name)) {
            continue;
        }
        match artifacts.image(lang).await {
            Ok(i) => tracing::info!(
                "image {} {} ({}): {}{}",
                lang.name,
                lang.version,
                i.format.name(),
                i.initrd.display(),
                i.root
                    .as_deref()
                    .map(|r| format!(" + {}", r.display()))
                    .unwrap_or_default()
            ),
            Err(e) => tracing::error!("{e}; requests for it will retry the build"),
        }
    }
}

/// Raises the soft open-files limit to the hard one (each connection costs two fds, each VM a
/// few) and returns the connection cap that limit holds: `max_connections`, or less with a
/// warning.
fn raise_fd_limit(max_connections: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    /// Descriptors kept for everything but client connections (VMs, store, logs).
    const RESERVED_FDS: u64 = 256;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let have = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    let fits = usize::try_from(have.saturating_sub(RESERVED_FDS) / 2).unwrap_or(usize::MAX);
    if fits < max_connections {
        let cap = fits.max(1);
        tracing::warn!(
            "open-files limit {have} holds {cap} connections, below limits.max_connections = \
             {max_connections}; serving at most {cap} (raise the hard limit, ulimit -Hn, for more)"
        );
        return cap;
    }
    max_connections
}
