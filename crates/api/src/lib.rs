//! The native API of `cloude-server` (`/v1`), written once: the request, response, stream and
//! language types (both `Serialize` and `Deserialize`, so the server, the CLI, the tests and the
//! bench read and write the same types), and [`client::Client`], a small typed blocking client.
//!
//! Stage and stream names come from the agent protocol (`cloude_protocol`); the overall
//! [`Status`] and the signal names are defined here.

pub mod client;
pub mod sandbox;

use serde::{Deserialize, Serialize};

pub use cloude_protocol::{Stage, StageStatus, StreamKind};

/// `POST /v1/executions` (and `/v1/executions/stream`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionRequest {
    /// Name or alias.
    pub language: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileIn>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// CPU time the program may use (user + system, all its processes), ms; beyond it the run
    /// ends with `cpu_limit`. Unset: only the wall-clock `timeout_ms` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_ms: Option<u64>,
    /// Test cases: compiled once, the program runs once per case in the same fresh VM (each run
    /// in its own clean copy of the compiled work directory and cgroup). `stdin` must then be
    /// unset; the answer has a `tests` section with a verdict per case and overall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<Vec<TestIn>>,
    /// `/v1/executions/ws` only: run the program on a pseudo-terminal of this size (`{rows,
    /// cols}`): a prompt, echo, Ctrl-C (`\u0003` as input) interrupting the foreground program,
    /// curses; its output is one stream (`stdout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

pub use cloude_protocol::TtySize;

/// One test case of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Compared with the program's stdout by Judge0's rule (trailing whitespace of each line
    /// and trailing empty lines ignored); unset: the case passes when the program exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_output: Option<String>,
}

/// One file of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIn {
    pub name: String,
    pub content: String,
    /// `utf8` (default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

/// Outcome of an execution as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The program ran to its own exit, whatever its exit code (or a signal it caused).
    Ok,
    Timeout,
    /// The program used more CPU time than `cpu_limit_ms`.
    CpuLimit,
    OutputLimit,
    MemoryLimit,
    CompileError,
    InternalError,
}

impl Status {
    /// Every status, for tests and documentation.
    pub const ALL: [Status; 7] = [
        Status::Ok,
        Status::Timeout,
        Status::CpuLimit,
        Status::OutputLimit,
        Status::MemoryLimit,
        Status::CompileError,
        Status::InternalError,
    ];

    /// The wire name (as serde writes it; a unit test keeps the two equal).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Timeout => "timeout",
            Status::CpuLimit => "cpu_limit",
            Status::OutputLimit => "output_limit",
            Status::MemoryLimit => "memory_limit",
            Status::CompileError => "compile_error",
            Status::InternalError => "internal_error",
        }
    }
}

/// One stage (the compile stage, in `compile`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOut {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    /// Name of the signal that ended the stage (`SIGKILL`), if any.
    pub signal: Option<String>,
    /// Its number (9), beside the name.
    #[serde(default)]
    pub signal_number: Option<i32>,
    pub status: StageStatus,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub memory_kib: u64,
}

/// Where a request's time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: u64,
    /// Getting a ready VM: a boot, a restore and wake, or only the wait to take a pooled one.
    pub boot_ms: u64,
    pub run_ms: u64,
    pub total_ms: u64,
    /// CPU time the VM's hypervisor used during the run (all stages, the guest kernel and
    /// agent included), measured by the host: what the guest reports can be checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpu_ms: Option<u64>,
    /// Where the request's VM came from.
    #[serde(default)]
    pub vm_source: VmSource,
}

/// Where a request's VM came from (every VM serves one request whatever its source).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmSource {
    /// Booted for the request.
    #[default]
    Cold,
    /// Restored from a snapshot for the request (and woken as a new machine).
    Snapshot,
    /// Taken from the warm pool (booted or restored ahead of the request).
    Pool,
}

/// The limits a request ran under (its own or the server's defaults), so that a client can say
/// which one was hit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLimits {
    pub timeout_ms: u64,
    pub compile_timeout_ms: u64,
    /// The program's memory limit (the VM's memory when the request set none).
    pub memory_mib: u64,
    pub output_limit_bytes: u64,
    /// The CPU-time limit, when the request set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_ms: Option<u64>,
}

/// A test case's verdict, and the overall one of [`TestsOut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Ran to exit code 0 with the expected output (or none was given).
    Passed,
    WrongAnswer,
    /// Exited with another code, or was killed by a signal it caused.
    RuntimeError,
    Timeout,
    CpuLimit,
    MemoryLimit,
    OutputLimit,
    /// Overall only: nothing ran.
    CompileError,
    InternalError,
}

/// One test case's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestOut {
    pub verdict: Verdict,
    pub stdout: String,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    #[serde(default)]
    pub signal_number: Option<i32>,
    pub status: StageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub memory_kib: u64,
}

/// The `tests` section of an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestsOut {
    /// `passed` when every case passed, else the verdict of the first case that did not.
    pub verdict: Verdict,
    pub passed: u32,
    pub total: u32,
    pub cases: Vec<TestOut>,
}

/// Answer of `POST /v1/executions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionResponse {
    pub request_id: String,
    pub language: String,
    pub version: String,
    /// Output of the last stage that ran (the compiler's on `compile_error`), as UTF-8 (invalid
    /// sequences replaced by U+FFFD).
    pub stdout: String,
    pub stderr: String,
    /// The exact bytes, base64, present only when the output is not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    pub exit_code: Option<i32>,
    /// Name of the signal that ended the program (`SIGUSR1`), if any.
    pub signal: Option<String>,
    /// Its number (10), beside the name.
    #[serde(default)]
    pub signal_number: Option<i32>,
    pub status: Status,
    /// Set for `internal_error` (and other statuses when there is something to say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile: Option<StageOut>,
    /// CPU time the program used (user + system, its whole cgroup in the guest), ms.
    #[serde(default)]
    pub cpu_ms: u64,
    /// The program's peak memory (its cgroup's `memory.peak` in the guest), KiB.
    #[serde(default)]
    pub memory_kib: u64,
    pub timings: Timings,
    #[serde(default)]
    pub limits: AppliedLimits,
    /// With test cases: each case's result and the overall verdict. The top-level output,
    /// status and measurements are then those of the first case that did not pass (the last
    /// case when all passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestsOut>,
}

/// One line of `POST /v1/executions/stream`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamLine {
    Output {
        stage: Stage,
        stream: StreamKind,
        data: String,
    },
    Result {
        result: Box<ExecutionResponse>,
    },
    Error {
        error: String,
        message: String,
        /// For a refusal that may pass (a full queue): seconds to wait before trying again (the
        /// `Retry-After` of the HTTP routes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
    },
    /// `/v1/executions/ws` only: a stage began.
    Stage {
        stage: Stage,
    },
    /// `/v1/executions/ws` only: a stage ended (its output came before it, as `output`).
    Exit {
        stage: Stage,
        exit_code: Option<i32>,
        signal: Option<String>,
        signal_number: Option<i32>,
        status: StageStatus,
        wall_ms: u64,
        cpu_ms: u64,
        memory_kib: u64,
    },
}

/// A client's message on `/v1/executions/ws` after its first one (the
/// [`ExecutionRequest`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WsInput {
    /// Standard input for the program: `data` as text, or `data_base64`.
    Stdin {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    },
    /// End of the program's standard input.
    CloseStdin,
    /// A signal for the running stage's processes, by name (`SIGINT`) or number.
    Signal { signal: SignalRef },
    /// The terminal's new size (a run with `tty`).
    Resize { rows: u16, cols: u16 },
}

/// A signal by name or number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SignalRef {
    Number(i32),
    Name(String),
}

impl SignalRef {
    pub fn number(&self) -> Option<i32> {
        match self {
            SignalRef::Number(n) => Some(*n),
            SignalRef::Name(s) => signal_number(s),
        }
    }
}

/// One entry of `GET /v1/languages`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanguageInfo {
    pub name: String,
    pub version: String,
    pub aliases: Vec<String>,
    pub extensions: Vec<String>,
    pub compiled: bool,
    pub entry_file: String,
    /// How the language's root reaches its VMs on this server: `initramfs` or `block`
    /// (`[images] format`).
    #[serde(default)]
    pub image_format: String,
}

/// `GET /v1/languages`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Languages {
    pub languages: Vec<LanguageInfo>,
}

/// The body of every error answer (4xx/5xx).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code (`bad_request`, `queue_full`, ...).
    pub error: String,
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Signal number to its name (`SIGKILL`), or the number as text.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| sig.to_string())
}

/// Signal name (`SIGUSR1`, or a number as text) to its number.
pub fn signal_number(name: &str) -> Option<i32> {
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
        .or_else(|| name.parse().ok())
}

/// Percent-encodes a path segment or query value: every byte but unreserved ones and `/` (the
/// one spelling the server's agent client and the CLI use).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_are_serdes() {
        for s in Status::ALL {
            assert_eq!(
                serde_json::to_value(s).expect("serialize"),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }

    #[test]
    fn signals_both_ways() {
        for n in 1..=31 {
            let name = signal_name(n);
            assert_eq!(signal_number(&name), Some(n), "{name}");
        }
        assert_eq!(signal_name(10), "SIGUSR1");
        assert_eq!(signal_number("SIGXFSZ"), Some(25));
        assert_eq!(signal_number("40"), Some(40));
        assert_eq!(signal_number("bogus"), None);
    }

    #[test]
    fn request_round_trips_and_omits_defaults() {
        let r = ExecutionRequest {
            language: "python".into(),
            code: Some("print(1)".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).expect("serialize");
        assert_eq!(
            v,
            serde_json::json!({"language": "python", "code": "print(1)"})
        );
        let back: ExecutionRequest = serde_json::from_value(v).expect("parse");
        assert_eq!(back, r);
        assert!(serde_json::from_str::<ExecutionRequest>(r#"{"language":"x","bogus":1}"#).is_err());
    }

    #[test]
    fn stream_lines_keep_their_wire_shape() {
        let l = StreamLine::Output {
            stage: Stage::Run,
            stream: StreamKind::Stderr,
            data: "x".into(),
        };
        assert_eq!(
            serde_json::to_value(&l).expect("serialize"),
            serde_json::json!({"type": "output", "stage": "run", "stream": "stderr", "data": "x"})
        );
    }
}
