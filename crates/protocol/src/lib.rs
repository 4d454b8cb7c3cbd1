//! Wire types shared by the host (backend) and the guest agent.
//!
//! Transport contract (this list is its only statement; `docs/ARCHITECTURE.md` shows where each
//! side implements it):
//! - The agent serves HTTP/1.1 on vsock port [`AGENT_VSOCK_PORT`]; when the VM has an IPv4
//!   address it also serves the same router on TCP port [`AGENT_TCP_PORT`].
//! - When a virtio-serial port named [`SERIAL_PORT_NAME`] exists (the QEMU fallback, which has no
//!   vsock on hosts without vhost), the agent writes the ready line on it and then serves one
//!   HTTP/1.1 connection over that byte stream.
//! - Readiness: as soon as it can, the agent connects to the host (CID 2) on vsock port
//!   [`READY_VSOCK_PORT`] and writes [`ready_line`]; over virtio-serial it writes the same line.
//! - Routes: `GET /v1/health` -> [`Health`]; `POST /v1/run` with [`RunRequest`] -> [`RunResponse`];
//!   `POST /v1/run/stream` -> NDJSON of [`StreamEvent`], the last one being `result`.
//! - Snapshots: `POST /v1/snapshot/prepare` (empty body, answered `204`, the connection kept
//!   open) tells the agent that the host is about to snapshot the VM; from then on every run is
//!   refused (`409`) until `POST /v1/wake` with a [`WakeRequest`] -> [`WakeResponse`] has made
//!   the (restored) VM a new machine: fresh entropy mixed in and the kernel's RNG reseeded, the
//!   clock set, the identity re-applied. Over virtio-serial a clone resumes with that connection
//!   idle, so its host sends the wake on it with no new ready line; over vsock the clone's
//!   transport reset drops the connection, the listener survives, and the host connects again.
#![forbid(unsafe_code)]

use base64::Engine as _;
use serde::{Deserialize, Serialize};

mod limits;
pub use limits::*;
pub mod interactive;
pub mod sandbox;
pub mod vmm_wire;

/// Version of this wire protocol; the agent rejects requests of another major version.
pub const PROTOCOL_VERSION: u32 = 1;
/// Vsock port the agent's HTTP server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Vsock port on the host (CID 2) the agent connects to in order to announce readiness.
pub const READY_VSOCK_PORT: u32 = 1025;
/// TCP port the agent's HTTP server listens on when the VM has an IP address.
pub const AGENT_TCP_PORT: u16 = 8080;

/// tcp transport: the kernel command-line parameter that gives the agent its VM's secret
/// (`cloude.agent_token=<64 hex digits>`, fresh per VM). The agent serves a TCP connection only
/// after its first line is `AUTH <token>\n`: an address alone (the host's end of the tap) does
/// not prove the peer is the server (an escaped hypervisor on the host could use it too).
pub const AGENT_TOKEN_PARAM: &str = "cloude.agent_token";
/// Hex digits of an agent token (32 random bytes).
pub const AGENT_TOKEN_HEX: usize = 64;
/// Longest first line a TCP peer may send before it is refused.
pub const AGENT_AUTH_LINE_MAX: usize = 128;

/// The kernel command-line word that hands the agent `token`.
pub fn agent_token_arg(token: &str) -> String {
    format!("{AGENT_TOKEN_PARAM}={token}")
}

/// The token on a kernel command line, if one is there and well-formed.
pub fn agent_token_of(cmdline: &str) -> Option<String> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let t = w.strip_prefix(AGENT_TOKEN_PARAM)?.strip_prefix('=')?;
        (t.len() == AGENT_TOKEN_HEX && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| t.to_ascii_lowercase())
    })
}

/// The first line of every host → agent TCP connection.
pub fn agent_auth_line(token: &str) -> String {
    format!("AUTH {token}\n")
}

/// Whether `line` (without its newline) carries `token`; compared in constant time.
pub fn agent_auth_ok(line: &str, token: &str) -> bool {
    let Some(got) = line.strip_prefix("AUTH ") else {
        return false;
    };
    let (a, b) = (got.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
/// Name of the virtio-serial port used as the agent channel when there is no vsock.
pub const SERIAL_PORT_NAME: &str = "cloude.agent";
/// What `cloude-vmm` writes to its console (stderr) when its seccomp filter stops a system call,
/// followed by the call's number; the server quotes the number in its error.
pub const SECCOMP_KILL_MARK: &str = "cloude-vmm: seccomp: forbidden system call ";
/// Prefix of the line the agent writes once it is ready to serve.
pub const READY_PREFIX: &str = "CLOUDE-READY";

/// The line (with trailing newline) the agent writes when it is ready.
pub fn ready_line() -> String {
    format!("{READY_PREFIX} {PROTOCOL_VERSION}\n")
}

/// Parses a ready line; returns the agent's protocol version.
pub fn parse_ready_line(line: &str) -> Option<u32> {
    let rest = line
        .trim_end()
        .strip_prefix(READY_PREFIX)?
        .strip_prefix(' ')?;
    rest.parse().ok()
}

/// Least fresh entropy a restored VM must receive before it runs a program, bytes.
pub const MIN_WAKE_ENTROPY_BYTES: usize = 32;
/// Most entropy one wake carries, bytes (the kernel takes at most this much per call anyway).
pub const MAX_WAKE_ENTROPY_BYTES: usize = 64;
/// Longest hostname a wake may set (the kernel's limit).
pub const MAX_HOSTNAME_BYTES: usize = 64;

/// `POST /v1/wake`: sent to a VM restored from a snapshot before anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeRequest {
    pub protocol_version: u32,
    /// Fresh random bytes from the host, mixed into the guest kernel's pool (then reseeded).
    pub entropy: Bytes,
    /// The host's clock (`CLOCK_REALTIME`) when the request was made, nanoseconds since 1970.
    pub unix_time_ns: u64,
    /// The VM's hostname.
    pub hostname: String,
}

impl WakeRequest {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(self.protocol_version));
        }
        let n = self.entropy.0.len();
        if !(MIN_WAKE_ENTROPY_BYTES..=MAX_WAKE_ENTROPY_BYTES).contains(&n) {
            return Err(ProtocolError::Entropy(n));
        }
        if self.hostname.is_empty()
            || self.hostname.len() > MAX_HOSTNAME_BYTES
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(ProtocolError::BadHostname);
        }
        Ok(())
    }
}

/// Answer of `POST /v1/wake`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeResponse {
    /// Entropy was added and the kernel's RNG reseeded.
    pub reseeded: bool,
    /// How far the guest clock was off before it was set, milliseconds (guest minus host).
    pub clock_skew_ms: i64,
}

/// Bytes that travel inside JSON as base64 (binary-safe output and input).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({:?})", String::from_utf8_lossy(&self.0))
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&str> for Bytes {
    fn from(v: &str) -> Self {
        Bytes(v.as_bytes().to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Bytes)
            .map_err(serde::de::Error::custom)
    }
}

/// How a file's content is encoded in a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

/// A file the agent writes into the work directory before compiling or running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Relative path inside the work directory (validated by [`validate_file_name`]).
    pub name: String,
    pub content: String,
    #[serde(default)]
    pub encoding: Encoding,
}

impl FileSpec {
    /// Decoded bytes of the file.
    pub fn bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        match self.encoding {
            Encoding::Utf8 => Ok(self.content.as_bytes().to_vec()),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(self.content.as_bytes())
                .map_err(|_| ProtocolError::BadBase64(self.name.clone())),
        }
    }
}

/// The run order sent by the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub protocol_version: u32,
    pub files: Vec<FileSpec>,
    /// Optional compile command (argv), run in the work directory.
    #[serde(default)]
    pub compile: Option<Vec<String>>,
    /// Run command (argv); `args` are appended.
    pub run: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub stdin: Bytes,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub compile_timeout_ms: u64,
    pub run_timeout_ms: u64,
    /// Cap on stdout + stderr bytes kept per stage; beyond it the stage ends with `output_limit`.
    pub output_limit_bytes: u64,
    /// Memory limit for the program's cgroup; `None` lets the agent pick one below the VM's memory.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// Maximum number of tasks in the program's cgroup.
    #[serde(default)]
    pub pids_limit: Option<u64>,
    /// Power the VM off once the response has been sent.
    #[serde(default = "default_true")]
    pub poweroff_after: bool,
    /// Give the program the VM's network interfaces. When false (the default) and the VM has any
    /// besides loopback, the stages run in a fresh network namespace with only loopback.
    #[serde(default)]
    pub network: bool,
    /// Run the stages as root instead of the unprivileged sandbox user (catalogue entries that
    /// ask for it, such as test images; the VM stays the boundary).
    #[serde(default)]
    pub run_as_root: bool,
    /// CPU time (user + system, every process of the stage together) the run stage may use;
    /// beyond it the stage ends with `cpu_limit`. `None`: only the wall-clock timeout applies.
    #[serde(default)]
    pub cpu_limit_ms: Option<u64>,
    /// `RLIMIT_STACK` of the run stage, KiB (`None`: the kernel's default, 8 MiB).
    #[serde(default)]
    pub stack_limit_kib: Option<u64>,
    /// `RLIMIT_FSIZE` of the run stage, KiB: no file it writes may grow beyond it (`SIGXFSZ`).
    #[serde(default)]
    pub file_size_limit_kib: Option<u64>,
    /// Give the run stage one pipe for stdout and stderr, so that the two interleave as written
    /// (everything is then reported as stdout).
    #[serde(default)]
    pub merge_stderr: bool,
    /// Test cases: when not empty the run stage runs once per case (after one compile), each in
    /// a fresh copy of the compiled work directory and a cgroup of its own, with the case's
    /// stdin; `stdin` must then be empty. Answers are in [`RunResponse::tests`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestInput>,
    /// Interactive runs only: the run stage gets a pseudo-terminal of this size as its
    /// standard input, output and error (its controlling terminal), instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// A terminal's size, in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

impl TtySize {
    /// Largest rows or columns a terminal may have.
    pub const MAX: u16 = 1000;

    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.rows == 0 || self.cols == 0 || self.rows > Self::MAX || self.cols > Self::MAX {
            return Err(ProtocolError::OutOfRange(
                "tty rows and cols",
                Self::MAX.into(),
            ));
        }
        Ok(())
    }
}

/// One test case of a [`RunRequest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestInput {
    #[serde(default)]
    pub stdin: Bytes,
}

impl RunRequest {
    /// The output cap of each test case: the request's own cap, shrunk so that every case
    /// together stays within [`MAX_TESTS_OUTPUT_BYTES`].
    pub fn test_output_limit(&self) -> u64 {
        let n = self.tests.len().max(1) as u64;
        self.output_limit_bytes
            .min(MAX_OUTPUT_LIMIT_BYTES)
            .min(MAX_TESTS_OUTPUT_BYTES / n)
    }
}

fn default_true() -> bool {
    true
}

/// Outcome of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// The program ran to its own exit (whatever its exit code) or was killed by a signal it
    /// caused itself.
    Ok,
    Timeout,
    /// The stage used more CPU time than the request's `cpu_limit_ms`.
    CpuLimit,
    OutputLimit,
    MemoryLimit,
    /// The stage could not be started (missing binary, bad request).
    Error,
}

/// Result of one stage (compile or run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageResult {
    pub stdout: Bytes,
    pub stderr: Bytes,
    pub exit_code: Option<i32>,
    /// Signal number that ended the process, if any.
    pub signal: Option<i32>,
    pub status: StageStatus,
    /// Human-readable detail for `error` (and optionally other statuses).
    #[serde(default)]
    pub message: Option<String>,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    /// Peak memory of the stage's cgroup, in KiB.
    pub memory_kib: u64,
}

/// What a CPU-time limit that ended a stage looks like (for the messages of every API).
pub fn cpu_limit_message(limit_ms: u64) -> String {
    format!("killed after {limit_ms} ms of CPU time")
}

/// The agent's answer to a [`RunRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResponse {
    pub compile: Option<StageResult>,
    /// `None` when compilation failed and nothing ran (and when the request had test cases).
    pub run: Option<StageResult>,
    /// One result per test case of the request, in order (empty without test cases, or when
    /// compilation failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<StageResult>,
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Stdout,
    Stderr,
}

/// Which stage a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Compile,
    Run,
}

/// One line of the NDJSON stream of `POST /v1/run/stream`.
// One `Result` per stream: boxing it would only complicate the wire type's users.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Output {
        stage: Stage,
        stream: StreamKind,
        data: Bytes,
    },
    Result {
        result: RunResponse,
    },
    Error {
        message: String,
    },
    /// A stage began (interactive runs: Piston's `stage` message). At most one per stage.
    Started {
        stage: Stage,
    },
    /// A stage ended (interactive runs: Piston's `exit` message, before the next stage starts).
    Ended {
        stage: Stage,
        exit_code: Option<i32>,
        signal: Option<i32>,
        status: StageStatus,
        message: Option<String>,
        wall_ms: u64,
        cpu_ms: u64,
        memory_kib: u64,
    },
}

impl StreamEvent {
    /// The event that ends `stage`, from its result.
    pub fn ended(stage: Stage, r: &StageResult) -> StreamEvent {
        StreamEvent::Ended {
            stage,
            exit_code: r.exit_code,
            signal: r.signal,
            status: r.status,
            message: r.message.clone(),
            wall_ms: r.wall_ms,
            cpu_ms: r.cpu_ms,
            memory_kib: r.memory_kib,
        }
    }
}

/// `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub protocol_version: u32,
    pub agent_version: String,
    /// Milliseconds since the agent started (PID 1).
    pub uptime_ms: u64,
}

/// Error body of every non-2xx agent answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Validation failures of a [`RunRequest`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("protocol version {0} is not supported (agent speaks {PROTOCOL_VERSION})")]
    Version(u32),
    #[error("file {0:?}: content is not valid base64")]
    BadBase64(String),
    #[error("file name {0:?}: {1}")]
    BadFileName(String, &'static str),
    #[error("duplicate file name {0:?}")]
    DuplicateFile(String),
    #[error("too many files: {0} (at most {MAX_FILES})")]
    TooManyFiles(usize),
    #[error("the run command is empty")]
    EmptyRun,
    #[error("{0} is too large: {1} bytes (at most {2})")]
    TooLarge(&'static str, usize, usize),
    #[error("{0} must be between 1 and {1} ms")]
    BadTimeout(&'static str, u64),
    #[error("{0} must be between 1 and {1}")]
    OutOfRange(&'static str, u64),
    #[error("too many test cases: {0} (at most {MAX_TEST_CASES})")]
    TooManyTests(usize),
    #[error("stdin must be empty when the request has test cases (each case has its own)")]
    StdinWithTests,
    #[error("{0} contains a NUL byte")]
    NulByte(&'static str),
    #[error("a wake must carry {MIN_WAKE_ENTROPY_BYTES} to {MAX_WAKE_ENTROPY_BYTES} bytes of entropy, got {0}")]
    Entropy(usize),
    #[error("the hostname must be 1 to {MAX_HOSTNAME_BYTES} letters, digits, '-' or '.'")]
    BadHostname,
}

/// Checks that a file name is a plain relative path that stays inside the work directory.
pub fn validate_file_name(name: &str) -> Result<(), ProtocolError> {
    let bad = |why| Err(ProtocolError::BadFileName(name.to_string(), why));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return bad("is too long");
    }
    if name.contains('\0') {
        return bad("must not contain a NUL byte");
    }
    if name.starts_with('/') {
        return bad("must be a relative path");
    }
    if name.contains('\\') {
        return bad("must not contain a backslash");
    }
    for part in name.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("must not contain empty, '.' or '..' components");
        }
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("must not contain control characters");
    }
    Ok(())
}

impl RunRequest {
    /// Validates everything the agent relies on before touching the file system.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(self.protocol_version));
        }
        if self.files.len() > MAX_FILES {
            return Err(ProtocolError::TooManyFiles(self.files.len()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut total = 0usize;
        for f in &self.files {
            validate_file_name(&f.name)?;
            if !seen.insert(f.name.as_str()) {
                return Err(ProtocolError::DuplicateFile(f.name.clone()));
            }
            total += f.content.len();
        }
        if total > MAX_FILES_BYTES {
            return Err(ProtocolError::TooLarge("files", total, MAX_FILES_BYTES));
        }
        if self.stdin.0.len() > MAX_STDIN_BYTES {
            return Err(ProtocolError::TooLarge(
                "stdin",
                self.stdin.0.len(),
                MAX_STDIN_BYTES,
            ));
        }
        if self.tests.len() > MAX_TEST_CASES {
            return Err(ProtocolError::TooManyTests(self.tests.len()));
        }
        if !self.tests.is_empty() && !self.stdin.0.is_empty() {
            return Err(ProtocolError::StdinWithTests);
        }
        if let Some(t) = &self.tty {
            t.validate()?;
        }
        let tests_stdin: usize = self.tests.iter().map(|t| t.stdin.0.len()).sum();
        if tests_stdin > MAX_STDIN_BYTES {
            return Err(ProtocolError::TooLarge(
                "the test cases' stdin",
                tests_stdin,
                MAX_STDIN_BYTES,
            ));
        }
        let ranged = [
            ("cpu_limit_ms", self.cpu_limit_ms, MAX_TIMEOUT_MS),
            ("stack_limit_kib", self.stack_limit_kib, MAX_STACK_LIMIT_KIB),
            (
                "file_size_limit_kib",
                self.file_size_limit_kib,
                MAX_FILE_SIZE_LIMIT_KIB,
            ),
        ];
        for (name, v, max) in ranged {
            if v.is_some_and(|v| v == 0 || v > max) {
                return Err(ProtocolError::OutOfRange(name, max));
            }
        }
        if self.run.is_empty() || self.run[0].is_empty() {
            return Err(ProtocolError::EmptyRun);
        }
        let argv = self
            .run
            .iter()
            .chain(self.args.iter())
            .chain(self.compile.iter().flatten());
        for a in argv {
            if a.contains('\0') {
                return Err(ProtocolError::NulByte("an argument"));
            }
        }
        for (k, v) in &self.env {
            if k.contains('\0') || v.contains('\0') || k.contains('=') || k.is_empty() {
                return Err(ProtocolError::NulByte("an environment variable"));
            }
        }
        if self.run_timeout_ms == 0 || self.run_timeout_ms > MAX_TIMEOUT_MS {
            return Err(ProtocolError::BadTimeout("run_timeout_ms", MAX_TIMEOUT_MS));
        }
        if self.compile_timeout_ms == 0 || self.compile_timeout_ms > MAX_TIMEOUT_MS {
            return Err(ProtocolError::BadTimeout(
                "compile_timeout_ms",
                MAX_TIMEOUT_MS,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_tokens_parse_and_authenticate() {
        let t = "ab".repeat(32);
        let cmdline = format!("quiet {} ip=1.2.3.4", agent_token_arg(&t));
        assert_eq!(agent_token_of(&cmdline), Some(t.clone()));
        assert_eq!(agent_token_of("cloude.agent_token=abc"), None);
        assert_eq!(
            agent_token_of(&format!("cloude.agent_token={}", "zz".repeat(32))),
            None
        );
        assert_eq!(agent_token_of("quiet"), None);
        let line = agent_auth_line(&t);
        assert!(agent_auth_ok(line.trim_end(), &t));
        assert!(!agent_auth_ok(&format!("AUTH {}", "cd".repeat(32)), &t));
        assert!(!agent_auth_ok("AUTH ", &t));
        assert!(!agent_auth_ok("POST /v1/run HTTP/1.1", &t));
    }

    #[test]
    fn wake_requests_are_checked() {
        let ok = WakeRequest {
            protocol_version: PROTOCOL_VERSION,
            entropy: Bytes(vec![7; MIN_WAKE_ENTROPY_BYTES]),
            unix_time_ns: 1,
            hostname: "cloude".into(),
        };
        assert_eq!(ok.validate(), Ok(()));
        let short = WakeRequest {
            entropy: Bytes(vec![7; MIN_WAKE_ENTROPY_BYTES - 1]),
            ..ok.clone()
        };
        assert_eq!(short.validate(), Err(ProtocolError::Entropy(31)));
        let long = WakeRequest {
            entropy: Bytes(vec![7; MAX_WAKE_ENTROPY_BYTES + 1]),
            ..ok.clone()
        };
        assert!(long.validate().is_err());
        for bad in ["", "a b", "x/y", &"h".repeat(65)] {
            let r = WakeRequest {
                hostname: bad.into(),
                ..ok.clone()
            };
            assert_eq!(r.validate(), Err(ProtocolError::BadHostname), "{bad:?}");
        }
        let v = WakeRequest {
            protocol_version: 9,
            ..ok
        };
        assert_eq!(v.validate(), Err(ProtocolError::Version(9)));
    }

    fn req() -> RunRequest {
        RunRequest {
            protocol_version: PROTOCOL_VERSION,
            files: vec![FileSpec {
                name: "main.py".into(),
                content: "print(1)".into(),
                encoding: Encoding::Utf8,
            }],
            compile: None,
            run: vec!["python3".into(), "main.py".into()],
            args: vec![],
            stdin: Bytes::default(),
            env: vec![],
            compile_timeout_ms: 10_000,
            run_timeout_ms: 5_000,
            output_limit_bytes: 1 << 20,
            memory_limit_mib: None,
            pids_limit: None,
            poweroff_after: true,
            network: false,
            run_as_root: false,
            cpu_limit_ms: None,
            stack_limit_kib: None,
            file_size_limit_kib: None,
            merge_stderr: false,
            tests: vec![],
            tty: None,
        }
    }

    #[test]
    fn test_cases_are_bounded() {
        let mut r = req();
        r.tests = vec![TestInput::default(); MAX_TEST_CASES];
        assert!(r.validate().is_ok());
        assert_eq!(
            r.test_output_limit(),
            (1 << 20).min(MAX_TESTS_OUTPUT_BYTES / MAX_TEST_CASES as u64)
        );
        r.tests.push(TestInput::default());
        assert_eq!(
            r.validate(),
            Err(ProtocolError::TooManyTests(MAX_TEST_CASES + 1))
        );
        let mut r = req();
        r.tests = vec![TestInput::default()];
        r.stdin = "x".into();
        assert_eq!(r.validate(), Err(ProtocolError::StdinWithTests));
        let mut r = req();
        r.tests = vec![
            TestInput {
                stdin: Bytes(vec![b'x'; MAX_STDIN_BYTES / 2 + 1]),
            };
            2
        ];
        assert!(matches!(r.validate(), Err(ProtocolError::TooLarge(..))));
        let mut r = req();
        r.cpu_limit_ms = Some(0);
        assert!(matches!(r.validate(), Err(ProtocolError::OutOfRange(..))));
        let mut r = req();
        r.stack_limit_kib = Some(MAX_STACK_LIMIT_KIB + 1);
        assert!(matches!(r.validate(), Err(ProtocolError::OutOfRange(..))));
        let mut r = req();
        r.file_size_limit_kib = Some(1);
        r.cpu_limit_ms = Some(1000);
        assert!(r.validate().is_ok());
    }

    #[test]
    fn round_trip_binary_output() {
        let r = StageResult {
            stdout: Bytes(vec![0, 159, 146, 150, 255]),
            stderr: "err".into(),
            exit_code: Some(3),
            signal: None,
            status: StageStatus::OutputLimit,
            message: None,
            wall_ms: 1,
            cpu_ms: 2,
            memory_kib: 3,
        };
        let j = serde_json::to_string(&r).expect("serialise");
        assert!(j.contains("\"output_limit\""));
        let back: StageResult = serde_json::from_str(&j).expect("parse");
        assert_eq!(back, r);
    }

    #[test]
    fn file_names() {
        for good in ["main.py", "src/lib.rs", "a.b.c", "ünïcode.txt"] {
            assert!(validate_file_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a\0b",
            "a\\b",
            "a\nb",
        ] {
            assert!(validate_file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validate_request() {
        assert!(req().validate().is_ok());
        let mut r = req();
        r.protocol_version = 99;
        assert_eq!(r.validate(), Err(ProtocolError::Version(99)));
        let mut r = req();
        r.files.push(r.files[0].clone());
        assert!(matches!(r.validate(), Err(ProtocolError::DuplicateFile(_))));
        let mut r = req();
        r.run.clear();
        assert_eq!(r.validate(), Err(ProtocolError::EmptyRun));
        let mut r = req();
        r.run_timeout_ms = 0;
        assert!(matches!(r.validate(), Err(ProtocolError::BadTimeout(..))));
        let mut r = req();
        r.args.push("a\0b".into());
        assert!(matches!(r.validate(), Err(ProtocolError::NulByte(_))));
    }

    #[test]
    fn ready_line_parses() {
        assert_eq!(parse_ready_line(&ready_line()), Some(PROTOCOL_VERSION));
        assert_eq!(parse_ready_line("garbage"), None);
        assert_eq!(parse_ready_line("CLOUDE-READY x"), None);
    }

    #[test]
    fn stream_event_shape() {
        let e = StreamEvent::Output {
            stage: Stage::Run,
            stream: StreamKind::Stdout,
            data: "hi".into(),
        };
        let j = serde_json::to_string(&e).expect("serialise");
        assert_eq!(
            j,
            r#"{"type":"output","stage":"run","stream":"stdout","data":"aGk="}"#
        );
    }

    #[test]
    fn bad_base64_rejected() {
        let f = FileSpec {
            name: "x".into(),
            content: "!!!".into(),
            encoding: Encoding::Base64,
        };
        assert!(f.bytes().is_err());
    }
}
