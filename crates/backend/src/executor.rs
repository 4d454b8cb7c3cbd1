//! Runs one validated job in one fresh VM: admission, boot, run order, teardown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloude_image::catalog::Language;
use cloude_protocol::{FileSpec, RunRequest, RunResponse, StreamEvent, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::artifacts::{ArtifactError, Artifacts};
use crate::limiter::{LimitError, Limiter, Permit};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::snapshots::Snapshots;
use crate::vm::{Driver, Runtime, Slot, Source, Vm, VmError, VmSpec};

/// Memory the guest kernel and agent need on top of the program's limit.
const VM_OVERHEAD_MIB: u64 = 128;
/// How long a VM whose agent channel broke may take to show that its hypervisor exited.
const VM_EXIT_GRACE: Duration = Duration::from_millis(1000);
/// Slack on top of the stage timeouts before the backend gives up on the agent.
const AGENT_DEADLINE_SLACK: Duration = Duration::from_secs(30);

/// A validated request, ready to run.
#[derive(Clone, Debug)]
pub struct Job {
    pub language: Language,
    /// The first file is the entry point.
    pub files: Vec<FileSpec>,
    pub stdin: Vec<u8>,
    pub args: Vec<String>,
    pub run_timeout_ms: u64,
    pub compile_timeout_ms: u64,
    /// The program's memory limit, if the client set one.
    pub memory_mib: Option<u64>,
    /// The program may use the VM's network interface.
    pub network: bool,
    /// Tasks (processes and threads) the program may have at once; `None`: the agent's default.
    pub pids_limit: Option<u64>,
    /// CPU time the run may use, ms (enforced in the guest).
    pub cpu_limit_ms: Option<u64>,
    /// The run's stack limit, KiB.
    pub stack_limit_kib: Option<u64>,
    /// Largest file the run may write, KiB.
    pub file_size_limit_kib: Option<u64>,
    /// One pipe for the run's stdout and stderr (interleaved, reported as stdout).
    pub merge_stderr: bool,
    /// Test cases (compiled once, one run per case in the same VM); empty: one plain run.
    pub tests: Vec<TestCase>,
    /// A pseudo-terminal for the run stage (interactive runs only, `/v1/executions/ws`).
    pub tty: Option<cloude_protocol::TtySize>,
}

/// One test case of a [`Job`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestCase {
    pub stdin: Vec<u8>,
    /// Compared with the case's stdout by the API that asked (never sent to the VM).
    pub expected_output: Option<Vec<u8>>,
}

/// The run order a job sends to its VM's agent, with the server's output cap.
pub fn run_request(job: &Job, output_limit_bytes: u64) -> RunRequest {
    let staged = stage_entry(job);
    RunRequest {
        protocol_version: PROTOCOL_VERSION,
        files: staged.files,
        compile: staged.compile,
        run: staged.run,
        args: job.args.clone(),
        stdin: cloude_protocol::Bytes(job.stdin.clone()),
        env: job.language.env.clone(),
        compile_timeout_ms: job.compile_timeout_ms,
        run_timeout_ms: job.run_timeout_ms,
        output_limit_bytes,
        memory_limit_mib: job.memory_mib,
        pids_limit: job.pids_limit,
        poweroff_after: true,
        network: job.network,
        run_as_root: job.language.run_as_root,
        cpu_limit_ms: job.cpu_limit_ms,
        stack_limit_kib: job.stack_limit_kib,
        file_size_limit_kib: job.file_size_limit_kib,
        merge_stderr: job.merge_stderr,
        tests: job
            .tests
            .iter()
            .map(|t| cloude_protocol::TestInput {
                stdin: cloude_protocol::Bytes(t.stdin.clone()),
            })
            .collect(),
        tty: job.tty,
    }
}

/// The files and commands a job's VM gets once its entry file is placed.
#[derive(Debug, PartialEq, Eq)]
pub struct Staged {
    pub files: Vec<FileSpec>,
    pub compile: Option<Vec<String>>,
    pub run: Vec<String>,
}

/// Places the entry file (the first) so that the catalogue's commands work whatever the client
/// called it (Piston clients send `test.ts`, `test.pp`, `Solution.java`):
/// - an interpreted language runs the client's name: every argument that *is* the catalogue's
///   file name (`python3 main.py`) names the client's file instead, so `argv`, `__file__` and
///   tracebacks say what the client sent;
/// - where a command needs the catalogue's name (a compiler whose outputs derive from its
///   input's name, `tsc main.ts` → `main.js`, `fpc main.pas` → `main`; a name inside a longer
///   argument, `.read main.sql`, `sh -c "nasm … main.asm"`), a copy of the entry is also
///   staged under the catalogue's name and the commands run as written. The client's own file
///   stays beside it. Compile messages then name the catalogue's file (as Judge0's always do).
/// - if the client also sent a file under the catalogue's name (or a copy would not fit the
///   agent's caps), that file is left alone and only whole-argument names are replaced.
pub fn stage_entry(job: &Job) -> Staged {
    let mut files = job.files.clone();
    let cat = &job.language.file;
    let entry = files[0].clone();
    let subst = |argv: &[String]| -> Vec<String> {
        argv.iter()
            .map(|a| {
                if a == cat {
                    entry.name.clone()
                } else {
                    a.clone()
                }
            })
            .collect()
    };
    if entry.name == *cat {
        return Staged {
            files,
            compile: job.language.compile.clone(),
            run: job.language.run.clone(),
        };
    }
    // No room for a copy within the agent's caps: whole-argument names only.
    let total: usize = files.iter().map(|f| f.content.len()).sum();
    let no_room = files.len() >= cloude_protocol::MAX_FILES
        || total + entry.content.len() > cloude_protocol::MAX_FILES_BYTES;
    let taken = no_room || files.iter().any(|f| f.name == *cat);
    let compiled = job.language.compile.is_some();
    let run = subst(&job.language.run);
    let named_inside = run.iter().any(|a| a.contains(cat.as_str()));
    if taken || !(compiled || named_inside) {
        return Staged {
            files,
            compile: job.language.compile.as_deref().map(subst),
            run,
        };
    }
    files.push(FileSpec {
        name: cat.clone(),
        ..entry
    });
    Staged {
        files,
        compile: job.language.compile.clone(),
        run: if compiled {
            job.language.run.clone()
        } else {
            run
        },
    }
}

/// Where each phase's time went (an API type).
pub use cloude_api::Timings;

/// What happened to a job that was admitted.
#[derive(Debug)]
pub struct Outcome {
    /// The agent's answer, or why there is none (an internal error).
    pub result: Result<RunResponse, RunFailure>,
    pub timings: Timings,
    /// The limits the job ran under.
    pub limits: cloude_api::AppliedLimits,
}

/// Why an admitted job has no answer from its program: an internal error, reported to the
/// client as `internal_error` with this message.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    #[error("the VM failed to start: {0}")]
    Start(VmError),
    /// The program's network could not be opened.
    #[error("{0}")]
    Network(crate::vm::fence::FenceError),
    #[error("cannot talk to the VM's agent: {0}")]
    NoAgent(String),
    #[error("the agent did not answer within {0} ms")]
    AgentTimeout(u128),
    #[error(
        "the guest kernel panicked while running the program ({panic}); the VM stopped ({status})"
    )]
    GuestPanic { panic: String, status: String },
    #[error("the VM stopped unexpectedly ({0}) while running the program")]
    VmStopped(String),
    #[error("lost contact with the VM's agent: {0}")]
    LostAgent(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

/// Settings the executor needs from the configuration.
#[derive(Clone, Debug)]
pub struct ExecSettings {
    pub vcpus: u32,
    pub boot_timeout: Duration,
    pub output_limit_bytes: u64,
}

/// What an [`Executor`] is made of (the server's start-up, and the router tests, assemble it).
pub struct ExecutorParts {
    pub driver: Driver,
    pub runtime: Runtime,
    pub artifacts: Arc<Artifacts>,
    pub limiter: Limiter,
    pub metrics: Arc<Metrics>,
    pub settings: ExecSettings,
    /// VMs booted ahead of requests (off unless configured).
    pub pool: Pool,
    /// Snapshot restore (on by default where the driver supports it).
    pub snapshots: Snapshots,
}

/// Runs jobs in VMs. Its parts are the crate's own (the snapshot producer in `snapshots.rs`
/// and the warm pool reach them); the rest of the server asks through the methods below.
pub struct Executor {
    pub(crate) driver: Driver,
    pub(crate) runtime: Runtime,
    pub(crate) artifacts: Arc<Artifacts>,
    pub(crate) limiter: Limiter,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: ExecSettings,
    pub(crate) pool: Pool,
    pub(crate) snapshots: Snapshots,
}

/// Time limit of each stage of a template's warm-up run.
const WARM_UP_TIMEOUT_MS: u64 = 30_000;

/// Milliseconds as u64 (saturating).
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Executor {
    pub fn new(p: ExecutorParts) -> Self {
        Self {
            driver: p.driver,
            runtime: p.runtime,
            artifacts: p.artifacts,
            limiter: p.limiter,
            metrics: p.metrics,
            settings: p.settings,
            pool: p.pool,
            snapshots: p.snapshots,
        }
    }

    /// VMs alive now (running a job, pooled or being made).
    pub fn live_vms(&self) -> usize {
        self.runtime.live_vms()
    }

    /// Pooled VMs ready to take a job.
    pub fn pool_ready(&self) -> usize {
        self.pool.ready()
    }

    /// True when the warm pool keeps VMs for `language`.
    pub fn pool_wants(&self, language: &str) -> bool {
        self.pool.wants(language)
    }

    /// Jobs waiting for a VM slot.
    pub fn queued(&self) -> usize {
        self.limiter.queued()
    }

    /// The jail around every hypervisor, described (None: unjailed).
    pub fn jail(&self) -> Option<String> {
        self.driver.jail.as_ref().map(|j| j.describe())
    }

    /// The host-side rules that fence guests' network traffic: None when no VM has a network
    /// device (vsock transport), else whether they are installed and how.
    pub fn host_rules(&self) -> Option<(bool, Option<String>)> {
        let fence = self.runtime.fence();
        self.runtime
            .has_network()
            .then(|| (fence.is_some(), fence.map(|f| f.describe())))
    }

    /// The snapshot registry (status for `/healthz` and start-up).
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    /// The language images and kernels.
    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    /// Shutting down: refuses new jobs (queued ones fail fast) and stops the pooled VMs;
    /// returns how many pooled VMs were stopped.
    pub fn close(&self) -> usize {
        self.limiter.close();
        self.pool.close()
    }

    /// Waits for a VM slot (bounded queue); fails fast when saturated or shutting down.
    pub async fn admit(&self) -> Result<(Permit, Duration), LimitError> {
        let t = Instant::now();
        let p = self.limiter.acquire().await?;
        Ok((p, t.elapsed()))
    }

    /// A VM slot if one is free now ([`Limiter::try_acquire`]): for background work, which
    /// waits outside the clients' queue.
    pub fn try_admit(&self) -> Result<Option<Permit>, LimitError> {
        self.limiter.try_acquire()
    }

    /// What a snapshot template of `language` runs before it is sealed ([`VmSpec::warm_up`]):
    /// its compile and run commands on an empty entry file, with the default limits.
    pub(crate) fn warm_up_request(&self, language: &Language) -> RunRequest {
        RunRequest {
            protocol_version: PROTOCOL_VERSION,
            files: vec![FileSpec {
                name: language.file.clone(),
                content: String::new(),
                encoding: Default::default(),
            }],
            compile: language.compile.clone(),
            run: language.run.clone(),
            args: Vec::new(),
            stdin: cloude_protocol::Bytes(Vec::new()),
            env: language.env.clone(),
            compile_timeout_ms: WARM_UP_TIMEOUT_MS,
            run_timeout_ms: WARM_UP_TIMEOUT_MS,
            output_limit_bytes: 64 << 10,
            memory_limit_mib: None,
            pids_limit: None,
            poweroff_after: false,
            network: false,
            run_as_root: language.run_as_root,
            cpu_limit_ms: None,
            stack_limit_kib: None,
            file_size_limit_kib: None,
            merge_stderr: false,
            tests: vec![],
            tty: None,
        }
    }

    /// A VM for `job`: a pooled one when the pool has one that fits (returned with `true`), else
    /// one restored from the language's snapshot when the job fits its shape, else a fresh boot.
    async fn acquire_vm(self: &Arc<Self>, job: &Job) -> Result<(Vm, bool), AcquireError> {
        let language = &job.language;
        let needed = job.memory_mib.map_or(0, |m| m + VM_OVERHEAD_MIB);
        if needed <= language.memory_mib {
            if let Some(vm) = self.pool.take(&language.name) {
                self.metrics.pool_hit();
                self.refill(language);
                tracing::info!(cid = vm.cid(), pid = vm.pid(), "pooled VM taken");
                return Ok((vm, true));
            }
            if self.pool.wants(&language.name) {
                self.metrics.pool_miss();
                self.refill(language);
            }
        }
        let vm = self
            .start_vm(language, language.memory_mib.max(needed))
            .await?;
        Ok((vm, false))
    }

    /// A VM with `memory_mib` for `language`: restored from its snapshot when that is the
    /// language's default shape and a snapshot is ready, else booted.
    async fn start_vm(
        self: &Arc<Self>,
        language: &Language,
        memory_mib: u64,
    ) -> Result<Vm, AcquireError> {
        if memory_mib == language.memory_mib {
            if let Some(vm) = self.restore_vm(language).await {
                return Ok(vm);
            }
        }
        self.boot_vm(language, memory_mib).await
    }

    /// A VM of `language` for a sandbox: restored from its snapshot when one is ready, else
    /// booted; it is the caller's to keep (and to kill).
    pub async fn sandbox_vm(self: &Arc<Self>, language: &Language) -> Result<Vm, String> {
        self.start_vm(language, language.memory_mib)
            .await
            .map_err(|e| match e {
                AcquireError::Exec(e) => e.to_string(),
                AcquireError::Vm(e) => e.to_string(),
            })
    }

    /// vCPUs of every VM.
    pub fn vcpus(&self) -> u32 {
        self.settings.vcpus
    }

    /// Boots what the pool lacks for `language`, in the background.
    pub fn refill(self: &Arc<Self>, language: &Language) {
        for _ in 0..self.pool.reserve(&language.name) {
            let exec = self.clone();
            let language = language.clone();
            tokio::spawn(async move {
                match exec.start_vm(&language, language.memory_mib).await {
                    Ok(vm) => exec.pool.put(&language.name, Some(vm)),
                    Err(_) => exec.pool.put(&language.name, None),
                }
            });
        }
    }

    /// What a VM of `language` with `memory_mib` boots (builds or finds the artifacts).
    pub(crate) async fn vm_spec(
        &self,
        language: &Language,
        memory_mib: u64,
    ) -> Result<VmSpec, ArtifactError> {
        let kernel = self.artifacts.kernel().await?;
        let image = self.artifacts.image(language).await?;
        Ok(VmSpec {
            kernel: self.driver.kind.kernel(kernel.bzimage, kernel.vmlinux),
            initrd: image.initrd,
            root: image.root,
            warm_up: None,
            memory_mib,
            vcpus: self.settings.vcpus,
            transport: self.runtime.transport(),
            boot_timeout: self.settings.boot_timeout,
        })
    }

    /// A new slot (off the async workers: with the tcp transport a slot makes a tap and runs
    /// `nft`).
    pub(crate) async fn new_slot(&self) -> Result<Slot, VmError> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.slot())
            .await
            .map_err(|e| VmError::RuntimeDir(std::io::Error::other(e)))?
            .map_err(VmError::RuntimeDir)
    }

    /// Boots a fresh VM with `memory_mib` for `language`.
    async fn boot_vm(&self, language: &Language, memory_mib: u64) -> Result<Vm, AcquireError> {
        let spec = self.vm_spec(language, memory_mib).await?;
        let slot = self.new_slot().await?;
        let cid = slot.cid;
        let vm = self.driver.boot(&spec, slot).await.inspect_err(|e| {
            self.metrics.vm_failed();
            tracing::error!(cid, "VM boot failed: {e}");
        })?;
        self.metrics.vm_started();
        tracing::info!(cid, pid = vm.pid(), boot_ms = ms(vm.boot), "VM ready");
        Ok(vm)
    }

    /// Runs an admitted job, talking to its program the way `talk` says.
    pub async fn execute(
        self: &Arc<Self>,
        _permit: Permit,
        job: Job,
        queue: Duration,
        talk: Talk,
    ) -> Result<Outcome, ExecError> {
        let start = Instant::now();
        let mut timings = Timings {
            queue_ms: ms(queue),
            ..Timings::default()
        };
        let limits = cloude_api::AppliedLimits {
            timeout_ms: job.run_timeout_ms,
            compile_timeout_ms: job.compile_timeout_ms,
            memory_mib: job.memory_mib.unwrap_or(job.language.memory_mib),
            output_limit_bytes: self.settings.output_limit_bytes,
            cpu_limit_ms: job.cpu_limit_ms,
        };
        let (mut vm, pooled) = match self.acquire_vm(&job).await {
            Ok(v) => v,
            Err(AcquireError::Exec(e)) => return Err(e),
            Err(AcquireError::Vm(e)) => {
                timings.boot_ms = ms(start.elapsed());
                timings.total_ms = timings.queue_ms + ms(start.elapsed());
                return Ok(Outcome {
                    result: Err(RunFailure::Start(e)),
                    timings,
                    limits,
                });
            }
        };
        timings.vm_source = match (pooled, vm.source) {
            (true, _) => cloude_api::VmSource::Pool,
            (false, Source::Snapshot) => cloude_api::VmSource::Snapshot,
            (false, Source::Cold) => cloude_api::VmSource::Cold,
        };
        if pooled {
            // The boot happened before the request; it only waited to take the VM.
            timings.boot_ms = ms(start.elapsed());
        } else {
            timings.boot_ms = ms(vm.boot);
            if vm.source == Source::Cold {
                self.metrics.observe("boot", vm.boot);
            }
        }
        if let Some(open) = vm.network_opener().filter(|_| job.network) {
            let opened = tokio::task::spawn_blocking(open).await.unwrap_or_else(|e| {
                Err(crate::vm::fence::FenceError::Open(
                    vm.cid().to_string(),
                    e.to_string(),
                ))
            });
            if let Err(e) = opened {
                tracing::error!(cid = vm.cid(), "{e}");
                vm.shutdown(Duration::ZERO).await;
                timings.total_ms = timings.queue_ms + ms(start.elapsed());
                return Ok(Outcome {
                    result: Err(RunFailure::Network(e)),
                    timings,
                    limits,
                });
            }
        }
        let req = run_request(&job, self.settings.output_limit_bytes);
        // Every run (one, or one per test case) may take its whole timeout.
        let runs = job.tests.len().max(1) as u64;
        let deadline = Duration::from_millis(
            job.compile_timeout_ms
                .saturating_add(job.run_timeout_ms.saturating_mul(runs)),
        ) + AGENT_DEADLINE_SLACK
            .saturating_mul(u32::try_from(runs.min(8)).unwrap_or(8));
        let run_start = Instant::now();
        let cpu_before = vm.host_cpu_time();
        let result = match vm.agent().await {
            Err(e) => Err(RunFailure::NoAgent(e.to_string())),
            Ok(mut client) => {
                let talk = async {
                    match talk {
                        Talk::Whole => client.run(&req).await,
                        Talk::Stream(tx) => client.run_stream(&req, &tx).await,
                        Talk::Interactive { events, input } => {
                            client.run_interactive(&req, &events, input).await
                        }
                    }
                };
                let talk = tokio::time::timeout(deadline, talk);
                tokio::pin!(talk);
                // Watch the hypervisor too: over TCP a VM that dies (killed, guest panic) sends
                // no FIN, so the channel alone would wait out the whole deadline. An answer
                // already sent may still be in our buffers: it gets a moment to be read.
                let answer = tokio::select! {
                    r = &mut talk => r,
                    () = vm.exited() => match tokio::time::timeout(VM_EXIT_GRACE, &mut talk).await {
                        Ok(r) => r,
                        Err(_) => Ok(Err(crate::agent::AgentError::VmExited)),
                    },
                };
                match answer {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(self.explain(&mut vm, e.to_string()).await),
                    Err(_) => Err(RunFailure::AgentTimeout(deadline.as_millis())),
                }
            }
        };
        timings.run_ms = ms(run_start.elapsed());
        timings.host_cpu_ms = cpu_before
            .zip(vm.host_cpu_time())
            .map(|(a, b)| ms(b.saturating_sub(a)));
        self.metrics.observe("run", run_start.elapsed());
        if let Err(e) = &result {
            tracing::error!(
                cid = vm.cid(),
                "run failed: {e}; console: {}",
                vm.console_tail()
            );
        }
        vm.shutdown(Duration::ZERO).await;
        timings.total_ms = timings.queue_ms + ms(start.elapsed());
        Ok(Outcome {
            result,
            timings,
            limits,
        })
    }

    async fn explain(&self, vm: &mut Vm, err: String) -> RunFailure {
        match vm.exit_status_within(VM_EXIT_GRACE).await {
            Some(status) => {
                self.metrics.vm_failed();
                match panic_line(&vm.console_tail()) {
                    Some(panic) => RunFailure::GuestPanic { panic, status },
                    None => RunFailure::VmStopped(status),
                }
            }
            None => RunFailure::LostAgent(err),
        }
    }
}

/// The guest's "Kernel panic - not syncing: ..." line from its console, without the timestamp.
fn panic_line(console: &str) -> Option<String> {
    let line = console.lines().find(|l| l.contains("Kernel panic"))?;
    let start = line.find("Kernel panic")?;
    Some(line[start..].trim().chars().take(200).collect())
}

/// How a run's program is talked to.
pub enum Talk {
    /// Everything at once: the answer when it has ended.
    Whole,
    /// Output events sent to the channel as they happen, then the answer.
    Stream(mpsc::Sender<StreamEvent>),
    /// Output (and each stage's start and end) as it happens, while standard input and
    /// signals arrive from `input`; the answer when it has ended.
    Interactive {
        events: mpsc::Sender<StreamEvent>,
        input: mpsc::Receiver<cloude_protocol::interactive::Input>,
    },
}

/// Why no VM could be had for a job: the job cannot run at all (its artifacts are missing: an
/// error of the request), or a VM failed to start (an internal error, reported in the answer).
enum AcquireError {
    Exec(ExecError),
    Vm(VmError),
}

impl From<ArtifactError> for AcquireError {
    fn from(e: ArtifactError) -> Self {
        AcquireError::Exec(ExecError::Artifact(e))
    }
}

impl From<VmError> for AcquireError {
    fn from(e: VmError) -> Self {
        AcquireError::Vm(e)
    }
}

#[cfg(test)]
mod tests {
    use super::{panic_line, stage_entry, Job};
    use cloude_protocol::{Encoding, FileSpec};

    fn job(lang: &str, names: &[&str]) -> Job {
        let catalog = cloude_image::catalog::Catalog::default_catalog();
        let language = catalog
            .languages
            .iter()
            .find(|l| l.name == lang)
            .expect("language")
            .clone();
        Job {
            language,
            files: names
                .iter()
                .map(|n| FileSpec {
                    name: (*n).to_string(),
                    content: format!("content of {n}"),
                    encoding: Encoding::Utf8,
                })
                .collect(),
            stdin: vec![],
            args: vec![],
            run_timeout_ms: 1000,
            compile_timeout_ms: 1000,
            memory_mib: None,
            network: false,
            pids_limit: None,
            cpu_limit_ms: None,
            stack_limit_kib: None,
            file_size_limit_kib: None,
            merge_stderr: false,
            tests: vec![],
            tty: None,
        }
    }

    fn names(files: &[FileSpec]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn an_interpreted_entry_runs_under_the_clients_name() {
        let s = stage_entry(&job("python", &["test.py"]));
        assert_eq!(names(&s.files), ["test.py"]);
        assert_eq!(s.run, ["python3", "test.py"]);
    }

    #[test]
    fn compiled_entries_get_the_catalogue_name_too() {
        for (lang, file, cat) in [
            ("typescript", "test.ts", "main.ts"),
            ("pascal", "test.pp", "main.pas"),
            ("nasm", "test.nasm.asm", "main.asm"),
            ("java", "Solution.java", "Main.java"),
        ] {
            let j = job(lang, &[file]);
            let s = stage_entry(&j);
            assert_eq!(names(&s.files), [file, cat], "{lang}");
            assert_eq!(s.files[1].content, s.files[0].content, "{lang}");
            assert_eq!(s.compile, j.language.compile, "{lang}");
            assert_eq!(s.run, j.language.run, "{lang}");
        }
    }

    #[test]
    fn a_name_inside_an_argument_gets_the_copy_and_whole_names_the_client_file() {
        let s = stage_entry(&job("sqlite3", &["test.sql"]));
        assert_eq!(names(&s.files), ["test.sql", "main.sql"]);
        assert!(s.run.iter().any(|a| a == ".read main.sql"), "{:?}", s.run);
    }

    #[test]
    fn a_client_file_under_the_catalogue_name_is_never_overwritten() {
        let s = stage_entry(&job("c", &["test.c", "main.c"]));
        assert_eq!(names(&s.files), ["test.c", "main.c"]);
        assert!(
            s.compile.expect("compile").iter().any(|a| a == "test.c"),
            "whole-argument names only"
        );
        let s = stage_entry(&job("c", &["main.c", "util.h"]));
        assert_eq!(names(&s.files), ["main.c", "util.h"]);
    }

    #[test]
    fn panic_line_is_found_and_trimmed() {
        let console = "[    0.5] booting\n[    2.1] Kernel panic - not syncing: sysrq triggered crash\n[    2.1] CPU: 0";
        assert_eq!(
            panic_line(console).as_deref(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(panic_line("all fine\n"), None);
    }
}
