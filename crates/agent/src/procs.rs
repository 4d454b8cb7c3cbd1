//! Sandbox processes (`/v1/procs`): processes that outlive the call that started them, whose
//! output the host reads while they run, whose standard input and signals it sends later.
//!
//! Each one is a sandbox command's stage ([`Executor::exec_spec`]: its cgroup, limits and
//! user) run in a task of its own with live controls. Its output goes into a buffer of at most
//! [`PROC_BUFFER_BYTES`] (the oldest bytes are dropped first and reported as skipped), so a
//! process nobody reads never stops and never grows the agent. At most [`MAX_PROCS`] are kept;
//! an ended one is forgotten when it is deleted, or (oldest first) when a new one needs room.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use cloude_protocol::interactive::{
    signal_allowed, Input, MAX_INTERACTIVE_STDIN_BYTES, MAX_SIGNALS,
};
use cloude_protocol::sandbox::{
    ProcChunk, ProcEnd, ProcInfo, ProcOutput, ProcRead, ProcStart, ProcStarted, FROM_NOW,
    MAX_PROCS, MAX_PROC_WAIT_MS, PROC_BUFFER_BYTES,
};
use cloude_protocol::{StreamEvent, StreamKind};
use tokio::sync::{mpsc, Notify};

use crate::executor::{run_stage, Control, Controls, Stdin, StdinChunk};
use crate::server::{check_unsealed, AgentState, ApiError};

/// Output events queued between a process and its buffer.
const EVENT_QUEUE: usize = 64;
/// Arguments of each process a listing shows, and the bytes of each.
const LIST_ARGS: usize = 64;
const LIST_ARG_BYTES: usize = 1024;

/// Every process of this agent.
#[derive(Debug, Default)]
pub struct Procs {
    map: Mutex<HashMap<u32, Arc<Proc>>>,
    next: AtomicU32,
}

#[derive(Debug)]
struct Proc {
    info: ProcInfo,
    /// When it was started (the oldest ended one is forgotten first).
    seq: u32,
    stdin: mpsc::UnboundedSender<StdinChunk>,
    control: mpsc::UnboundedSender<Control>,
    state: Mutex<Buffer>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Buffer {
    chunks: VecDeque<(StreamKind, Vec<u8>)>,
    /// Offset of the first buffered byte, and of the byte after the last one.
    start: u64,
    end: u64,
    finished: Option<ProcEnd>,
    stdin_bytes: usize,
    signals: usize,
}

impl Buffer {
    fn push(&mut self, kind: StreamKind, data: Vec<u8>) {
        self.end += data.len() as u64;
        self.chunks.push_back((kind, data));
        while self.end - self.start > PROC_BUFFER_BYTES as u64 {
            let Some((_, first)) = self.chunks.front_mut() else {
                break;
            };
            let over = (self.end - self.start - PROC_BUFFER_BYTES as u64) as usize;
            if over >= first.len() {
                self.start += first.len() as u64;
                self.chunks.pop_front();
            } else {
                first.drain(..over);
                self.start += over as u64;
            }
        }
    }

    fn read(&self, since: u64) -> ProcOutput {
        if since == FROM_NOW {
            return ProcOutput {
                chunks: Vec::new(),
                next: self.end,
                skipped: 0,
                end: self.finished.clone(),
            };
        }
        let from = since.max(self.start);
        let mut chunks = Vec::new();
        let mut at = self.start;
        for (kind, data) in &self.chunks {
            let len = data.len() as u64;
            if at + len > from {
                let skip = from.saturating_sub(at) as usize;
                chunks.push(ProcChunk {
                    stream: *kind,
                    data: data[skip..].to_vec().into(),
                });
            }
            at += len;
        }
        ProcOutput {
            chunks,
            next: self.end.max(since),
            skipped: from - since.min(from),
            end: self.finished.clone(),
        }
    }
}

impl Procs {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: u32) -> Result<Arc<Proc>, ApiError> {
        self.map()
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no process {id}")))
    }
}

impl Proc {
    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `POST /v1/procs`.
pub async fn start(
    State(state): State<Arc<AgentState>>,
    Json(req): Json<ProcStart>,
) -> Result<Json<ProcStarted>, ApiError> {
    check_unsealed(&state)?;
    req.validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut spec = state.executor.exec_spec(&req.as_exec())?;
    let procs = &state.procs;
    let seq = procs.next.fetch_add(1, Ordering::SeqCst);
    let id = seq + 1;
    {
        // Room for one more: forget the oldest ended process, or refuse.
        let mut map = procs.map();
        if map.len() >= MAX_PROCS {
            let oldest = map
                .values()
                .filter(|p| p.buffer().finished.is_some())
                .min_by_key(|p| p.seq)
                .map(|p| p.info.id);
            match oldest {
                Some(old) => {
                    map.remove(&old);
                }
                None => {
                    return Err(ApiError::Conflict(format!(
                        "{MAX_PROCS} processes are running, the most a sandbox may have"
                    )))
                }
            }
        }
    }
    let (controls, stdin_tx, control_tx) = Controls::new();
    if req.stdin {
        spec.stdin = Stdin::Live(controls.clone());
    }
    spec.controls = Some(controls);
    spec.tty = req.tty;
    spec.timeout = if req.timeout_ms == 0 {
        Duration::from_millis(cloude_protocol::sandbox::MAX_PROC_TIMEOUT_MS)
    } else {
        Duration::from_millis(req.timeout_ms)
    };
    spec.cgroup_name = format!("proc-{}-{id}", std::process::id());
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    spec.sink = Some(tx);
    let proc = Arc::new(Proc {
        info: ProcInfo {
            id,
            tag: req.tag.clone(),
            argv: req.argv.clone(),
            env: req.env.clone(),
            cwd: spec.cwd.display().to_string(),
            running: true,
        },
        seq,
        stdin: stdin_tx,
        control: control_tx,
        state: Mutex::new(Buffer::default()),
        changed: Notify::new(),
    });
    procs.map().insert(id, proc.clone());
    tokio::spawn(async move {
        let collect = async {
            while let Some(ev) = rx.recv().await {
                if let StreamEvent::Output { stream, data, .. } = ev {
                    proc.buffer().push(stream, data.0);
                    proc.changed.notify_waiters();
                }
            }
        };
        let (r, ()) = tokio::join!(run_stage(spec), collect);
        proc.buffer().finished = Some(ProcEnd {
            exit_code: r.exit_code,
            signal: r.signal,
            status: r.status,
            message: r.message,
            wall_ms: r.wall_ms,
            cpu_ms: r.cpu_ms,
            memory_kib: r.memory_kib,
        });
        proc.changed.notify_waiters();
        tracing::info!(proc = id, "sandbox process ended");
    });
    Ok(Json(ProcStarted { id }))
}

/// `POST /v1/procs/{id}/read`.
pub async fn read(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<u32>,
    Json(req): Json<ProcRead>,
) -> Result<Json<ProcOutput>, ApiError> {
    let proc = state.procs.get(id)?;
    let wait = Duration::from_millis(req.wait_ms.min(MAX_PROC_WAIT_MS));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so a change in between is not missed.
        let changed = proc.changed.notified();
        {
            let b = proc.buffer();
            if (b.end > req.since && req.since != FROM_NOW)
                || b.finished.is_some()
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(Json(b.read(req.since)));
            }
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// `POST /v1/procs/{id}/input`: standard input, its end, a signal or a terminal size.
pub async fn input(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<u32>,
    Json(input): Json<Input>,
) -> Result<StatusCode, ApiError> {
    let proc = state.procs.get(id)?;
    let mut b = proc.buffer();
    if b.finished.is_some() {
        return Err(ApiError::NotFound(format!("process {id} has ended")));
    }
    match input {
        Input::Stdin { data } => {
            b.stdin_bytes = b.stdin_bytes.saturating_add(data.0.len());
            if b.stdin_bytes > MAX_INTERACTIVE_STDIN_BYTES {
                return Err(ApiError::BadRequest(format!(
                    "a process reads at most {MAX_INTERACTIVE_STDIN_BYTES} bytes of input"
                )));
            }
            let _ = proc.stdin.send(StdinChunk::Data(data.0));
        }
        Input::CloseStdin => {
            let _ = proc.stdin.send(StdinChunk::Close);
        }
        Input::Signal { .. } | Input::Resize { .. } if b.signals >= MAX_SIGNALS => {
            return Err(ApiError::BadRequest(format!(
                "a process takes at most {MAX_SIGNALS} signals and resizes"
            )));
        }
        Input::Signal { signal } => {
            if !signal_allowed(signal) {
                return Err(ApiError::BadRequest(format!("no signal {signal}")));
            }
            b.signals += 1;
            let _ = proc.control.send(Control::Signal(signal));
        }
        Input::Resize { rows, cols } => {
            cloude_protocol::TtySize { rows, cols }
                .validate()
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            b.signals += 1;
            let _ = proc.control.send(Control::Resize(rows, cols));
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/procs`: every process kept, oldest first.
pub async fn list(State(state): State<Arc<AgentState>>) -> Json<Vec<ProcInfo>> {
    let mut v: Vec<(u32, ProcInfo)> = state
        .procs
        .map()
        .values()
        .map(|p| {
            let mut i = p.info.clone();
            i.running = p.buffer().finished.is_none();
            // A listing stays small whatever was started: each process's first arguments,
            // each cut short.
            i.argv.truncate(LIST_ARGS);
            for a in &mut i.argv {
                if a.len() > LIST_ARG_BYTES {
                    let mut n = LIST_ARG_BYTES;
                    while !a.is_char_boundary(n) {
                        n -= 1;
                    }
                    a.truncate(n);
                }
            }
            i.env.clear();
            (p.seq, i)
        })
        .collect();
    v.sort_by_key(|(s, _)| *s);
    Json(v.into_iter().map(|(_, i)| i).collect())
}

/// `DELETE /v1/procs/{id}`: kills it (everything it started) if it runs, and forgets it.
pub async fn delete(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<u32>,
) -> Result<StatusCode, ApiError> {
    let proc = state
        .procs
        .map()
        .remove(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no process {id}")))?;
    if proc.buffer().finished.is_none() {
        let _ = proc.control.send(Control::Signal(libc::SIGKILL));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_keeps_the_newest_bytes_and_counts_the_rest() {
        let mut b = Buffer::default();
        for _ in 0..5 {
            b.push(StreamKind::Stdout, vec![b'a'; 700 * 1024]);
        }
        b.push(StreamKind::Stderr, b"end".to_vec());
        let total = 5 * 700 * 1024 + 3;
        assert_eq!(b.end, total as u64);
        assert!(b.end - b.start <= PROC_BUFFER_BYTES as u64);
        let all = b.read(0);
        let got: usize = all.chunks.iter().map(|c| c.data.0.len()).sum();
        assert_eq!(got, PROC_BUFFER_BYTES);
        assert_eq!(all.skipped as usize, total - PROC_BUFFER_BYTES);
        assert_eq!(all.next, total as u64);
        assert_eq!(
            all.chunks.last().map(|c| c.stream),
            Some(StreamKind::Stderr)
        );
        // From the middle of the kept bytes: only what follows, nothing skipped.
        let tail = b.read(total as u64 - 2);
        assert_eq!(tail.skipped, 0);
        assert_eq!(tail.chunks.len(), 1);
        assert_eq!(tail.chunks[0].data.0, b"nd");
        // From now on: nothing yet, and where to read next.
        let now = b.read(FROM_NOW);
        assert!(now.chunks.is_empty());
        assert_eq!(now.next, total as u64);
        // Past the end (a confused reader): nothing, and no underflow.
        let past = b.read(total as u64 + 10);
        assert!(past.chunks.is_empty() && past.skipped == 0);
    }
}
