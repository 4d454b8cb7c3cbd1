//! Request and response bodies of the native API (`/v1`).

use serde::{Deserialize, Serialize};

use crate::executor::Timings;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionRequest {
    /// Name or alias.
    pub language: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub files: Option<Vec<FileIn>>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub compile_timeout_ms: Option<u64>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub network: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIn {
    pub name: String,
    pub content: String,
    #[serde(default)]
    pub encoding: Option<String>,
}

/// Outcome of an execution as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The program ran to its own exit, whatever its exit code.
    Ok,
    Timeout,
    OutputLimit,
    MemoryLimit,
    CompileError,
    InternalError,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Timeout => "timeout",
            Status::OutputLimit => "output_limit",
            Status::MemoryLimit => "memory_limit",
            Status::CompileError => "compile_error",
            Status::InternalError => "internal_error",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageOut {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub status: String,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub memory_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExecutionResponse {
    pub request_id: String,
    pub language: String,
    pub version: String,
    /// Output of the last stage that ran (the compiler's on `compile_error`), as UTF-8 (invalid
    /// sequences replaced by U+FFFD).
    pub stdout: String,
    pub stderr: String,
    /// The exact bytes, base64, present only when the output is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub status: Status,
    /// Set for `internal_error` (and other statuses when there is something to say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile: Option<StageOut>,
    pub timings: Timings,
}

/// One line of `POST /v1/executions/stream`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamLine {
    Output {
        stage: &'static str,
        stream: &'static str,
        data: String,
    },
    Result {
        result: Box<ExecutionResponse>,
    },
    Error {
        error: &'static str,
        message: String,
    },
}

#[derive(Debug, Serialize)]
pub struct LanguageInfo {
    pub name: String,
    pub version: String,
    pub aliases: Vec<String>,
    pub extensions: Vec<String>,
    pub compiled: bool,
    pub entry_file: String,
}

/// Signal number to its name (`SIGKILL`), or the number as text.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| sig.to_string())
}
