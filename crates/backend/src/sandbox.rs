//! Sandboxes: VMs that live across many calls (no HTTP here; the face is `api/sandboxes.rs`).
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
use cloude_protocol::sandbox::{ExecRequest, SandboxUser};
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
    /// Applied to every command (a command's own variables win).
    env: Vec<(String, String)>,
    /// Idle timeout and the instant it runs out.
    clock: Mutex<(Duration, Instant)>,
    /// `None` once killed.
    live: tokio::sync::Mutex<Option<Live>>,
    /// Set (and `cancel` notified) when the sandbox is killed: a call in progress ends at once.
    dead: AtomicBool,
    cancel: tokio::sync::Notify,
    /// Calls in progress (an idle timeout never kills a sandbox in the middle of one).
    busy: AtomicUsize,
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
        }
    }

    /// Pushes the deadline back by the idle timeout (every call does).
    fn touch(&self) {
        let mut c = self.clock();
        c.1 = Instant::now() + c.0;
    }

    fn expired(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0 && Instant::now() >= self.clock().1
    }

    /// Sets a new idle timeout, counted from now.
    pub fn set_timeout(&self, timeout: Duration) {
        *self.clock() = (timeout, Instant::now() + timeout);
    }

    /// Kills the VM (idempotent); a call in progress ends first.
    async fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.cancel.notify_waiters();
        if let Some(live) = self.live.lock().await.take() {
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

    /// Sandboxes running now.
    pub fn running(&self) -> usize {
        self.map().len()
    }

    /// Starts a sandbox of `language` (see the module documentation).
    pub async fn create(
        &self,
        language: &Language,
        timeout: Duration,
        env: Vec<(String, String)>,
        metadata: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Info, SandboxError> {
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
        tracing::info!(sandbox = %id, language = %language.name, cid = vm.cid(), boot_ms = vm.boot.as_millis() as u64, "sandbox started");
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            language: language.clone(),
            created_ms: now_ms(),
            vcpus: self.exec.vcpus(),
            metadata,
            env,
            clock: Mutex::new((timeout, Instant::now() + timeout)),
            live: tokio::sync::Mutex::new(Some(Live {
                vm,
                agent,
                _permit: permit,
            })),
            dead: AtomicBool::new(false),
            cancel: tokio::sync::Notify::new(),
            busy: AtomicUsize::new(0),
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

    /// Runs `call` on the sandbox's agent, one call at a time, within `within`; a VM that
    /// stopped makes the sandbox lost (removed).
    async fn call<T, F>(&self, id: &str, within: Duration, call: F) -> Result<T, SandboxError>
    where
        F: for<'a> FnOnce(
            &'a mut AgentClient,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, SandboxError>> + Send + 'a>,
        >,
    {
        let sb = self.get(id)?;
        sb.touch();
        sb.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&sb.busy);
        let mut guard = tokio::select! {
            g = sb.live.lock() => g,
            () = sb.cancel.notified() => return Err(SandboxError::NotFound(id.to_string())),
        };
        let Some(live) = guard.as_mut().filter(|_| !sb.dead.load(Ordering::SeqCst)) else {
            return Err(SandboxError::NotFound(id.to_string()));
        };
        let Live { vm, agent, .. } = live;
        let r = tokio::select! {
            () = sb.cancel.notified() => Err(SandboxError::NotFound(id.to_string())),
            r = tokio::time::timeout(within, call(agent)) => match r {
                Ok(r) => r,
                Err(_) => Err(SandboxError::Agent(format!("no answer within {} s", within.as_secs()))),
            },
            () = vm.exited() => {
                let why = vm.exit_status_within(Duration::from_millis(200)).await.unwrap_or_else(|| "exited".into());
                Err(SandboxError::Lost(id.to_string(), why))
            }
        };
        drop(guard);
        sb.touch();
        if let Err(SandboxError::Lost(..) | SandboxError::Agent(..)) = &r {
            // The VM or its agent connection is gone: so is the sandbox.
            self.map().remove(id);
            sb.kill().await;
            tracing::warn!(sandbox = %id, "sandbox lost");
        }
        r
    }

    /// One command in the sandbox.
    pub async fn exec(&self, id: &str, mut req: ExecRequest) -> Result<StageResult, SandboxError> {
        let within = Duration::from_millis(req.timeout_ms) + CALL_SLACK;
        {
            let sb = self.get(id)?;
            let mut env = sb.env.clone();
            env.retain(|(k, _)| !req.env.iter().any(|(rk, _)| rk == k));
            env.append(&mut req.env);
            req.env = env;
        }
        self.call(id, within, |agent| {
            Box::pin(async move { agent.exec(&req).await.map_err(agent_error) })
        })
        .await
    }

    /// A file's bytes or a directory's listing.
    pub async fn read(&self, id: &str, path: String) -> Result<FileAnswer, SandboxError> {
        let max = self.cfg.max_file_bytes;
        self.call(id, FILE_CALL_TIMEOUT, move |agent| {
            Box::pin(async move { agent.file_get(&path, max).await.map_err(agent_error) })
        })
        .await
    }

    /// Writes a file (parents made), owned by `user`.
    pub async fn write(
        &self,
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
        self.call(id, FILE_CALL_TIMEOUT, move |agent| {
            Box::pin(async move {
                agent
                    .file_put(&path, user, mode, data)
                    .await
                    .map_err(agent_error)
            })
        })
        .await
    }

    /// Removes a file or a directory tree.
    pub async fn remove(&self, id: &str, path: String) -> Result<(), SandboxError> {
        self.call(id, FILE_CALL_TIMEOUT, move |agent| {
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
    let mut b = [0u8; 12];
    crate::agent::fill_random(&mut b)
        .map_err(|e| SandboxError::Start(format!("no random id: {e}")))?;
    Ok(format!(
        "sbx_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// Whether `s` looks like an id we issue (anything else is not looked up).
pub fn plausible_id(s: &str) -> bool {
    s.len() == 28 && s.starts_with("sbx_") && s[4..].bytes().all(|b| b.is_ascii_hexdigit())
}
