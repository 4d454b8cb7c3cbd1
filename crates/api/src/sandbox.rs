//! The native sandbox API's types (`/v1/sandboxes`): a VM kept across calls.

use serde::{Deserialize, Serialize};

use crate::StageStatus;

/// `POST /v1/sandboxes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxCreate {
    /// A catalogue language (its image); default `python` (bash, python3 and the Debian
    /// userland).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Idle seconds before the sandbox is killed (each call counts from its end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Environment variables every command gets (a command's own win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    /// Kept and shown as given (at most 64 keys, 4 KiB in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A sandbox as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub template: String,
    pub version: String,
    /// `running`, or `paused` (its VM frozen: calls answer 409 until it is resumed).
    pub state: String,
    pub created_at: String,
    pub expires_at: String,
    pub timeout_s: u64,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// `GET /v1/sandboxes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxInfo>,
}

/// `POST /v1/sandboxes/{id}/exec`: `cmd` (run by `/bin/bash -lc`) or `argv`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `user` (default) or `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The answer to an exec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOut {
    pub stdout: String,
    pub stderr: String,
    /// Set when stdout is not UTF-8 (then `stdout` is lossy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub status: StageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub memory_kib: u64,
}

/// `POST /v1/sandboxes/{id}/timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutIn {
    pub timeout_s: u64,
}

/// `POST /v1/sandboxes/{id}/procs`: a process that outlives the call (`cmd`, run by
/// `/bin/bash -lc`, or `argv`); its output is read later, while it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `user` (default) or `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A name to find it by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Keep its standard input open for `stdin` inputs (default: it reads end of file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
    /// Killed (with what it started) after this long; default: when the sandbox ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A sandbox process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcOut {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub argv: Vec<String>,
    pub cwd: String,
    pub running: bool,
}

/// `GET /v1/sandboxes/{id}/procs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcList {
    pub procs: Vec<ProcOut>,
}

/// Output of one stream: `text` (lossy when the bytes are not UTF-8, then also `data_base64`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcExit {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub status: StageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /v1/sandboxes/{id}/procs/{pid}/output?since=&wait_ms=`: output from byte `since` on,
/// where to read next, bytes dropped unread before it, and the exit once all was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcOutputOut {
    pub chunks: Vec<OutputChunk>,
    pub next: u64,
    pub skipped: u64,
    pub exit: Option<ProcExit>,
}

/// One line of `POST /v1/sandboxes/{id}/exec/stream` (NDJSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecLine {
    Started { pid: u32 },
    Output(OutputChunk),
    Exit(ProcExit),
    Error { error: String, message: String },
}

/// The first message of `GET /v1/sandboxes/{id}/shell` (a WebSocket): what to run on a
/// terminal in the sandbox (default an interactive login `bash`) and the terminal's size
/// (default 24×80). Then the client sends `WsInput`s (`stdin`, `signal`, `resize`) and the
/// server [`ExecLine`]s (`started`, `output`, `exit`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::TtySize>,
    /// `user` (default) or `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
}
