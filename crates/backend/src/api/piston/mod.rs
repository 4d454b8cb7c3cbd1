//! Piston v2 compatibility: `POST /api/v2/execute`, `GET /api/v2/runtimes`, and the
//! interactive WebSocket `GET /api/v2/connect` (`connect.rs`).
//!
//! Field names, defaults and error messages follow Piston's v2 API, so that clients written
//! against Piston work unchanged; errors are `{"message": ...}`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::{Extension, Json};
use cloude_protocol::{StageResult, StageStatus};
use serde::Serialize;
use serde_json::Value;

pub mod connect;

use super::conn::ConnWatch;
use super::error::ApiError;
use super::json::read_body;
use super::types::signal_name;
use super::v1::{exec_error, unless_gone};
use super::validate::{build_job, decode_content, Draft, RawFile};
use super::AppState;
use crate::executor::{Job, Outcome, Talk};

#[derive(Debug, Serialize, PartialEq)]
pub struct PistonStage {
    pub stdout: String,
    pub stderr: String,
    pub output: String,
    pub code: Option<i32>,
    pub signal: Option<String>,
    pub message: Option<String>,
    pub status: Option<String>,
    pub cpu_time: u64,
    pub wall_time: u64,
    pub memory: u64,
}

#[derive(Debug, Serialize)]
pub struct PistonResponse {
    pub language: String,
    pub version: String,
    pub run: PistonStage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile: Option<PistonStage>,
}

#[derive(Debug, Serialize)]
pub struct PistonRuntime {
    pub language: String,
    pub version: String,
    pub aliases: Vec<String>,
    /// The program that runs it (`node`, `gcc`, `mono`), where Piston names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(None, msg).piston()
}

pub async fn runtimes(State(state): State<Arc<AppState>>) -> Json<Vec<PistonRuntime>> {
    Json(
        state
            .catalog
            .languages
            .iter()
            .map(|l| PistonRuntime {
                language: l.name.clone(),
                version: l.version.clone(),
                aliases: l.aliases.clone(),
                runtime: l.runtime.clone(),
            })
            .collect(),
    )
}

/// Reads an optional numeric constraint the way Piston does (absent, null or 0 = default).
fn constraint(body: &Value, name: &str, max: Option<u64>) -> Result<Option<i64>, ApiError> {
    let v = match body.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Bool(false)) => return Ok(None),
        Some(v) => v,
    };
    let n = v
        .as_f64()
        .ok_or_else(|| bad(format!("If specified, {name} must be a number")))?;
    if n == 0.0 {
        return Ok(None);
    }
    if let Some(max) = max {
        if n > max as f64 {
            return Err(bad(format!(
                "{name} cannot exceed the configured limit of {max}"
            )));
        }
    }
    if n < 0.0 {
        if name.ends_with("memory_limit") && n == -1.0 {
            return Ok(None);
        }
        return Err(bad(format!("{name} must be non-negative")));
    }
    Ok(Some(n as i64))
}

pub fn to_job(state: &AppState, body: &Value) -> Result<Job, ApiError> {
    job_from_body(&state.catalog, &state.config, body)
}

/// Decodes and validates a `/api/v2/execute` body exactly as the handler does, without server
/// state (pure; fuzzed by `fuzz/fuzz_targets/piston_request.rs`).
pub fn decode_piston(
    body: &[u8],
    catalog: &cloude_image::catalog::Catalog,
    config: &crate::config::Config,
) -> Result<Job, ApiError> {
    let body: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    job_from_body(catalog, config, &body)
}

/// Validates a Piston v2 body against the catalogue and the limits.
pub fn job_from_body(
    catalog: &cloude_image::catalog::Catalog,
    config: &crate::config::Config,
    body: &Value,
) -> Result<Job, ApiError> {
    if !body.is_object() {
        return Err(bad("the request body must be a JSON object"));
    }
    let language = match body.get("language") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(bad("language is required as a string")),
    };
    let version = match body.get("version") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(bad("version is required as a string")),
    };
    let files = match body.get("files") {
        Some(Value::Array(a)) => a,
        _ => return Err(bad("files is required as an array")),
    };
    for (i, f) in files.iter().enumerate() {
        if !matches!(f.get("content"), Some(Value::String(_))) {
            return Err(bad(format!("files[{i}].content is required as a string")));
        }
    }
    let lang = catalog
        .find(&language, Some(&version))
        .ok_or_else(|| bad(format!("{language}-{version} runtime is unknown")))?
        .clone();
    let encoding = |f: &Value| {
        f.get("encoding")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if !files
        .iter()
        .any(|f| matches!(encoding(f).as_deref(), None | Some("utf8")))
    {
        return Err(bad("files must include at least one utf8 encoded file"));
    }
    let limits = &config.limits;
    let run_timeout = constraint(body, "run_timeout", Some(limits.max_timeout_ms))?;
    let compile_timeout = constraint(body, "compile_timeout", Some(limits.max_compile_timeout_ms))?;
    let run_cpu_time = constraint(body, "run_cpu_time", Some(limits.max_timeout_ms))?;
    constraint(
        body,
        "compile_cpu_time",
        Some(limits.max_compile_timeout_ms),
    )?;
    let max_mem_bytes = limits.max_memory_mib * 1024 * 1024;
    let run_mem = constraint(body, "run_memory_limit", Some(max_mem_bytes))?;
    constraint(body, "compile_memory_limit", Some(max_mem_bytes))?;
    let mut stdin = match body.get("stdin") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("stdin must be a string")),
    };
    // Piston's rule: stdin always ends with a newline (none at all becomes "\n"), so that
    // `{print "OK"}` in awk, or a `readline()`, sees one line even with no input.
    if !stdin.ends_with('\n') {
        stdin.push('\n');
    }
    let args = match body.get("args") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(bad("args must be an array of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("args must be an array of strings")),
    };
    let raw = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let field = format!("files[{i}]");
            let content = f.get("content").and_then(Value::as_str).unwrap_or_default();
            let bytes = decode_content(&field, content, encoding(f).as_deref())
                .map_err(|e| bad(e.message))?;
            let name = f.get("name").and_then(Value::as_str).map(str::to_string);
            Ok(RawFile { name, bytes, field })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let as_u64 = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
    build_job(
        Draft {
            language: lang,
            files: raw,
            stdin,
            args,
            // Unnamed, a timeout is the language's own default, else the server's (`[limits]`):
            // what Piston's per-language limit overrides do. Piston's fixed 3 s and 10 s are
            // for native speed, and a Kotlin or Elixir hello world takes longer under emulation.
            timeout_ms: as_u64(run_timeout).map(|t| t.min(limits.max_timeout_ms)),
            compile_timeout_ms: as_u64(compile_timeout)
                .map(|t| t.min(limits.max_compile_timeout_ms)),
            memory_mib: as_u64(run_mem).map(|b| (b / (1024 * 1024)).max(16)),
            // Piston's API has no network switch; its runs are offline.
            network: false,
            cpu_limit_ms: as_u64(run_cpu_time).filter(|c| *c > 0),
            tests: vec![],
        },
        limits,
    )
    // Piston answers every invalid value with 400 (only size stays 413).
    .map_err(|e| {
        if e.status == axum::http::StatusCode::UNPROCESSABLE_ENTITY {
            bad(e.message)
        } else {
            e.piston()
        }
    })
}

/// Converts one stage the way Piston reports it.
pub fn piston_stage(s: &StageResult) -> PistonStage {
    let stdout = String::from_utf8_lossy(&s.stdout.0).into_owned();
    let stderr = String::from_utf8_lossy(&s.stderr.0).into_owned();
    let signal = s.signal.map(signal_name);
    let (status, message) = match s.status {
        StageStatus::Timeout => (Some("TO"), Some("Timeout exceeded".to_string())),
        // Piston's isolate reports a CPU-time kill as a timeout too.
        StageStatus::CpuLimit => (Some("TO"), Some("CPU time limit exceeded".to_string())),
        StageStatus::OutputLimit => (Some("OL"), Some("Output limit exceeded".to_string())),
        StageStatus::MemoryLimit => (Some("SG"), Some("Memory limit exceeded".to_string())),
        StageStatus::Error => (
            Some("XX"),
            s.message.clone().or(Some("Internal error".into())),
        ),
        StageStatus::Ok => match (&signal, s.exit_code) {
            (Some(sig), _) => (Some("SG"), Some(format!("Killed by signal {sig}"))),
            (None, Some(c)) if c != 0 => {
                (Some("RE"), Some(format!("Exited with error status {c}")))
            }
            _ => (None, None),
        },
    };
    PistonStage {
        output: format!("{stdout}{stderr}"),
        stdout,
        stderr,
        code: s.exit_code,
        signal,
        message,
        status: status.map(str::to_string),
        cpu_time: s.cpu_ms,
        wall_time: s.wall_ms,
        memory: s.memory_kib.saturating_mul(1024),
    }
}

fn internal(msg: String) -> PistonStage {
    PistonStage {
        stdout: String::new(),
        stderr: String::new(),
        output: String::new(),
        code: None,
        signal: None,
        message: Some(msg),
        status: Some("XX".into()),
        cpu_time: 0,
        wall_time: 0,
        memory: 0,
    }
}

pub fn piston_response(job: &Job, outcome: Outcome) -> (PistonResponse, &'static str) {
    let (run, compile, status) = match outcome.result {
        Err(e) => (internal(e.to_string()), None, "internal_error"),
        Ok(r) => {
            let (status, _) = super::v1::overall_status(&r);
            let compile = r.compile.as_ref().map(piston_stage);
            // Piston: when the run stage did not start, `run` repeats the compile stage.
            let run = match (&r.run, &r.compile) {
                (Some(s), _) => piston_stage(s),
                (None, Some(c)) => piston_stage(c),
                (None, None) => internal("the agent ran nothing".into()),
            };
            (run, compile, status.as_str())
        }
    };
    (
        PistonResponse {
            language: job.language.name.clone(),
            version: job.language.version.clone(),
            run,
            compile,
        },
        status,
    )
}

pub async fn execute(
    State(state): State<Arc<AppState>>,
    conn: Option<Extension<ConnWatch>>,
    req: Request,
) -> Result<Json<PistonResponse>, ApiError> {
    let t = Instant::now();
    let bytes = read_body(req.into_body(), state.body_limit())
        .await
        .map_err(ApiError::piston)?;
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let job = to_job(&state, &body)?;
    let outcome = unless_gone(&state, "piston", conn, t, async {
        let (permit, queued) = state
            .executor
            .admit()
            .await
            .map_err(|e| ApiError::from(e).piston())?;
        state
            .executor
            .execute(permit, job.clone(), queued, Talk::Whole)
            .await
            .map_err(|e| exec_error(e).piston())
    })
    .await?;
    let (resp, status) = piston_response(&job, outcome);
    state.record("piston", status, t);
    Ok(Json(resp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloude_protocol::Bytes;

    fn stage(status: StageStatus, code: Option<i32>, signal: Option<i32>) -> StageResult {
        StageResult {
            stdout: Bytes::from("out"),
            stderr: Bytes::from("err"),
            exit_code: code,
            signal,
            status,
            message: None,
            wall_ms: 12,
            cpu_ms: 7,
            memory_kib: 2,
        }
    }

    #[test]
    fn piston_statuses() {
        let s = piston_stage(&stage(StageStatus::Ok, Some(0), None));
        assert_eq!((s.status, s.message.is_none()), (None, true));
        assert_eq!(s.output, "outerr");
        assert_eq!((s.memory, s.cpu_time, s.wall_time), (2048, 7, 12));
        assert_eq!(
            piston_stage(&stage(StageStatus::Ok, Some(1), None))
                .status
                .as_deref(),
            Some("RE")
        );
        let sg = piston_stage(&stage(StageStatus::Ok, None, Some(11)));
        assert_eq!(
            (sg.status.as_deref(), sg.signal.as_deref()),
            (Some("SG"), Some("SIGSEGV"))
        );
        assert_eq!(
            piston_stage(&stage(StageStatus::Timeout, None, Some(9)))
                .status
                .as_deref(),
            Some("TO")
        );
        assert_eq!(
            piston_stage(&stage(StageStatus::OutputLimit, None, Some(9)))
                .status
                .as_deref(),
            Some("OL")
        );
        assert_eq!(
            piston_stage(&stage(StageStatus::Error, None, None))
                .status
                .as_deref(),
            Some("XX")
        );
    }
}
