//! The agent's sandbox calls: commands and files in a VM that lives across many calls (the
//! server's `/v1/sandboxes`). A command's background processes keep running after it returns;
//! the VM is the wall, so a command may run as root inside it.

use serde::{Deserialize, Serialize};

use crate::{Bytes, ProtocolError, MAX_OUTPUT_LIMIT_BYTES, MAX_STDIN_BYTES, MAX_TIMEOUT_MS};

/// The sandbox user's home and every command's default working directory.
pub const SANDBOX_HOME: &str = "/home/user";
/// The sandbox user's name (uid and gid are the agent's program user, 1000).
pub const SANDBOX_USER: &str = "user";
/// Largest file the agent reads or writes in one call.
pub const MAX_SANDBOX_FILE_BYTES: u64 = 64 << 20;
/// Most entries a directory listing returns.
pub const MAX_LISTING_ENTRIES: usize = 10_000;
/// Longest path the agent accepts.
pub const MAX_SANDBOX_PATH_BYTES: usize = 4096;
/// Most arguments and environment variables of one command.
pub const MAX_EXEC_ARGS: usize = 4096;
/// Most bytes of arguments plus environment of one command.
pub const MAX_EXEC_ARG_BYTES: usize = 1 << 20;

/// Who runs a sandbox command or owns a file it writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxUser {
    /// The unprivileged sandbox user (uid 1000), home [`SANDBOX_HOME`].
    #[default]
    User,
    /// Root inside the VM.
    Root,
}

/// `POST /v1/exec`: one command in a sandbox; the answer is a `StageResult` (stage `run`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub protocol_version: u32,
    pub argv: Vec<String>,
    #[serde(default)]
    pub stdin: Bytes,
    /// Added to (and overriding) the default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Absolute; default [`SANDBOX_HOME`].
    #[serde(default)]
    pub cwd: Option<String>,
    pub timeout_ms: u64,
    pub output_limit_bytes: u64,
    #[serde(default)]
    pub user: SandboxUser,
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.protocol_version != crate::PROTOCOL_VERSION {
            return Err(ProtocolError::Version(self.protocol_version));
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(ProtocolError::EmptyRun);
        }
        if self.argv.len() + self.env.len() > MAX_EXEC_ARGS {
            return Err(ProtocolError::OutOfRange(
                "arguments plus environment variables",
                MAX_EXEC_ARGS as u64,
            ));
        }
        let bytes: usize = self.argv.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if bytes > MAX_EXEC_ARG_BYTES {
            return Err(ProtocolError::TooLarge(
                "arguments and environment",
                bytes,
                MAX_EXEC_ARG_BYTES,
            ));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(ProtocolError::NulByte("an argument"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(ProtocolError::NulByte(
                    "an environment variable (or '=' in its name)",
                ));
            }
        }
        if self.stdin.0.len() > MAX_STDIN_BYTES {
            return Err(ProtocolError::TooLarge(
                "stdin",
                self.stdin.0.len(),
                MAX_STDIN_BYTES,
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(ProtocolError::BadTimeout("timeout_ms", MAX_TIMEOUT_MS));
        }
        if self.output_limit_bytes == 0 || self.output_limit_bytes > MAX_OUTPUT_LIMIT_BYTES {
            return Err(ProtocolError::OutOfRange(
                "output_limit_bytes",
                MAX_OUTPUT_LIMIT_BYTES,
            ));
        }
        if let Some(c) = &self.cwd {
            validate_sandbox_path(c)?;
        }
        Ok(())
    }
}

/// Processes one sandbox keeps track of at once (running, or ended and not yet forgotten).
pub const MAX_PROCS: usize = 64;
/// Output a process keeps for its readers; past it the oldest bytes are dropped (counted in
/// [`ProcOutput::skipped`]).
pub const PROC_BUFFER_BYTES: usize = 1 << 20;
/// Longest a read waits for output.
pub const MAX_PROC_WAIT_MS: u64 = 5_000;
/// Longest a process's tag may be.
pub const MAX_PROC_TAG_BYTES: usize = 256;
/// Longest a process may run: the longest a sandbox may live.
pub const MAX_PROC_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// `POST /v1/procs`: starts a process that outlives the call (a sandbox's background
/// process, or a command whose output is read while it runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcStart {
    pub protocol_version: u32,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: SandboxUser,
    /// A name to find it by (E2B's `tag`).
    #[serde(default)]
    pub tag: Option<String>,
    /// Killed (with everything it started) after this long; 0: when the sandbox ends.
    #[serde(default)]
    pub timeout_ms: u64,
    /// Keep standard input open for `stdin` inputs (else it reads end of file at once).
    #[serde(default)]
    pub stdin: bool,
    /// A pseudo-terminal of this size as its standard streams.
    #[serde(default)]
    pub tty: Option<crate::TtySize>,
}

impl ProcStart {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        // The checks a command's are.
        self.as_exec().validate()?;
        if self.timeout_ms > MAX_PROC_TIMEOUT_MS {
            return Err(ProtocolError::BadTimeout("timeout_ms", MAX_PROC_TIMEOUT_MS));
        }
        if self
            .tag
            .as_ref()
            .is_some_and(|t| t.len() > MAX_PROC_TAG_BYTES)
        {
            return Err(ProtocolError::OutOfRange(
                "tag bytes",
                MAX_PROC_TAG_BYTES as u64,
            ));
        }
        if let Some(t) = &self.tty {
            t.validate()?;
        }
        Ok(())
    }

    /// The same process as a one-call command (timeout and output cap placeholders).
    pub fn as_exec(&self) -> ExecRequest {
        ExecRequest {
            protocol_version: self.protocol_version,
            argv: self.argv.clone(),
            stdin: crate::Bytes::default(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout_ms: 1,
            output_limit_bytes: MAX_OUTPUT_LIMIT_BYTES,
            user: self.user,
        }
    }
}

/// The answer to `POST /v1/procs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStarted {
    pub id: u32,
}

/// [`ProcRead::since`] for "what comes from now on": the answer carries no output and the
/// offset to read from next.
pub const FROM_NOW: u64 = u64::MAX;

/// `POST /v1/procs/{id}/read`: output from byte `since` on (both streams count), waiting up to
/// `wait_ms` for some when there is none yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcRead {
    pub since: u64,
    #[serde(default)]
    pub wait_ms: u64,
}

/// Output of one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcChunk {
    pub stream: crate::StreamKind,
    pub data: crate::Bytes,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub status: crate::StageStatus,
    pub message: Option<String>,
    #[serde(default)]
    pub wall_ms: u64,
    #[serde(default)]
    pub cpu_ms: u64,
    #[serde(default)]
    pub memory_kib: u64,
}

/// The answer to a read: output, where the next read starts, and the end once every byte
/// before it has been read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcOutput {
    pub chunks: Vec<ProcChunk>,
    pub next: u64,
    /// Bytes between `since` and the first chunk that were dropped (the buffer was full).
    pub skipped: u64,
    pub end: Option<ProcEnd>,
}

/// One process of `GET /v1/procs` (at most 64 arguments of at most 1 KiB each; no
/// environment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub id: u32,
    pub tag: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub running: bool,
}

/// A path in a sandbox: absolute, at most [`MAX_SANDBOX_PATH_BYTES`], no NUL, no `..`
/// component (inside the VM any path is the guest's own; this keeps answers unambiguous).
pub fn validate_sandbox_path(p: &str) -> Result<(), ProtocolError> {
    let bad = |why| {
        Err(ProtocolError::BadFileName(
            p.chars().take(200).collect(),
            why,
        ))
    };
    if !p.starts_with('/') {
        return bad("must be an absolute path");
    }
    if p.len() > MAX_SANDBOX_PATH_BYTES {
        return bad("is too long");
    }
    if p.contains('\0') {
        return bad("must not contain a NUL byte");
    }
    if p.split('/').any(|c| c == "..") {
        return bad("must not contain '..' components");
    }
    Ok(())
}

/// One entry of a directory listing (`GET /v1/files` on a directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    /// Last modification, milliseconds since the epoch.
    #[serde(default)]
    pub modified_ms: i64,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Where a symbolic link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `POST /v1/files/op`: an operation on a path that is neither reading nor writing bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileOp {
    /// What is at `path` (a symbolic link itself, not what it points to).
    Stat { path: String },
    /// Makes a directory and its missing parents, owned by `user`; `created` is false when it
    /// was already there.
    MakeDir {
        path: String,
        #[serde(default)]
        user: SandboxUser,
    },
    /// Renames `from` to `to` (replacing a file there).
    Move { from: String, to: String },
}

impl FileOp {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            FileOp::Stat { path } | FileOp::MakeDir { path, .. } => validate_sandbox_path(path),
            FileOp::Move { from, to } => {
                validate_sandbox_path(from)?;
                validate_sandbox_path(to)
            }
        }
    }
}

/// The answer to a [`FileOp`]: the entry at the path (the destination of a move), with its
/// absolute path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOpAnswer {
    pub path: String,
    pub entry: DirEntry,
    /// `make_dir`: whether it made the directory.
    #[serde(default)]
    pub created: bool,
}

/// A directory listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<DirEntry>,
    /// True when the directory held more than [`MAX_LISTING_ENTRIES`].
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ExecRequest {
        ExecRequest {
            protocol_version: crate::PROTOCOL_VERSION,
            argv: vec!["true".into()],
            stdin: Bytes::default(),
            env: vec![],
            cwd: None,
            timeout_ms: 1000,
            output_limit_bytes: 1024,
            user: SandboxUser::User,
        }
    }

    #[test]
    fn exec_requests_are_checked() {
        assert!(req().validate().is_ok());
        let mut r = req();
        r.argv.clear();
        assert!(r.validate().is_err());
        let mut r = req();
        r.timeout_ms = MAX_TIMEOUT_MS + 1;
        assert!(r.validate().is_err());
        let mut r = req();
        r.cwd = Some("relative".into());
        assert!(r.validate().is_err());
        let mut r = req();
        r.env = vec![("A=B".into(), "c".into())];
        assert!(r.validate().is_err());
        let mut r = req();
        r.argv = vec!["x".repeat(MAX_EXEC_ARG_BYTES + 1)];
        assert!(r.validate().is_err());
    }

    #[test]
    fn sandbox_paths_are_checked() {
        assert!(validate_sandbox_path("/home/user/a.txt").is_ok());
        assert!(validate_sandbox_path("home").is_err());
        assert!(validate_sandbox_path("/a/../b").is_err());
        assert!(validate_sandbox_path("/a\0b").is_err());
        assert!(validate_sandbox_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}
