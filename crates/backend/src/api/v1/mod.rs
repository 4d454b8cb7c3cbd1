//! The native API: `/v1/executions`, `/v1/executions/stream`, `/v1/languages`.

pub mod ws;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cloude_protocol::{RunResponse, StageResult, StageStatus, StreamEvent};
use tokio::sync::mpsc;

use super::conn::ConnWatch;
use super::error::ApiError;
use super::json::ApiJson;
use super::request_id::RequestId;
use super::types::{
    signal_name, ExecutionRequest, ExecutionResponse, LanguageInfo, StageOut, Status, StreamLine,
};
use super::validate::{build_job, decode_content, find_language, Draft, RawFile};
use super::AppState;
use crate::executor::{ExecError, Job, Outcome, Talk, TestCase};
use cloude_api::{TestOut, TestsOut, Verdict};

/// Events buffered between the VM task and a slow streaming client.
const STREAM_BUFFER_EVENTS: usize = 64;

fn to_job(state: &AppState, r: ExecutionRequest) -> Result<Job, ApiError> {
    job_from_request(&state.catalog, &state.config, r)
}

/// Decodes and validates a `/v1/executions` body exactly as the handler does, without server
/// state (pure; fuzzed by `fuzz/fuzz_targets/api_request.rs`).
pub fn decode_execution(
    body: &[u8],
    catalog: &cloude_image::catalog::Catalog,
    config: &crate::config::Config,
) -> Result<Job, ApiError> {
    job_from_request(catalog, config, super::json::decode(body)?)
}

/// Validates a decoded request against the catalogue and the limits.
pub fn job_from_request(
    catalog: &cloude_image::catalog::Catalog,
    config: &crate::config::Config,
    r: ExecutionRequest,
) -> Result<Job, ApiError> {
    let language = find_language(catalog, &r.language, r.version.as_deref())?.clone();
    if r.network && !config.network.allow {
        return Err(ApiError::invalid(
            "network",
            "networking is disabled on this server",
        ));
    }
    let files = match (r.code, r.files) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "files",
                "send either code or files, not both",
            ))
        }
        (Some(code), None) if code.is_empty() => {
            return Err(ApiError::invalid("code", "code must not be empty"))
        }
        (Some(code), None) => vec![RawFile {
            name: Some(language.file.clone()),
            bytes: code.into_bytes(),
            field: "code".into(),
        }],
        (None, Some(files)) => files
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let field = format!("files[{i}]");
                let bytes = decode_content(&field, &f.content, f.encoding.as_deref())?;
                Ok(RawFile {
                    name: Some(f.name),
                    bytes,
                    field,
                })
            })
            .collect::<Result<_, ApiError>>()?,
        (None, None) => vec![],
    };
    let tests = match r.tests {
        None => vec![],
        Some(t) if t.is_empty() => {
            return Err(ApiError::invalid(
                "tests",
                "give at least one test case, or leave tests out",
            ))
        }
        Some(t) => t
            .into_iter()
            .map(|t| TestCase {
                stdin: t.stdin.unwrap_or_default().into_bytes(),
                expected_output: t.expected_output.map(String::into_bytes),
            })
            .collect(),
    };
    if let Some(t) = &r.tty {
        t.validate()
            .map_err(|e| ApiError::invalid("tty", e.to_string()))?;
        if !tests.is_empty() {
            return Err(ApiError::invalid("tty", "test cases have no terminal"));
        }
    }
    let mut job = build_job(
        Draft {
            language,
            files,
            stdin: r.stdin.unwrap_or_default(),
            args: r.args,
            timeout_ms: r.timeout_ms,
            compile_timeout_ms: r.compile_timeout_ms,
            memory_mib: r.memory_mib,
            network: r.network,
            cpu_limit_ms: r.cpu_limit_ms,
            tests,
        },
        &config.limits,
    )?;
    job.tty = r.tty;
    Ok(job)
}

/// Refuses a terminal on the routes that have no input while the program runs.
fn no_tty(job: &Job) -> Result<(), ApiError> {
    if job.tty.is_some() {
        return Err(ApiError::invalid(
            "tty",
            "a terminal needs a connection that carries input: use the WebSocket /v1/executions/ws",
        ));
    }
    Ok(())
}

pub(crate) fn exec_error(e: ExecError) -> ApiError {
    match e {
        ExecError::Limit(l) => l.into(),
        ExecError::Artifact(a) => ApiError::unavailable(a.to_string()),
    }
}

fn lossy(b: &cloude_protocol::Bytes) -> String {
    String::from_utf8_lossy(&b.0).into_owned()
}

/// Base64 of `b` when it is not valid UTF-8 (so that binary output survives JSON).
fn exact(b: &cloude_protocol::Bytes) -> Option<String> {
    use base64::Engine as _;
    std::str::from_utf8(&b.0)
        .is_err()
        .then(|| base64::engine::general_purpose::STANDARD.encode(&b.0))
}

/// Splits streamed chunks into text without cutting a UTF-8 sequence in two.
#[derive(Default)]
pub(crate) struct Utf8Joiner {
    pending: Vec<u8>,
}

impl Utf8Joiner {
    /// Most bytes kept back waiting for the rest of a UTF-8 sequence.
    const MAX_PENDING: usize = 3;

    pub(crate) fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete sequence at the very end: keep it for the next chunk.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let keep = if keep <= Self::MAX_PENDING { keep } else { 0 };
        let tail = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = tail;
        text
    }
}

fn stage_out(s: &StageResult) -> StageOut {
    StageOut {
        stdout: lossy(&s.stdout),
        stderr: lossy(&s.stderr),
        exit_code: s.exit_code,
        signal: s.signal.map(signal_name),
        signal_number: s.signal,
        status: s.status,
        wall_ms: s.wall_ms,
        cpu_ms: s.cpu_ms,
        memory_kib: s.memory_kib,
    }
}

/// The overall status of an agent answer.
pub fn overall_status(r: &RunResponse) -> (Status, Option<String>) {
    let from_stage = |s: &StageResult| match s.status {
        StageStatus::Ok => Status::Ok,
        StageStatus::Timeout => Status::Timeout,
        StageStatus::CpuLimit => Status::CpuLimit,
        StageStatus::OutputLimit => Status::OutputLimit,
        StageStatus::MemoryLimit => Status::MemoryLimit,
        StageStatus::Error => Status::InternalError,
    };
    if let Some(c) = &r.compile {
        let ran = r.run.is_some() || !r.tests.is_empty();
        let failed = c.status != StageStatus::Ok || c.exit_code != Some(0) || !ran;
        if failed {
            return match c.status {
                StageStatus::Ok => (Status::CompileError, None),
                StageStatus::Error => (Status::InternalError, c.message.clone()),
                _ => (from_stage(c), c.message.clone()),
            };
        }
    }
    match &r.run {
        Some(s) => (from_stage(s), s.message.clone()),
        // Test cases ran: `response` takes the status from the case it shows.
        None if !r.tests.is_empty() => (Status::Ok, None),
        None => (Status::InternalError, Some("the agent ran nothing".into())),
    }
}

/// A test case's verdict: its stage's status, then its exit, then its output.
pub fn case_verdict(s: &StageResult, case: &TestCase) -> Verdict {
    match s.status {
        StageStatus::Timeout => Verdict::Timeout,
        StageStatus::CpuLimit => Verdict::CpuLimit,
        StageStatus::OutputLimit => Verdict::OutputLimit,
        StageStatus::MemoryLimit => Verdict::MemoryLimit,
        StageStatus::Error => Verdict::InternalError,
        StageStatus::Ok if s.signal.is_some() || s.exit_code != Some(0) => Verdict::RuntimeError,
        // Judge0's comparison, except that no output equals an empty expected output here
        // (Judge0's null stdout is a quirk of its storage).
        StageStatus::Ok => match &case.expected_output {
            Some(e) if !crate::judge0::verdict::matches(Some(e), Some(&s.stdout.0)) => {
                Verdict::WrongAnswer
            }
            _ => Verdict::Passed,
        },
    }
}

/// The `tests` section, and the index of the case the top-level fields describe (the first
/// that did not pass, else the last).
fn tests_out(job: &Job, results: &[StageResult]) -> (TestsOut, Option<usize>) {
    let cases: Vec<TestOut> = results
        .iter()
        .zip(&job.tests)
        .map(|(s, case)| TestOut {
            verdict: case_verdict(s, case),
            stdout: lossy(&s.stdout),
            stderr: lossy(&s.stderr),
            stdout_base64: exact(&s.stdout),
            stderr_base64: exact(&s.stderr),
            exit_code: s.exit_code,
            signal: s.signal.map(signal_name),
            signal_number: s.signal,
            status: s.status,
            message: s.message.clone(),
            wall_ms: s.wall_ms,
            cpu_ms: s.cpu_ms,
            memory_kib: s.memory_kib,
        })
        .collect();
    let first_bad = cases.iter().position(|c| c.verdict != Verdict::Passed);
    let shown = first_bad.or(cases.len().checked_sub(1));
    let out = TestsOut {
        verdict: match (first_bad, cases.len() == job.tests.len()) {
            (Some(i), _) => cases[i].verdict,
            (None, true) => Verdict::Passed,
            // Fewer answers than cases: the agent stopped early.
            (None, false) => Verdict::InternalError,
        },
        passed: cases
            .iter()
            .filter(|c| c.verdict == Verdict::Passed)
            .count() as u32,
        total: job.tests.len() as u32,
        cases,
    };
    (out, shown)
}

pub fn response(job: &Job, request_id: &str, outcome: Outcome) -> ExecutionResponse {
    let mut resp = ExecutionResponse {
        request_id: request_id.to_string(),
        language: job.language.name.clone(),
        version: job.language.version.clone(),
        stdout: String::new(),
        stderr: String::new(),
        stdout_base64: None,
        stderr_base64: None,
        exit_code: None,
        signal: None,
        signal_number: None,
        status: Status::InternalError,
        message: None,
        compile: None,
        cpu_ms: 0,
        memory_kib: 0,
        timings: outcome.timings,
        limits: outcome.limits,
        tests: None,
    };
    match outcome.result {
        Err(e) => {
            resp.message = Some(e.to_string());
            if !job.tests.is_empty() {
                resp.tests = Some(TestsOut {
                    verdict: Verdict::InternalError,
                    passed: 0,
                    total: job.tests.len() as u32,
                    cases: vec![],
                });
            }
        }
        Ok(mut r) => {
            let (mut status, mut message) = overall_status(&r);
            let mut shown_case = None;
            if !job.tests.is_empty() {
                let (t, shown) = tests_out(job, &r.tests);
                if matches!(status, Status::Ok) {
                    if let Some(i) = shown {
                        status = overall_status(&RunResponse {
                            compile: None,
                            run: Some(r.tests[i].clone()),
                            tests: vec![],
                        })
                        .0;
                        message = r.tests[i].message.clone();
                        shown_case = Some(i);
                    }
                }
                resp.tests = Some(match status {
                    Status::CompileError => TestsOut {
                        verdict: Verdict::CompileError,
                        ..t
                    },
                    _ => t,
                });
            }
            resp.status = status;
            resp.message = message;
            resp.compile = r.compile.as_ref().map(stage_out);
            let case = shown_case.map(|i| r.tests.swap_remove(i));
            if let Some(last) = case.as_ref().or(r.run.as_ref()).or(r.compile.as_ref()) {
                resp.stdout = lossy(&last.stdout);
                resp.stderr = lossy(&last.stderr);
                resp.stdout_base64 = exact(&last.stdout);
                resp.stderr_base64 = exact(&last.stderr);
                resp.exit_code = last.exit_code;
                resp.signal = last.signal.map(signal_name);
                resp.signal_number = last.signal;
                resp.cpu_ms = last.cpu_ms;
                resp.memory_kib = last.memory_kib;
            }
        }
    }
    resp
}

/// Runs `fut` unless the client disconnects first; dropping `fut` kills its VM.
pub(crate) async fn unless_gone<T>(
    state: &AppState,
    endpoint: &str,
    conn: Option<Extension<ConnWatch>>,
    since: Instant,
    fut: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let conn = conn.map(|Extension(c)| c).unwrap_or_else(ConnWatch::none);
    tokio::select! {
        r = fut => r,
        () = conn.closed() => {
            tracing::info!("client disconnected; its VM (if any) was killed");
            state.record(endpoint, "cancelled", since);
            Err(ApiError::client_gone())
        }
    }
}

pub async fn execute(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    conn: Option<Extension<ConnWatch>>,
    ApiJson(req): ApiJson<ExecutionRequest>,
) -> Result<Json<ExecutionResponse>, ApiError> {
    let t = Instant::now();
    let resp = unless_gone(&state, "v1", conn, t, run_once(&state, req, &rid.0, "v1")).await?;
    Ok(Json(resp))
}

/// Validates, admits and runs one execution to its answer (`POST /v1/executions`, the MCP
/// `run_code` tool), recorded in the metrics under `endpoint`. Dropping it kills the VM.
pub(crate) async fn run_once(
    state: &AppState,
    req: ExecutionRequest,
    request_id: &str,
    endpoint: &str,
) -> Result<ExecutionResponse, ApiError> {
    let t = Instant::now();
    let job = to_job(state, req)?;
    no_tty(&job)?;
    let (permit, queued) = state.executor.admit().await?;
    let outcome = state
        .executor
        .execute(permit, job.clone(), queued, Talk::Whole)
        .await
        .map_err(exec_error)?;
    let resp = response(&job, request_id, outcome);
    state.record(endpoint, resp.status.as_str(), t);
    Ok(resp)
}

pub async fn execute_stream(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    ApiJson(req): ApiJson<ExecutionRequest>,
) -> Result<Response, ApiError> {
    let t = Instant::now();
    let job = to_job(&state, req)?;
    no_tty(&job)?;
    if !job.tests.is_empty() {
        return Err(ApiError::invalid(
            "tests",
            "test cases are not streamed; POST them to /v1/executions",
        ));
    }
    let (permit, queued) = state.executor.admit().await?;
    let (line_tx, line_rx) =
        mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(STREAM_BUFFER_EVENTS);
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let (ev_tx, mut ev_rx) = mpsc::channel::<StreamEvent>(STREAM_BUFFER_EVENTS);
            let forward_tx = line_tx.clone();
            let forward = async move {
                // One joiner per (stage, stream).
                let mut joiners: [Utf8Joiner; 4] = Default::default();
                while let Some(ev) = ev_rx.recv().await {
                    if let StreamEvent::Output {
                        stage,
                        stream,
                        data,
                    } = ev
                    {
                        let idx = usize::from(stage == cloude_protocol::Stage::Run) * 2
                            + usize::from(stream == cloude_protocol::StreamKind::Stderr);
                        let text = joiners[idx].push(&data.0);
                        if text.is_empty() {
                            continue;
                        }
                        let line = StreamLine::Output {
                            stage,
                            stream,
                            data: text,
                        };
                        if forward_tx.send(Ok(ndjson(&line))).await.is_err() {
                            return;
                        }
                    }
                }
            };
            let exec = state
                .executor
                .execute(permit, job.clone(), queued, Talk::Stream(ev_tx));
            let closed = line_tx.clone();
            // A client that goes away cancels the run: dropping `exec` kills the VM.
            let result = tokio::select! {
                (r, ()) = async { tokio::join!(exec, forward) } => r,
                () = closed.closed() => {
                    tracing::info!("client disconnected; VM killed");
                    state.record("v1_stream", "cancelled", t);
                    return;
                }
            };
            let line = match result {
                Ok(outcome) => {
                    let resp = response(&job, &rid.0, outcome);
                    state.record("v1_stream", resp.status.as_str(), t);
                    StreamLine::Result {
                        result: Box::new(resp),
                    }
                }
                Err(e) => {
                    let e = exec_error(e);
                    StreamLine::Error {
                        error: e.code.into(),
                        message: e.message,
                        retry_after_s: e.retry_after,
                    }
                }
            };
            let _ = line_tx.send(Ok(ndjson(&line))).await;
        },
        span,
    ));
    let stream =
        futures_util::stream::unfold(
            line_rx,
            |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
        );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn ndjson<T: serde::Serialize>(v: &T) -> bytes::Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

pub async fn languages(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let langs: Vec<LanguageInfo> = state
        .catalog
        .languages
        .iter()
        .map(|l| LanguageInfo {
            name: l.name.clone(),
            version: l.version.clone(),
            aliases: l.aliases.clone(),
            extensions: l.extensions.clone(),
            compiled: l.compile.is_some(),
            entry_file: l.file.clone(),
            image_format: state.executor.artifacts().format_for(l).name().to_string(),
        })
        .collect();
    Json(serde_json::json!({ "languages": langs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloude_protocol::Bytes;

    fn stage(status: StageStatus, code: Option<i32>) -> StageResult {
        StageResult {
            stdout: Bytes::default(),
            stderr: Bytes::default(),
            exit_code: code,
            signal: None,
            status,
            message: None,
            wall_ms: 0,
            cpu_ms: 0,
            memory_kib: 0,
        }
    }

    #[test]
    fn utf8_joiner_keeps_sequences_whole() {
        let mut j = Utf8Joiner::default();
        let e = "é".as_bytes();
        assert_eq!(j.push(&[b'a', e[0]]), "a");
        assert_eq!(j.push(&[e[1], b'b']), "éb");
        assert_eq!(j.push(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(exact(&Bytes(vec![0xff])).as_deref(), Some("/w=="));
        assert_eq!(exact(&Bytes::from("ok")), None);
    }

    #[test]
    fn overall_statuses() {
        let r = |compile: Option<StageResult>, run: Option<StageResult>| {
            overall_status(&RunResponse {
                compile,
                run,
                tests: vec![],
            })
            .0
        };
        assert_eq!(
            r(None, Some(stage(StageStatus::Ok, Some(3)))),
            Status::Ok,
            "any exit code is ok"
        );
        assert_eq!(
            r(None, Some(stage(StageStatus::Timeout, None))),
            Status::Timeout
        );
        assert_eq!(
            r(None, Some(stage(StageStatus::MemoryLimit, None))),
            Status::MemoryLimit
        );
        assert_eq!(
            r(None, Some(stage(StageStatus::OutputLimit, None))),
            Status::OutputLimit
        );
        assert_eq!(
            r(None, Some(stage(StageStatus::Error, None))),
            Status::InternalError
        );
        assert_eq!(
            r(Some(stage(StageStatus::Ok, Some(1))), None),
            Status::CompileError
        );
        assert_eq!(
            r(Some(stage(StageStatus::Timeout, None)), None),
            Status::Timeout
        );
        assert_eq!(
            r(
                Some(stage(StageStatus::Ok, Some(0))),
                Some(stage(StageStatus::Ok, Some(0)))
            ),
            Status::Ok
        );
        assert_eq!(r(None, None), Status::InternalError);
    }
}
