//! One stage (compile or run): spawn the program in its own session and cgroup, feed stdin,
//! capture output under the cap, enforce the timeout, then measure and clean up.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloude_protocol::{Stage, StageResult, StageStatus, StreamEvent, StreamKind, TtySize};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt as _;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use crate::cgroup::{Limits, StageCgroup};
use crate::output::{pump, OutputCap, Sink};
use crate::reaper::Reaper;
use crate::sys::{self, ChildSetup, Rlimits};

/// How long output pipes may stay open after the program ended and its cgroup was killed
/// (only matters without a cgroup, where an escapee may keep a pipe open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How often a stage's cgroup CPU counter is read against its CPU limit.
const CPU_POLL: Duration = Duration::from_millis(10);

/// Everything one stage needs.
#[derive(Debug)]
pub struct StageSpec {
    pub stage: Stage,
    pub argv: Vec<String>,
    pub stdin: Stdin,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub timeout: Duration,
    pub output_limit: u64,
    pub limits: Limits,
    pub cgroup_root: Option<PathBuf>,
    pub cgroup_name: String,
    pub uid: u32,
    pub gid: u32,
    /// Run in a fresh network namespace (see [`sys::ChildSetup::new_netns`]).
    pub new_netns: bool,
    /// CPU time the stage's processes may use together.
    pub cpu_limit: Option<Duration>,
    pub rlimits: Rlimits,
    /// One pipe for stdout and stderr (reported as stdout).
    pub merge_stderr: bool,
    pub sink: Option<mpsc::Sender<StreamEvent>>,
    /// A sandbox command: when its main process ends by itself, what it started in the
    /// background keeps running in its cgroup (which stays); a limit still kills them all.
    pub keep_background: bool,
    /// An interactive run's signals (delivered to the stage's process group) and the
    /// `started`/`ended` events sent to `sink`.
    pub controls: Option<Arc<Controls>>,
    /// A pseudo-terminal of this size as the stage's standard streams (interactive runs).
    pub tty: Option<TtySize>,
}

/// What the host sends an interactive run's stage besides its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Signal(i32),
    Resize(u16, u16),
}

/// Where a stage's standard input comes from.
#[derive(Debug)]
pub enum Stdin {
    /// All of it, known up front.
    Bytes(Arc<Vec<u8>>),
    /// An interactive run's: written as it arrives until `close_stdin` or the end of the
    /// host's side.
    Live(Arc<Controls>),
}

/// One piece of an interactive run's standard input.
#[derive(Debug)]
pub enum StdinChunk {
    Data(Vec<u8>),
    Close,
}

/// What the host sends into an interactive run while it runs. The channels are unbounded
/// because their producer is bounded: the agent's reader refuses standard input past
/// [`cloude_protocol::interactive::MAX_INTERACTIVE_STDIN_BYTES`] and signals past
/// [`cloude_protocol::interactive::MAX_SIGNALS`] (a program that does not read must not stop
/// the reader, or a signal sent after the input could never arrive).
#[derive(Debug)]
pub struct Controls {
    pub stdin: tokio::sync::Mutex<mpsc::UnboundedReceiver<StdinChunk>>,
    pub control: tokio::sync::Mutex<mpsc::UnboundedReceiver<Control>>,
}

impl Controls {
    /// The controls and the senders that feed them.
    pub fn new() -> (
        Arc<Controls>,
        mpsc::UnboundedSender<StdinChunk>,
        mpsc::UnboundedSender<Control>,
    ) {
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let (sig_tx, sig_rx) = mpsc::unbounded_channel();
        let c = Controls {
            stdin: tokio::sync::Mutex::new(stdin_rx),
            control: tokio::sync::Mutex::new(sig_rx),
        };
        (Arc::new(c), stdin_tx, sig_tx)
    }
}

/// A result for a stage that could not start.
pub fn error_result(message: String) -> StageResult {
    StageResult {
        stdout: Default::default(),
        stderr: Default::default(),
        exit_code: None,
        signal: None,
        status: StageStatus::Error,
        message: Some(message),
        wall_ms: 0,
        cpu_ms: 0,
        memory_kib: 0,
    }
}

/// Runs one stage to completion. Never fails: problems become a `status: error` result.
pub async fn run_stage(spec: StageSpec) -> StageResult {
    let cgroup = match &spec.cgroup_root {
        Some(root) => match StageCgroup::create(root, &spec.cgroup_name, spec.limits) {
            Ok(cg) => Some(cg),
            Err(e) => return error_result(format!("cannot isolate the program: {e}")),
        },
        None => None,
    };
    let reaper = match Reaper::global() {
        Ok(r) => r,
        Err(e) => return error_result(e.to_string()),
    };
    let (mut cmd, merged, master) = match command(&spec, cgroup.as_ref()) {
        Ok(c) => c,
        Err(e) => return error_result(format!("cannot make the output pipe or terminal: {e}")),
    };
    let start = Instant::now();
    let (mut child, exit_rx) = match reaper.spawn(&mut cmd) {
        Ok(x) => x,
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            return error_result(format!("cannot start {:?}: {cause}", spec.argv[0]));
        }
    };
    drop(cmd);
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let announce = |ev: StreamEvent| {
        let tx = spec.sink.clone().filter(|_| spec.controls.is_some());
        async move {
            if let Some(tx) = tx {
                let _ = tx.send(ev).await;
            }
        }
    };
    announce(StreamEvent::Started { stage: spec.stage }).await;
    let cap = OutputCap::new(spec.output_limit);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sink = |_| {
        spec.sink.clone().map(|tx| Sink {
            stage: spec.stage,
            tx,
        })
    };
    let out = merged.or_else(|| child.stdout.take().map(OwnedFd::from));
    let err = child.stderr.take().map(OwnedFd::from);
    // With a terminal, its master end is the program's input and output (and resizes it).
    let term = match master.as_ref().map(terminal) {
        Some(Err(e)) => {
            kill_all(cgroup.as_ref(), pid);
            let r = error_result(format!("cannot drive the terminal: {e}"));
            announce(StreamEvent::ended(spec.stage, &r)).await;
            return r;
        }
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let (term_reader, term_writer) = match term {
        Some((r, w)) => (Some(r), Some(w)),
        None => (None, None),
    };
    let out_task = match term_reader {
        Some(r) => tokio::spawn(pump(
            r,
            StreamKind::Stdout,
            cap.clone(),
            sink(0),
            Some(stop_rx.clone()),
        )),
        None => tokio::spawn(drain(
            out,
            StreamKind::Stdout,
            cap.clone(),
            sink(0),
            stop_rx.clone(),
        )),
    };
    let err_task = tokio::spawn(drain(
        err,
        StreamKind::Stderr,
        cap.clone(),
        sink(1),
        stop_rx,
    ));
    let stdin_task = match (term_writer, &spec.stdin) {
        (Some(w), Stdin::Live(c)) => Some(tokio::spawn(feed_live(w, c.clone(), Some(EOT)))),
        (_, Stdin::Bytes(data)) => child
            .stdin
            .take()
            .map(|w| tokio::spawn(feed(OwnedFd::from(w), data.clone()))),
        (None, Stdin::Live(c)) => child.stdin.take().map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                if let Ok(w) = pipe::Sender::from_owned_fd(OwnedFd::from(w)) {
                    feed_live(w, c, None).await;
                }
            })
        }),
    };
    // Held for the whole stage: signals that arrive between two stages wait for the next.
    let mut signals = match &spec.controls {
        Some(c) => Some(c.control.lock().await),
        None => None,
    };

    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    tokio::pin!(exit_rx);
    let mut reason = None;
    let mut cpu_poll = tokio::time::interval(CPU_POLL);
    cpu_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cpu_limit_us = spec.cpu_limit.map(|d| d.as_micros() as u64);
    let polled = cgroup.as_ref().filter(|_| cpu_limit_us.is_some());
    let waited = loop {
        tokio::select! {
            w = &mut exit_rx => break w.ok(),
            _ = cpu_poll.tick(), if polled.is_some() && reason.is_none() => {
                let used = polled.and_then(StageCgroup::cpu_us).unwrap_or(0);
                if cpu_limit_us.is_some_and(|l| used > l) {
                    reason = Some(StageStatus::CpuLimit);
                    kill_all(cgroup.as_ref(), pid);
                }
            }
            _ = &mut deadline, if reason.is_none() => {
                reason = Some(StageStatus::Timeout);
                kill_all(cgroup.as_ref(), pid);
            }
            _ = cap.exceeded(), if reason.is_none() => {
                reason = Some(StageStatus::OutputLimit);
                kill_all(cgroup.as_ref(), pid);
            }
            sig = next_signal(&mut signals), if signals.is_some() => match sig {
                Some(Control::Signal(n)) => deliver(n, cgroup.as_ref(), pid),
                Some(Control::Resize(rows, cols)) => {
                    if let Some(m) = &master {
                        let _ = sys::set_winsize(m.as_fd(), rows, cols);
                    }
                }
                None => signals = None,
            },
        }
    };
    drop(signals);
    let wall = start.elapsed();
    // The stage ends with its main process: whatever it left behind goes too (a sandbox
    // command's background processes stay, unless a limit stopped the command).
    let keep = spec.keep_background && reason.is_none();
    if !keep {
        kill_all(cgroup.as_ref(), pid);
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    let grace = tokio::spawn(async move {
        tokio::time::sleep(DRAIN_GRACE).await;
        let _ = stop_tx.send(true);
    });
    let stdout = out_task.await.unwrap_or_default();
    let stderr = err_task.await.unwrap_or_default();
    grace.abort();
    let stats = cgroup.as_ref().map(StageCgroup::stats).unwrap_or_default();
    if let Some(cg) = cgroup {
        if keep {
            cg.keep();
        } else {
            let _ = tokio::task::spawn_blocking(move || cg.kill_and_remove()).await;
        }
    }

    let Some(waited) = waited else {
        tracing::error!(
            pid = pid.as_raw(),
            "lost track of the program's exit status"
        );
        let r = error_result("lost track of the program's exit status".into());
        announce(StreamEvent::ended(spec.stage, &r)).await;
        return r;
    };
    let cpu_us = stats.cpu_us.unwrap_or(waited.cpu_us);
    // Past the limit between two polls, or stopped by the RLIMIT_CPU backstop: the limit ended
    // it all the same.
    let over_cpu =
        cpu_limit_us.is_some_and(|l| cpu_us > l || matches!(waited.signal, Some(libc::SIGXCPU)));
    let status = match reason {
        Some(r) => r,
        None if over_cpu => StageStatus::CpuLimit,
        None if stats.oom_killed => StageStatus::MemoryLimit,
        None if cap.is_exceeded() => StageStatus::OutputLimit,
        None => StageStatus::Ok,
    };
    let message = match status {
        StageStatus::Timeout => Some(format!("killed after {} ms", spec.timeout.as_millis())),
        StageStatus::CpuLimit => Some(cloude_protocol::cpu_limit_message(
            spec.cpu_limit.map_or(0, |d| d.as_millis() as u64),
        )),
        StageStatus::OutputLimit => {
            Some(format!("output beyond {} bytes dropped", spec.output_limit))
        }
        StageStatus::MemoryLimit => Some("killed by the memory limit".to_string()),
        _ => None,
    };
    let result = StageResult {
        stdout: stdout.into(),
        stderr: stderr.into(),
        exit_code: waited.code,
        signal: waited.signal,
        status,
        message,
        wall_ms: u64::try_from(wall.as_millis()).unwrap_or(u64::MAX),
        cpu_ms: cpu_us / 1000,
        memory_kib: stats.memory_peak_kib.unwrap_or(waited.maxrss_kib),
    };
    announce(StreamEvent::ended(spec.stage, &result)).await;
    result
}

/// The stage's command, and with `merge_stderr` the read end of the one pipe its stdout and
/// stderr share (the write ends live in the command, dropped after the spawn).
fn command(
    spec: &StageSpec,
    cgroup: Option<&StageCgroup>,
) -> std::io::Result<(Command, Option<OwnedFd>, Option<OwnedFd>)> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::piped());
    let mut master = None;
    let merged = if let Some(size) = spec.tty {
        let (m, slave) = crate::pty::open(size)?;
        cmd.stdin(slave.try_clone()?)
            .stdout(slave.try_clone()?)
            .stderr(slave);
        if !spec.env.iter().any(|(k, _)| k == "TERM") {
            cmd.env("TERM", "xterm-256color");
        }
        master = Some(m);
        None
    } else if spec.merge_stderr {
        let (r, w) = std::io::pipe()?;
        cmd.stdout(w.try_clone()?).stderr(w);
        Some(OwnedFd::from(r))
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        None
    };
    sys::prepare_child(
        &mut cmd,
        ChildSetup {
            cgroup_procs: cgroup.map(|c| c.procs_file().as_raw_fd()),
            uid: spec.uid,
            gid: spec.gid,
            new_netns: spec.new_netns,
            rlimits: spec.rlimits,
            controlling_tty: spec.tty.is_some(),
        },
    );
    Ok((cmd, merged, master))
}

/// End of transmission: what `close_stdin` types on a terminal (its end of file).
const EOT: u8 = 0x04;

/// A terminal's master end as the stage's output reader and input writer.
fn terminal(master: &OwnedFd) -> std::io::Result<(crate::pty::Master, crate::pty::Master)> {
    Ok((
        crate::pty::Master::new(master.try_clone()?)?,
        crate::pty::Master::new(master.try_clone()?)?,
    ))
}

/// Kills the stage's processes: the whole cgroup, and the session's process group.
fn kill_all(cgroup: Option<&StageCgroup>, pid: Pid) {
    if let Some(cg) = cgroup {
        cg.kill();
    }
    // The program leads its own session, so its process group id is its pid.
    let _ = killpg(pid, Signal::SIGKILL);
}

async fn drain(
    fd: Option<OwnedFd>,
    kind: StreamKind,
    cap: Arc<OutputCap>,
    sink: Option<Sink>,
    stop: watch::Receiver<bool>,
) -> Vec<u8> {
    let Some(fd) = fd else { return Vec::new() };
    let reader = match pipe::Receiver::from_owned_fd(fd) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot watch the {kind:?} pipe: {e}");
            return Vec::new();
        }
    };
    pump(reader, kind, cap, sink, Some(stop)).await
}

async fn feed(fd: OwnedFd, data: Arc<Vec<u8>>) {
    let Ok(mut w) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    // A program that does not read its input (EPIPE) is not an error.
    let _ = w.write_all(&data).await;
    let _ = w.shutdown().await;
}

/// Writes an interactive run's standard input as it arrives; closes it at `close_stdin` or
/// when the host's side ends. Data the program no longer reads (EPIPE) is dropped.
async fn feed_live<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    controls: Arc<Controls>,
    eof: Option<u8>,
) {
    let mut rx = controls.stdin.lock().await;
    let mut open = true;
    loop {
        let data = match (rx.recv().await, eof) {
            (Some(StdinChunk::Data(d)), _) => d,
            // A terminal stays open: end of input is a character its line discipline reads.
            (Some(StdinChunk::Close), Some(c)) => vec![c],
            (Some(StdinChunk::Close), None) | (None, _) => break,
        };
        if open && w.write_all(&data).await.is_err() {
            open = false;
        }
    }
    let _ = w.shutdown().await;
}

/// The next signal of an interactive run (`None`: the host will send no more).
async fn next_signal(
    rx: &mut Option<tokio::sync::MutexGuard<'_, mpsc::UnboundedReceiver<Control>>>,
) -> Option<Control> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends a client's signal to the stage's process group; `SIGKILL` takes its whole cgroup.
fn deliver(signal: i32, cgroup: Option<&StageCgroup>, pid: Pid) {
    let Ok(sig) = Signal::try_from(signal) else {
        return;
    };
    if sig == Signal::SIGKILL {
        kill_all(cgroup, pid);
    } else {
        let _ = killpg(pid, sig);
    }
}

/// The working directory path as given to the program (`HOME` too).
pub fn home_env(cwd: &Path) -> (String, String) {
    ("HOME".into(), cwd.to_string_lossy().into_owned())
}
