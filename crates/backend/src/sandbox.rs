//! Sandboxes: VMs that live across many calls (no HTTP here; the face is `api/sandboxes/`).
//!
//! A sandbox is a VM of a catalogue language, got the way an execution gets one (a restored,
//! woken clone of the language's snapshot when there is one, else a boot), kept with its agent
//! connection until it is deleted, idle for its timeout, lost (its hypervisor exited) or the
//! server stops. It holds one of `[limits] max_concurrent_vms` for its whole life (the same
//! accounting as executions) and counts against `[sandboxes] max_running`. Calls on one sandbox
//! are served one at a time, in order, over its one agent connection; every call pushes its
//! deadline back by its timeout. The jail, cgroups and caps apply to its VM as to any other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloude_image::catalog::Language;
use cloude_protocol::interactive::Input;
use cloude_protocol::sandbox::{
    ExecRequest, FileOp, FileOpAnswer, ProcChunk, ProcEnd, ProcInfo, ProcOutput, ProcRead,
    ProcStart, SandboxUser,
};
use cloude_protocol::StageResult;

use crate::agent::{AgentClient, FileAnswer};
use crate::config::SandboxConfig;
use crate::executor::Executor;
use crate::limiter::{LimitError, Permit};
use crate::vm::Vm;

/// How often expired sandboxes are looked for.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// Slack on top of a command's timeout before the server gives up on the agent.
const CALL_SLACK: Duration = Duration::from_secs(30);
/// How long a file call may take.
const FILE_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one output poll of [`Sandboxes::follow_proc`] holds a sandbox's agent connection.
pub const POLL_WAIT: Duration = Duration::from_millis(100);
/// Longest a follower sleeps between polls that found nothing (it starts at 10 ms and doubles).
const IDLE_SLEEP_MAX: Duration = Duration::from_millis(200);

/// What following a process yields ([`Sandboxes::follow_proc`]).
#[derive(Debug)]
pub enum ProcEvent {
    Output(ProcChunk),
    /// Bytes the agent's buffer dropped before they were read.
    Skipped(u64),
    /// The last event.
    End(ProcEnd),
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox {0}")]
    NotFound(String),
    #[error("{0} sandboxes are running, the most [sandboxes] max_running allows; delete one or retry later")]
    Full(usize),
    #[error(transparent)]
    Saturated(#[from] LimitError),
    #[error("the sandbox's VM could not start: {0}")]
    Start(String),
    #[error("sandbox {0} is gone: its VM stopped ({1})")]
    Lost(String, String),
    #[error("the sandbox's agent failed: {0}")]
    Agent(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NoFile(String),
    #[error("{0}")]
    TooLarge(String),
    /// A call on a paused sandbox, or a pause of one that is paused already.
    #[error("sandbox {0} is paused: resume it first")]
    Paused(String),
}

/// What a caller sees of a sandbox.
#[derive(Clone, Debug)]
pub struct Info {
    pub id: String,
    pub template: String,
    pub version: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub timeout_s: u64,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub owner: Option<String>,
    /// Paused: its VM frozen, calls refused until it is resumed (`expires_ms` is then when
    /// `[sandboxes] max_paused_s` ends it).
    pub paused: bool,
}

/// What a new sandbox is asked to be.
#[derive(Clone, Debug, Default)]
pub struct NewSandbox {
    /// Killed after this long without a call (`idle`), or this long after creation or the
    /// last `set_timeout` (E2B's rule: calls do not extend it).
    pub timeout: Duration,
    pub idle: bool,
    /// Applied to every command (a command's own variables win).
    pub env: Vec<(String, String)>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The API key's tenant that made it (`None` without `[auth]` keys): only it sees it.
    pub owner: Option<String>,
}

struct Live {
    vm: Vm,
    agent: AgentClient,
    _permit: Permit,
}

pub struct Sandbox {
    id: String,
    language: Language,
    created_ms: i64,
    vcpus: u32,
    metadata: serde_json::Map<String, serde_json::Value>,
    owner: Option<String>,
    /// A secret for faces whose sandbox calls carry no API key (E2B's `envdAccessToken`).
    token: String,
    /// Applied to every command (a command's own variables win).
    env: Vec<(String, String)>,
    /// Whether calls push the deadline back ([`NewSandbox::idle`]).
    idle: bool,
    /// Timeout and the instant it runs out.
    clock: Mutex<(Duration, Instant)>,
    /// `None` once killed.
    live: tokio::sync::Mutex<Option<Live>>,
    /// Set (and `cancel` notified) when the sandbox is killed: a call in progress ends at once.
    dead: AtomicBool,
    cancel: tokio::sync::Notify,
    /// Calls in progress (an idle timeout never kills a sandbox in the middle of one).
    busy: AtomicUsize,
    /// While paused: what its timeout had left when it was paused (the clock meanwhile runs
    /// `[sandboxes] max_paused_s`).
    paused: Mutex<Option<Duration>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Sandbox {
    fn clock(&self) -> std::sync::MutexGuard<'_, (Duration, Instant)> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn info(&self) -> Info {
        let (timeout, deadline) = *self.clock();
        let left = deadline.saturating_duration_since(Instant::now());
        Info {
            id: self.id.clone(),
            template: self.language.name.clone(),
            version: self.language.version.clone(),
            created_ms: self.created_ms,
            expires_ms: now_ms() + i64::try_from(left.as_millis()).unwrap_or(i64::MAX),
            timeout_s: timeout.as_secs(),
            memory_mib: self.language.memory_mib,
            vcpus: self.vcpus,
            metadata: self.metadata.clone(),
            owner: self.owner.clone(),
            paused: self.is_paused(),
        }
    }

    fn paused(&self) -> std::sync::MutexGuard<'_, Option<Duration>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its VM and agent, unless it was killed.
    fn alive<'a>(&self, live: &'a Option<Live>) -> Result<&'a Live, SandboxError> {
        live.as_ref()
            .filter(|_| !self.dead.load(Ordering::SeqCst))
            .ok_or_else(|| SandboxError::NotFound(self.id.clone()))
    }

    /// Whether it is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused().is_some()
    }

    /// Whether `token` is this sandbox's secret (compared in constant time).
    pub fn token_matches(&self, token: &str) -> bool {
        let (a, b) = (self.token.as_bytes(), token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The tenant that made it.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// Pushes the deadline back by the idle timeout (every call of an idle-timed sandbox).
    fn touch(&self) {
        if !self.idle || self.is_paused() {
            return;
        }
        let mut c = self.clock();
        c.1 = Instant::now() + c.0;
    }

    /// Past its deadline: an idle-timed sandbox only between calls, an E2B-timed one whatever
    /// it is doing.
    fn expired(&self) -> bool {
        (!self.idle || self.busy.load(Ordering::SeqCst) == 0) && Instant::now() >= self.clock().1
    }

    /// Sets a new idle timeout, counted from now.
    /// (Paused, it is what the timeout will have when resumed.)
    pub fn set_timeout(&self, timeout: Duration) {
        let mut paused = self.paused();
        if let Some(left) = paused.as_mut() {
            *left = timeout;
            self.clock().0 = timeout;
            return;
        }
        *self.clock() = (timeout, Instant::now() + timeout);
    }

    /// Makes it live at least `timeout` from now (E2B's connect: never shortens it).
    pub fn extend(&self, timeout: Duration) {
        let mut paused = self.paused();
        if let Some(left) = paused.as_mut() {
            *left = (*left).max(timeout);
            return;
        }
        drop(paused);
        let mut c = self.clock();
        let until = Instant::now() + timeout;
        if until > c.1 {
            *c = (timeout, until);
        }
    }

    /// Kills the VM (idempotent); a call in progress ends first.
    async fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.cancel.notify_waiters();
        if let Some(live) = self.live.lock().await.take() {
            // A frozen jailer could not reap its hypervisor: thaw first (it dies at once).
            if self.paused().take().is_some() {
                let _ = live.vm.freeze(false);
            }
            live.vm.shutdown(Duration::ZERO).await;
        }
    }
}

/// Every sandbox of this server.
pub struct Sandboxes {
    exec: Arc<Executor>,
    cfg: SandboxConfig,
    map: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// Creations under way (they count against `max_running` too).
    starting: Mutex<usize>,
}

impl Sandboxes {
    pub fn new(exec: Arc<Executor>, cfg: SandboxConfig) -> Arc<Sandboxes> {
        Arc::new(Sandboxes {
            exec,
            cfg,
            map: Mutex::new(HashMap::new()),
            starting: Mutex::new(0),
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sandboxes running now (paused ones included: they hold their VM).
    pub fn running(&self) -> usize {
        self.map().len()
    }

    /// Of those, the paused ones.
    pub fn paused(&self) -> usize {
        self.map().values().filter(|s| s.is_paused()).count()
    }

    /// Starts a sandbox of `language` (see the module documentation).
    pub async fn create(&self, language: &Language, new: NewSandbox) -> Result<Info, SandboxError> {
        let NewSandbox {
            timeout,
            idle,
            env,
            metadata,
            owner,
        } = new;
        // Counted as starting until this returns or is dropped (a client that goes away).
        let _starting = {
            let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
            let running = self.running() + *starting;
            if running >= self.cfg.max_running {
                return Err(SandboxError::Full(running));
            }
            *starting += 1;
            Starting(&self.starting)
        };
        let (permit, _) = self.exec.admit().await?;
        let mut vm = self
            .exec
            .sandbox_vm(language)
            .await
            .map_err(SandboxError::Start)?;
        let agent = vm
            .agent()
            .await
            .map_err(|e| SandboxError::Start(e.to_string()))?;
        let id = new_id()?;
        let token = random_hex(16)?;
        tracing::info!(sandbox = %id, language = %language.name, cid = vm.cid(), boot_ms = vm.boot.as_millis() as u64, "sandbox started");
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            language: language.clone(),
            created_ms: now_ms(),
            vcpus: self.exec.vcpus(),
            metadata,
            owner,
            token,
            env,
            idle,
            clock: Mutex::new((timeout, Instant::now() + timeout)),
            live: tokio::sync::Mutex::new(Some(Live {
                vm,
                agent,
                _permit: permit,
            })),
            dead: AtomicBool::new(false),
            cancel: tokio::sync::Notify::new(),
            busy: AtomicUsize::new(0),
            paused: Mutex::new(None),
        });
        let info = sb.info();
        self.map().insert(id, sb);
        Ok(info)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    /// Every sandbox, oldest first.
    pub fn list(&self) -> Vec<Info> {
        let mut v: Vec<Info> = self.map().values().map(|s| s.info()).collect();
        v.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        v
    }

    /// Deletes a sandbox: its VM is killed, its slot freed.
    pub async fn delete(&self, id: &str) -> Result<(), SandboxError> {
        let sb = self
            .map()
            .remove(id)
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))?;
        sb.kill().await;
        tracing::info!(sandbox = %id, "sandbox deleted");
        Ok(())
    }

    /// Pauses a sandbox once the call in progress (if any) has ended: its VM is frozen (no
    /// guest code runs, no CPU is used, its memory and its slot stay), its timeout stops, and
    /// calls are refused until [`Sandboxes::resume`]. It is killed after `[sandboxes]
    /// max_paused_s` paused.
    pub async fn pause(&self, id: &str) -> Result<(), SandboxError> {
        let t = Instant::now();
        let sb = self.get(id)?;
        let guard = sb.live.lock().await;
        let live = sb.alive(&guard)?;
        let mut paused = sb.paused();
        if paused.is_some() {
            return Err(SandboxError::Paused(id.to_string()));
        }
        live.vm
            .freeze(true)
            .map_err(|e| SandboxError::Agent(format!("cannot freeze the VM: {e}")))?;
        let mut clock = sb.clock();
        *paused = Some(clock.1.saturating_duration_since(Instant::now()));
        clock.1 = Instant::now() + Duration::from_secs(self.cfg.max_paused_s);
        self.exec.metrics.observe("sandbox_pause", t.elapsed());
        tracing::info!(sandbox = %id, "sandbox paused");
        Ok(())
    }

    /// Resumes a paused sandbox (thaws its VM; its timeout runs again with what it had left,
    /// or `timeout` if that is longer). False when it was not paused.
    pub async fn resume(&self, id: &str, timeout: Option<Duration>) -> Result<bool, SandboxError> {
        let t = Instant::now();
        let sb = self.get(id)?;
        let guard = sb.live.lock().await;
        let live = sb.alive(&guard)?;
        let mut paused = sb.paused();
        let Some(left) = *paused else {
            return Ok(false);
        };
        live.vm
            .freeze(false)
            .map_err(|e| SandboxError::Agent(format!("cannot thaw the VM: {e}")))?;
        *paused = None;
        let mut clock = sb.clock();
        let left = timeout.map_or(left, |t| t.max(left));
        clock.1 = Instant::now() + left;
        if let Some(t) = timeout {
            clock.0 = t;
        }
        self.exec.metrics.observe("sandbox_resume", t.elapsed());
        tracing::info!(sandbox = %id, "sandbox resumed");
        Ok(true)
    }

    /// Runs `call` on the sandbox's agent, one call at a time, within `within`; a VM that
    /// stopped makes the sandbox lost (removed). The call runs in a task of its own: a caller
    /// that goes away (a client that disconnects, a dropped future) never cuts an agent request
    /// in half, which would close the sandbox's one agent connection; the request finishes (or
    /// times out) and the connection serves the next call.
    async fn call<T, F>(
        self: &Arc<Self>,
        id: &str,
        within: Duration,
        touch: bool,
        call: F,
    ) -> Result<T, SandboxError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(
                &'a mut AgentClient,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, SandboxError>> + Send + 'a>,
            > + Send
            + 'static,
    {
        let sb = self.get(id)?;
        if touch {
            sb.touch();
        }
        let me = self.clone();
        let id = id.to_string();
        let task = tokio::spawn(async move {
            sb.busy.fetch_add(1, Ordering::SeqCst);
            let _busy = Busy(&sb.busy);
            let mut guard = tokio::select! {
                g = sb.live.lock() => g,
                () = sb.cancel.notified() => return Err(SandboxError::NotFound(id)),
            };
            let Some(live) = guard.as_mut().filter(|_| !sb.dead.load(Ordering::SeqCst)) else {
                return Err(SandboxError::NotFound(id));
            };
            if sb.is_paused() {
                return Err(SandboxError::Paused(id));
            }
            let Live { vm, agent, .. } = live;
            let r = tokio::select! {
                () = sb.cancel.notified() => Err(SandboxError::NotFound(id.clone())),
                r = tokio::time::timeout(within, call(agent)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(SandboxError::Agent(format!("no answer within {} s", within.as_secs()))),
                },
                () = vm.exited() => {
                    let why = vm.exit_status_within(Duration::from_millis(200)).await.unwrap_or_else(|| "exited".into());
                    Err(SandboxError::Lost(id.clone(), why))
                }
            };
            // A hypervisor that died mid-call (killed by its cgroup, say) closes the agent's
            // connection first: say that the VM stopped, and how, rather than only that the
            // connection closed.
            let r = match r {
                Err(SandboxError::Agent(e)) => {
                    match vm.exit_status_within(Duration::from_millis(300)).await {
                        Some(why) => Err(SandboxError::Lost(id.clone(), why)),
                        None => Err(SandboxError::Agent(e)),
                    }
                }
                r => r,
            };
            drop(guard);
            if touch {
                sb.touch();
            }
            if let Err(SandboxError::Lost(..) | SandboxError::Agent(..)) = &r {
                // The VM or its agent connection is gone: so is the sandbox.
                me.map().remove(&id);
                sb.kill().await;
                tracing::warn!(sandbox = %id, "sandbox lost");
            }
            r
        });
        task.await
            .unwrap_or_else(|e| Err(SandboxError::Agent(format!("the call's task failed: {e}"))))
    }

    /// One command in the sandbox.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        mut req: ExecRequest,
    ) -> Result<StageResult, SandboxError> {
        let within = Duration::from_millis(req.timeout_ms) + CALL_SLACK;
        {
            let sb = self.get(id)?;
            let mut env = sb.env.clone();
            env.retain(|(k, _)| !req.env.iter().any(|(rk, _)| rk == k));
            env.append(&mut req.env);
            req.env = env;
        }
        self.call(id, within, true, |agent| {
            Box::pin(async move { agent.exec(&req).await.map_err(agent_error) })
        })
        .await
    }

    /// Starts a process that outlives the call (its output read by `read_proc`).
    pub async fn start_proc(
        self: &Arc<Self>,
        id: &str,
        mut req: ProcStart,
    ) -> Result<u32, SandboxError> {
        {
            let sb = self.get(id)?;
            let mut env = sb.env.clone();
            env.retain(|(k, _)| !req.env.iter().any(|(rk, _)| rk == k));
            env.append(&mut req.env);
            req.env = env;
        }
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.proc_start(&req).await.map_err(agent_error) })
        })
        .await
    }

    /// A process's output from byte `since` on, waiting up to `wait` for some. Reading does not
    /// push an idle deadline back (a client that follows a process forever would keep the
    /// sandbox forever).
    pub async fn read_proc(
        self: &Arc<Self>,
        id: &str,
        proc: u32,
        since: u64,
        wait: Duration,
    ) -> Result<ProcOutput, SandboxError> {
        let req = ProcRead {
            since,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        self.call(id, wait + FILE_CALL_TIMEOUT, false, move |agent| {
            Box::pin(async move { agent.proc_read(proc, &req).await.map_err(agent_error) })
        })
        .await
    }

    /// Sends process `pid`'s output from byte `since` on (`FROM_NOW`: what comes from now
    /// on) to `tx` until it ends (`End` is the last event) or `tx` is closed. It polls: each read
    /// holds the sandbox's one agent connection for at most [`POLL_WAIT`], and between reads that
    /// found nothing it sleeps (10 ms, doubling up to 200 ms), so other calls and other
    /// followers share the connection.
    pub async fn follow_proc(
        self: &Arc<Self>,
        id: &str,
        pid: u32,
        mut since: u64,
        tx: &tokio::sync::mpsc::Sender<ProcEvent>,
    ) -> Result<(), SandboxError> {
        let mut idle = Duration::ZERO;
        loop {
            let out = self.read_proc(id, pid, since, POLL_WAIT).await?;
            since = out.next;
            if out.skipped > 0 && tx.send(ProcEvent::Skipped(out.skipped)).await.is_err() {
                return Ok(());
            }
            let got = !out.chunks.is_empty();
            for c in out.chunks {
                if tx.send(ProcEvent::Output(c)).await.is_err() {
                    return Ok(());
                }
            }
            if let Some(end) = out.end {
                let _ = tx.send(ProcEvent::End(end)).await;
                return Ok(());
            }
            if got {
                idle = Duration::ZERO;
                continue;
            }
            idle = (idle * 2).clamp(Duration::from_millis(10), IDLE_SLEEP_MAX);
            tokio::select! {
                () = tokio::time::sleep(idle) => {}
                () = tx.closed() => return Ok(()),
            }
        }
    }

    /// Runs a process to its end and returns its output and how it ended. Output past `cap`
    /// bytes (both streams) kills it (status `output_limit`). Dropping the future (a client
    /// that went away) kills it too: unlike `exec`, whose command the agent runs to its end,
    /// nothing is left running.
    pub async fn run_proc(
        self: &Arc<Self>,
        id: &str,
        start: ProcStart,
        cap: u64,
    ) -> Result<ProcRun, SandboxError> {
        let pid = self.start_proc(id, start).await?;
        let mut guard = KillOnDrop {
            sbx: Some(self.clone()),
            id: id.to_string(),
            pid,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let follow = async {
            let r = self.follow_proc(id, pid, 0, &tx).await;
            drop(tx);
            r
        };
        let collect = async {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            while let Some(ev) = rx.recv().await {
                match ev {
                    ProcEvent::Output(c) => {
                        let buf = match c.stream {
                            cloude_protocol::StreamKind::Stdout => &mut stdout,
                            cloude_protocol::StreamKind::Stderr => &mut stderr,
                        };
                        buf.extend_from_slice(&c.data.0);
                        if (stdout.len() + stderr.len()) as u64 > cap {
                            return (stdout, stderr, None, true);
                        }
                    }
                    ProcEvent::Skipped(_) => {}
                    ProcEvent::End(e) => return (stdout, stderr, Some(e), false),
                }
            }
            (stdout, stderr, None, false)
        };
        let (followed, (mut stdout, mut stderr, end, over)) = tokio::join!(follow, collect);
        // Ended or not, it is killed (if it still runs) and forgotten.
        if let Some(sbx) = guard.sbx.take() {
            let _ = sbx.delete_proc(id, pid).await;
        }
        let end = match (end, over) {
            (Some(e), _) => e,
            (None, true) => {
                let keep = usize::try_from(cap).unwrap_or(usize::MAX);
                stdout.truncate(keep);
                stderr.truncate(keep.saturating_sub(stdout.len()));
                ProcEnd {
                    exit_code: None,
                    signal: Some(libc::SIGKILL),
                    status: cloude_protocol::StageStatus::OutputLimit,
                    message: Some(format!("the output passed {cap} bytes")),
                    wall_ms: 0,
                    cpu_ms: 0,
                    memory_kib: 0,
                }
            }
            (None, false) => {
                followed?;
                return Err(SandboxError::Agent(
                    "the process's output ended without its end".into(),
                ));
            }
        };
        Ok(ProcRun {
            stdout,
            stderr,
            end,
        })
    }

    /// Standard input, its end, a signal or a terminal size for a process.
    pub async fn proc_input(
        self: &Arc<Self>,
        id: &str,
        proc: u32,
        input: Input,
    ) -> Result<(), SandboxError> {
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.proc_input(proc, &input).await.map_err(agent_error) })
        })
        .await
    }

    /// The processes a sandbox keeps (running, or ended and not yet forgotten).
    pub async fn list_procs(self: &Arc<Self>, id: &str) -> Result<Vec<ProcInfo>, SandboxError> {
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.proc_list().await.map_err(agent_error) })
        })
        .await
    }

    /// Kills a process (if it runs) and forgets it.
    pub async fn delete_proc(self: &Arc<Self>, id: &str, proc: u32) -> Result<(), SandboxError> {
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.proc_delete(proc).await.map_err(agent_error) })
        })
        .await
    }

    /// A file's bytes or a directory's listing.
    pub async fn read(
        self: &Arc<Self>,
        id: &str,
        path: String,
    ) -> Result<FileAnswer, SandboxError> {
        let max = self.cfg.max_file_bytes;
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.file_get(&path, max).await.map_err(agent_error) })
        })
        .await
    }

    /// Writes a file (parents made), owned by `user`.
    pub async fn write(
        self: &Arc<Self>,
        id: &str,
        path: String,
        user: SandboxUser,
        mode: Option<u32>,
        data: Vec<u8>,
    ) -> Result<(), SandboxError> {
        if data.len() as u64 > self.cfg.max_file_bytes {
            return Err(SandboxError::TooLarge(format!(
                "the file is {} bytes, more than [sandboxes] max_file_bytes = {}",
                data.len(),
                self.cfg.max_file_bytes
            )));
        }
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move {
                agent
                    .file_put(&path, user, mode, data)
                    .await
                    .map_err(agent_error)
            })
        })
        .await
    }

    /// Stat, make a directory, move.
    pub async fn file_op(
        self: &Arc<Self>,
        id: &str,
        op: FileOp,
    ) -> Result<FileOpAnswer, SandboxError> {
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.file_op(&op).await.map_err(agent_error) })
        })
        .await
    }

    /// Removes a file or a directory tree.
    pub async fn remove(self: &Arc<Self>, id: &str, path: String) -> Result<(), SandboxError> {
        self.call(id, FILE_CALL_TIMEOUT, true, move |agent| {
            Box::pin(async move { agent.file_delete(&path).await.map_err(agent_error) })
        })
        .await
    }

    /// Kills sandboxes idle past their timeout, every second, for as long as `self` lives.
    pub fn start_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let expired: Vec<Arc<Sandbox>> = {
                    let mut map = me.map();
                    let ids: Vec<String> = map
                        .values()
                        .filter(|s| s.expired())
                        .map(|s| s.id.clone())
                        .collect();
                    ids.iter().filter_map(|id| map.remove(id)).collect()
                };
                for sb in expired {
                    tracing::info!(sandbox = %sb.id, "sandbox timed out; killed");
                    sb.kill().await;
                }
            }
        });
    }

    /// Kills every sandbox (server shutdown); returns how many.
    pub async fn close(&self) -> usize {
        let all: Vec<Arc<Sandbox>> = self.map().drain().map(|(_, s)| s).collect();
        let n = all.len();
        for sb in all {
            sb.kill().await;
        }
        n
    }
}

/// What [`Sandboxes::run_proc`] answers.
#[derive(Debug)]
pub struct ProcRun {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub end: ProcEnd,
}

/// Kills a sandbox process (in a task of its own) if dropped before it is disarmed (`sbx`
/// taken).
struct KillOnDrop {
    sbx: Option<Arc<Sandboxes>>,
    id: String,
    pid: u32,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(sbx) = self.sbx.take() {
            let (id, pid) = (std::mem::take(&mut self.id), self.pid);
            tokio::spawn(async move {
                let _ = sbx.delete_proc(&id, pid).await;
                tracing::info!(sandbox = %id, pid, "a dropped command was killed");
            });
        }
    }
}

/// Counts a creation under way until dropped.
struct Starting<'a>(&'a Mutex<usize>);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
    }
}

/// Counts a call in progress until dropped.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An agent's refusal (4xx: a bad path, a missing file) is the caller's; anything else means
/// the agent or its connection failed.
fn agent_error(e: crate::agent::AgentError) -> SandboxError {
    match e {
        crate::agent::AgentError::Status(404, m) => SandboxError::NoFile(m),
        crate::agent::AgentError::Status(413, m) => SandboxError::TooLarge(m),
        crate::agent::AgentError::Status(s, m) if (400..500).contains(&s) => {
            SandboxError::Refused(m)
        }
        e => SandboxError::Agent(e.to_string()),
    }
}

/// `sbx_` and 24 hex digits from the kernel's CSPRNG.
fn new_id() -> Result<String, SandboxError> {
    Ok(format!("sbx_{}", random_hex(12)?))
}

/// `n` bytes from the kernel's CSPRNG, in hex.
fn random_hex(n: usize) -> Result<String, SandboxError> {
    let mut b = vec![0u8; n];
    crate::agent::fill_random(&mut b)
        .map_err(|e| SandboxError::Start(format!("no random bytes: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether `s` looks like an id we issue (anything else is not looked up).
pub fn plausible_id(s: &str) -> bool {
    s.len() == 28 && s.starts_with("sbx_") && s[4..].bytes().all(|b| b.is_ascii_hexdigit())
}
