//! From what the VM answered to Judge0's result fields and status, and from a stored
//! submission to the JSON Judge0 clients read (`fields`, `base64_encoded`).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::request::{b64opt, Request};
use super::{decimal, encode64, status_description, timestamp};
use crate::executor;
use cloude_protocol::{StageResult, StageStatus};

/// A finished submission's result (JSON in the store).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Outcome {
    pub status_id: i32,
    #[serde(with = "b64opt")]
    pub stdout: Option<Vec<u8>>,
    #[serde(with = "b64opt")]
    pub stderr: Option<Vec<u8>>,
    #[serde(with = "b64opt")]
    pub compile_output: Option<Vec<u8>>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    /// CPU seconds.
    pub time: Option<f64>,
    pub wall_time: Option<f64>,
    /// KB
    pub memory: Option<u64>,
}

fn non_empty(b: &[u8]) -> Option<Vec<u8>> {
    (!b.is_empty()).then(|| b.to_vec())
}

/// Ruby's `String#rstrip`: trailing whitespace and NUL.
fn rstrip(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0))
        .map_or(0, |i| i + 1);
    &b[..end]
}

/// Judge0's normalisation before comparing with `expected_output`:
/// `text.split("\n").collect(&:rstrip).join("\n").rstrip` — every line's trailing whitespace
/// and the trailing empty lines go; leading whitespace stays. Text that is not valid UTF-8 is
/// compared as it is (Ruby raises on it and Judge0 then compares the raw strings).
pub fn normalise(text: &[u8]) -> Vec<u8> {
    if std::str::from_utf8(text).is_err() {
        return text.to_vec();
    }
    let lines: Vec<&[u8]> = text.split(|c| *c == b'\n').map(rstrip).collect();
    rstrip(&lines.join(&b'\n')).to_vec()
}

/// Judge0's verdict for a program that ran to its end: Accepted unless `expected_output` was
/// given and differs. A program with no output has `stdout` null, which never equals a given
/// `expected_output` (not even an empty one), as in Judge0.
pub fn matches(expected: Option<&[u8]>, stdout: Option<&[u8]>) -> bool {
    match (expected, stdout) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(s)) => normalise(e) == normalise(s),
    }
}

/// The Runtime Error status for a fatal signal.
pub fn by_signal(sig: i32) -> i32 {
    match sig {
        11 => 7,
        25 => 8,
        8 => 9,
        6 => 10,
        _ => 12,
    }
}

fn internal(message: String) -> Outcome {
    Outcome {
        status_id: 13,
        message: Some(message),
        ..Outcome::default()
    }
}

fn joined(s: &StageResult) -> Option<Vec<u8>> {
    let mut b = s.stdout.0.clone();
    b.extend_from_slice(&s.stderr.0);
    non_empty(&b)
}

/// A submission's result as Judge0 reports it: one run, or with `number_of_runs` (sent as test
/// cases: compiled once, run in the same VM) the runs combined.
pub fn verdict(req: &Request, outcome: executor::Outcome) -> Outcome {
    let mut r = match outcome.result {
        // The host's own deadline (every stage's limit plus slack) passed: whatever the guest
        // did or said, the program ran past its time limit.
        Err(executor::RunFailure::AgentTimeout(ms)) => {
            return Outcome {
                status_id: 5,
                message: Some(format!(
                    "Time limit exceeded (no answer within the host's deadline of {ms} ms)"
                )),
                wall_time: Some(ms as f64 / 1000.0),
                ..Outcome::default()
            }
        }
        Err(e) => return internal(e.to_string()),
        Ok(r) => r,
    };
    let host_note = host_bounds(&mut r, &outcome.timings);
    let mut o = if r.tests.is_empty() {
        one_run(req, r.compile.as_ref(), r.run.as_ref())
    } else {
        let runs = r
            .tests
            .iter()
            .map(|t| one_run(req, r.compile.as_ref(), Some(t)))
            .collect();
        combine(runs)
    };
    if let Some(note) = host_note {
        if o.status_id == 5 {
            o.message = Some(format!("Time limit exceeded ({note})"));
        }
    }
    o
}

/// CPU time a guest spends beside its stages' own (the agent, the guest kernel, the
/// hypervisor's threads), per stage, that the host's measure may show above the stages'.
/// Measured honest runs under QEMU/TCG (Python, C compile and run, Node.js, Bash, 20,000 lines
/// of output): 70 to 475 ms above what the guest reported, most of it growing with the run.
const HOST_CPU_SLACK_MS: u64 = 300;
/// The same for wall-clock time: what the agent does around a stage (writing files, starting
/// the program, collecting its output and stats): 36 to 114 ms measured.
const HOST_WALL_SLACK_MS: u64 = 500;
/// Share (per mille) of the host-measured time allowed beside the stages' on top of the slack:
/// an emulated guest's device work, output pumping and code translation grow with the run (up
/// to 40 % of a short run measured, with the fixed slack).
const HOST_SLACK_PERMILLE: u64 = 250;

/// Judge0's time fields come from the guest, which a program with guest root can make lie (a
/// process moved out of its stage's cgroup is not counted; a subverted agent says what it
/// likes). The host measures the hypervisor's CPU time and the run's wall-clock time itself:
/// time neither the stages nor the slack explain is charged to the runs (spread evenly), so
/// no run is reported faster than the host allows and the limits are checked on it. Returns
/// a note when that raised a run's time. (Memory stays as the guest reports it: the host sees
/// only the VM's memory, not the program's.)
fn host_bounds(r: &mut cloude_protocol::RunResponse, t: &cloude_api::Timings) -> Option<String> {
    let stages = usize::from(r.compile.is_some()) + r.tests.len().max(1);
    let runs: Vec<&mut StageResult> = if r.tests.is_empty() {
        r.run.iter_mut().collect()
    } else {
        r.tests.iter_mut().collect()
    };
    if runs.is_empty() {
        return None;
    }
    let n = runs.len() as u64;
    let compile = r.compile.as_ref();
    let reported_cpu: u64 =
        compile.map_or(0, |c| c.cpu_ms) + runs.iter().map(|s| s.cpu_ms).sum::<u64>();
    let reported_wall: u64 =
        compile.map_or(0, |c| c.wall_ms) + runs.iter().map(|s| s.wall_ms).sum::<u64>();
    let slack = |per_stage: u64, measured: u64| {
        per_stage * stages as u64 + measured * HOST_SLACK_PERMILLE / 1000
    };
    let hidden_cpu = t.host_cpu_ms.map_or(0, |h| {
        h.saturating_sub(reported_cpu + slack(HOST_CPU_SLACK_MS, h))
    });
    let hidden_wall = t
        .run_ms
        .saturating_sub(reported_wall + slack(HOST_WALL_SLACK_MS, t.run_ms));
    tracing::debug!(
        host_cpu_ms = t.host_cpu_ms,
        reported_cpu_ms = reported_cpu,
        host_wall_ms = t.run_ms,
        reported_wall_ms = reported_wall,
        "judge0: the guest's figures against the host's"
    );
    if hidden_cpu == 0 && hidden_wall == 0 {
        return None;
    }
    for s in runs {
        s.cpu_ms += hidden_cpu.div_ceil(n);
        s.wall_ms += hidden_wall.div_ceil(n);
    }
    tracing::warn!(
        host_cpu_ms = t.host_cpu_ms,
        reported_cpu_ms = reported_cpu,
        hidden_cpu_ms = hidden_cpu,
        hidden_wall_ms = hidden_wall,
        "the guest reported less time than the host measured: charged to the program"
    );
    Some(format!(
        "the host measured {} ms of CPU and {} ms of wall-clock time the guest did not report",
        hidden_cpu, hidden_wall
    ))
}

fn one_run(req: &Request, compile: Option<&StageResult>, run: Option<&StageResult>) -> Outcome {
    let mut compile_output = None;
    if let Some(c) = compile {
        // Judge0 compiles with stderr sent to stdout; we get the two apart (stdout first).
        compile_output = joined(c);
        let failed = c.status != StageStatus::Ok
            || c.exit_code != Some(0)
            || c.signal.is_some()
            || run.is_none();
        if failed {
            return match c.status {
                StageStatus::Error => internal(
                    c.message
                        .clone()
                        .unwrap_or_else(|| "the compiler could not be started".into()),
                ),
                StageStatus::Timeout => Outcome {
                    status_id: 6,
                    compile_output: Some(b"Compilation time limit exceeded.".to_vec()),
                    ..Outcome::default()
                },
                _ => Outcome {
                    status_id: 6,
                    compile_output,
                    ..Outcome::default()
                },
            };
        }
    }
    let Some(run) = run else {
        return internal("the agent ran nothing".into());
    };
    let mut o = Outcome {
        status_id: 3,
        stdout: non_empty(&run.stdout.0),
        stderr: non_empty(&run.stderr.0),
        compile_output,
        message: None,
        exit_code: Some(run.exit_code.unwrap_or(0)),
        exit_signal: run.signal,
        time: Some(run.cpu_ms as f64 / 1000.0),
        wall_time: Some(run.wall_ms as f64 / 1000.0),
        memory: Some(run.memory_kib),
    };
    if req.redirect_stderr_to_stdout {
        // The agent gave the program one pipe for both (interleaved as written); anything on
        // stderr still (never, from that agent) is appended.
        let mut out = o.stdout.take().unwrap_or_default();
        out.extend(o.stderr.take().unwrap_or_default());
        o.stdout = non_empty(&out);
    }
    let cpu_limit_ms = (req.cpu_time_limit * 1000.0).round() as u64;
    match run.status {
        StageStatus::Timeout | StageStatus::CpuLimit => {
            o.status_id = 5;
            o.message = Some("Time limit exceeded".into());
        }
        StageStatus::OutputLimit => {
            // Judge0 caps output with a file-size limit: the program dies of SIGXFSZ.
            o.status_id = 8;
            o.exit_signal = o.exit_signal.or(Some(25));
            o.message = Some("Output limit exceeded".into());
        }
        StageStatus::MemoryLimit => {
            o.status_id = 12;
            o.exit_signal = o.exit_signal.or(Some(9));
            o.message = Some("Memory limit exceeded".into());
        }
        StageStatus::Error => {
            let msg = run
                .message
                .clone()
                .unwrap_or_else(|| "the program could not be run".into());
            o.status_id = if msg.contains("Exec format error") || msg.contains("os error 8") {
                14
            } else {
                13
            };
            o.message = Some(msg);
        }
        StageStatus::Ok => {
            if let Some(sig) = run.signal {
                o.status_id = by_signal(sig);
                o.message = Some(format!("Caught fatal signal {sig}"));
            } else if run.exit_code.is_some_and(|c| c != 0) {
                o.status_id = 11;
                o.message = Some(format!(
                    "Exited with error status {}",
                    run.exit_code.unwrap_or(0)
                ));
            } else if (cpu_limit_ms > 0 && run.cpu_ms > cpu_limit_ms)
                || run.wall_ms > super::request::run_timeout_ms(req)
            {
                o.status_id = 5;
                o.message = Some("Time limit exceeded".into());
            } else if !matches(req.expected_output.as_deref(), o.stdout.as_deref()) {
                o.status_id = 4;
            }
        }
    }
    o
}

/// Several runs (`number_of_runs`): the first run that was not Accepted (else the last), with
/// the mean time and memory of all, as Judge0 reports them.
pub fn combine(runs: Vec<Outcome>) -> Outcome {
    let times: Vec<f64> = runs.iter().filter_map(|r| r.time).collect();
    let mems: Vec<u64> = runs.iter().filter_map(|r| r.memory).collect();
    let pick = runs
        .iter()
        .position(|r| r.status_id != 3)
        .unwrap_or(runs.len().saturating_sub(1));
    let mut last = runs.into_iter().nth(pick).unwrap_or_default();
    if !times.is_empty() {
        last.time = Some(times.iter().sum::<f64>() / times.len() as f64);
    }
    if !mems.is_empty() {
        last.memory = Some((mems.iter().sum::<u64>() as f64 / mems.len() as f64) as u64);
    }
    last
}

/// Every field a client may ask for, in Judge0's order.
pub const FIELDS: [&str; 36] = [
    "source_code",
    "language_id",
    "stdin",
    "expected_output",
    "stdout",
    "status_id",
    "created_at",
    "finished_at",
    "time",
    "memory",
    "stderr",
    "token",
    "number_of_runs",
    "cpu_time_limit",
    "cpu_extra_time",
    "wall_time_limit",
    "memory_limit",
    "stack_limit",
    "max_processes_and_or_threads",
    "enable_per_process_and_thread_time_limit",
    "enable_per_process_and_thread_memory_limit",
    "max_file_size",
    "compile_output",
    "exit_code",
    "exit_signal",
    "message",
    "wall_time",
    "compiler_options",
    "command_line_arguments",
    "redirect_stderr_to_stdout",
    "callback_url",
    "additional_files",
    "enable_network",
    "status",
    "language",
    "post_execution_filesystem",
];

/// What Judge0 answers without `fields`.
pub const DEFAULT_FIELDS: [&str; 8] = [
    "token",
    "time",
    "memory",
    "stdout",
    "stderr",
    "compile_output",
    "message",
    "status",
];

/// Judge0's `fields` parameter: comma-separated names, `*` for all; unknown names are an error
/// (`Err` lists them); none given means the default eight.
pub fn requested_fields(param: Option<&str>) -> Result<Vec<&'static str>, Vec<String>> {
    let names: Vec<&str> = param
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .collect();
    let invalid: Vec<String> = names
        .iter()
        .filter(|n| **n != "*" && !FIELDS.contains(n))
        .map(|n| n.to_string())
        .collect();
    if !invalid.is_empty() {
        return Err(invalid);
    }
    if names.contains(&"*") {
        // `post_execution_filesystem` is Judge0 1.14's: not part of `*` in 1.13.1.
        return Ok(FIELDS[..FIELDS.len() - 1].to_vec());
    }
    let picked: Vec<&'static str> = FIELDS
        .iter()
        .copied()
        .filter(|f| names.contains(f))
        .collect();
    Ok(if picked.is_empty() {
        DEFAULT_FIELDS.to_vec()
    } else {
        picked
    })
}

/// A stored submission's pieces, for rendering.
pub struct View<'a> {
    pub token: &'a str,
    pub status_id: i32,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub request: &'a Request,
    pub outcome: Option<&'a Outcome>,
    pub language_name: String,
}

/// Some requested text field is not UTF-8 and `base64_encoded` was false.
#[derive(Debug, PartialEq)]
pub struct NotUtf8;

/// The submission as Judge0 renders it, with only `fields`.
pub fn render(v: &View<'_>, fields: &[&str], base64: bool) -> Result<Value, NotUtf8> {
    let r = v.request;
    let o = v.outcome;
    let text = |b: Option<&[u8]>| -> Result<Value, NotUtf8> {
        match b {
            None => Ok(Value::Null),
            Some(b) if base64 => Ok(Value::String(encode64(b))),
            Some(b) => std::str::from_utf8(b)
                .map(|s| Value::String(s.to_string()))
                .map_err(|_| NotUtf8),
        }
    };
    let opt_decimal = |x: Option<f64>| x.map_or(Value::Null, |x| Value::String(decimal(x)));
    let mut m = Map::new();
    for f in fields {
        let val = match *f {
            "source_code" => text(Some(&r.source_code))?,
            "language_id" => json!(r.language_id),
            "stdin" => text(r.stdin.as_deref())?,
            "expected_output" => text(r.expected_output.as_deref())?,
            "stdout" => text(o.and_then(|o| o.stdout.as_deref()))?,
            "status_id" => json!(v.status_id),
            "created_at" => json!(timestamp(v.created_at)),
            "finished_at" => v.finished_at.map_or(Value::Null, |t| json!(timestamp(t))),
            "time" => opt_decimal(o.and_then(|o| o.time)),
            "memory" => o.and_then(|o| o.memory).map_or(Value::Null, |m| json!(m)),
            "stderr" => text(o.and_then(|o| o.stderr.as_deref()))?,
            "token" => json!(v.token),
            "number_of_runs" => json!(r.number_of_runs),
            "cpu_time_limit" => json!(decimal(r.cpu_time_limit)),
            "cpu_extra_time" => json!(decimal(r.cpu_extra_time)),
            "wall_time_limit" => json!(decimal(r.wall_time_limit)),
            "memory_limit" => json!(r.memory_limit),
            "stack_limit" => json!(r.stack_limit),
            "max_processes_and_or_threads" => json!(r.max_processes_and_or_threads),
            "enable_per_process_and_thread_time_limit" => {
                json!(r.enable_per_process_and_thread_time_limit)
            }
            "enable_per_process_and_thread_memory_limit" => {
                json!(r.enable_per_process_and_thread_memory_limit)
            }
            "max_file_size" => json!(r.max_file_size),
            "compile_output" => text(o.and_then(|o| o.compile_output.as_deref()))?,
            "exit_code" => json!(o.and_then(|o| o.exit_code)),
            "exit_signal" => json!(o.and_then(|o| o.exit_signal)),
            "message" => match o.and_then(|o| o.message.as_deref()) {
                None => Value::Null,
                Some(m) if base64 => json!(encode64(m.as_bytes())),
                Some(m) => json!(m),
            },
            "wall_time" => opt_decimal(o.and_then(|o| o.wall_time)),
            "compiler_options" => json!(r.compiler_options),
            "command_line_arguments" => json!(r.command_line_arguments),
            "redirect_stderr_to_stdout" => json!(r.redirect_stderr_to_stdout),
            "callback_url" => json!(r.callback_url),
            "additional_files" => r
                .additional_files
                .as_deref()
                .map_or(Value::Null, |z| json!(encode64(z))),
            "enable_network" => json!(r.enable_network),
            "status" => json!({"id": v.status_id, "description": status_description(v.status_id)}),
            "language" => json!({"id": r.language_id, "name": v.language_name}),
            // Judge0 1.14 sends the box's files; we keep none.
            "post_execution_filesystem" => Value::Null,
            _ => continue,
        };
        m.insert((*f).to_string(), val);
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloude_protocol::{Bytes, RunResponse};

    fn req(expected: Option<&str>) -> Request {
        Request {
            language_id: 71,
            source_code: b"x".to_vec(),
            stdin: None,
            expected_output: expected.map(|e| e.as_bytes().to_vec()),
            additional_files: None,
            compiler_options: None,
            command_line_arguments: None,
            number_of_runs: 1,
            cpu_time_limit: 2.0,
            cpu_extra_time: 0.5,
            wall_time_limit: 5.0,
            memory_limit: 128000,
            stack_limit: 64000,
            max_processes_and_or_threads: 60,
            enable_per_process_and_thread_time_limit: false,
            enable_per_process_and_thread_memory_limit: false,
            max_file_size: 1024,
            redirect_stderr_to_stdout: false,
            enable_network: false,
            callback_url: None,
        }
    }

    fn stage(status: StageStatus, code: Option<i32>, sig: Option<i32>, out: &str) -> StageResult {
        StageResult {
            stdout: Bytes::from(out),
            stderr: Bytes::from(""),
            exit_code: code,
            signal: sig,
            status,
            message: None,
            wall_ms: 20,
            cpu_ms: 10,
            memory_kib: 3000,
        }
    }

    fn run(req: &Request, compile: Option<StageResult>, run: Option<StageResult>) -> Outcome {
        verdict(
            req,
            executor::Outcome {
                result: Ok(RunResponse {
                    compile,
                    run,
                    tests: vec![],
                }),
                timings: Default::default(),
                limits: cloude_api::AppliedLimits {
                    timeout_ms: 1,
                    compile_timeout_ms: 1,
                    memory_mib: 1,
                    output_limit_bytes: 1,
                    cpu_limit_ms: None,
                },
            },
        )
    }

    #[test]
    fn judge0_comparison_rule() {
        assert!(matches(Some(b"1\n2\n"), Some(b"1  \n2\t\n\n\n")));
        assert!(matches(Some(b"a b"), Some(b"a b\r\n")));
        assert!(!matches(Some(b" a"), Some(b"a")), "leading space counts");
        assert!(
            !matches(Some(b"a\n\nb"), Some(b"a\nb")),
            "inner empty lines count"
        );
        assert!(!matches(Some(b""), None), "null stdout never matches");
        assert!(matches(Some(b"\n"), Some(b"  ")));
        assert!(matches(None, Some(b"anything")));
        assert!(
            matches(Some(b"x\0"), Some(b"x")),
            "NUL is stripped like whitespace"
        );
        assert!(
            !matches(Some(b"\xff "), Some(b"\xff")),
            "invalid UTF-8 compares raw"
        );
    }

    #[test]
    fn statuses() {
        let r = req(Some("ok"));
        assert_eq!(
            run(
                &r,
                None,
                Some(stage(StageStatus::Ok, Some(0), None, "ok\n"))
            )
            .status_id,
            3
        );
        assert_eq!(
            run(&r, None, Some(stage(StageStatus::Ok, Some(0), None, "no"))).status_id,
            4
        );
        let o = run(&r, None, Some(stage(StageStatus::Ok, Some(3), None, "ok")));
        assert_eq!((o.status_id, o.exit_code), (11, Some(3)));
        assert_eq!(o.message.as_deref(), Some("Exited with error status 3"));
        for (sig, want) in [(11, 7), (25, 8), (8, 9), (6, 10), (9, 12)] {
            let o = run(&r, None, Some(stage(StageStatus::Ok, None, Some(sig), "")));
            assert_eq!(
                (o.status_id, o.exit_signal, o.exit_code),
                (want, Some(sig), Some(0))
            );
        }
        assert_eq!(
            run(
                &r,
                None,
                Some(stage(StageStatus::Timeout, None, Some(9), ""))
            )
            .status_id,
            5
        );
        assert_eq!(
            run(
                &r,
                None,
                Some(stage(StageStatus::OutputLimit, None, None, ""))
            )
            .status_id,
            8
        );
        assert_eq!(
            run(
                &r,
                None,
                Some(stage(StageStatus::MemoryLimit, None, None, ""))
            )
            .status_id,
            12
        );
        let mut busy = stage(StageStatus::Ok, Some(0), None, "ok");
        busy.cpu_ms = 2500;
        assert_eq!(run(&r, None, Some(busy)).status_id, 5, "over the CPU limit");
        let mut e = stage(StageStatus::Error, None, None, "");
        e.message = Some("cannot start \"./main\": Exec format error (os error 8)".into());
        assert_eq!(run(&r, None, Some(e)).status_id, 14);
        let o = run(&r, None, Some(stage(StageStatus::Ok, Some(0), None, "ok")));
        assert_eq!(
            (o.time, o.wall_time, o.memory),
            (Some(0.01), Some(0.02), Some(3000))
        );
        // Compilation.
        let mut c = stage(StageStatus::Ok, Some(1), None, "");
        c.stderr = Bytes::from("main.c:1: error");
        let o = run(&r, Some(c), None);
        assert_eq!(o.status_id, 6);
        assert_eq!(o.compile_output.as_deref(), Some(&b"main.c:1: error"[..]));
        assert_eq!((o.time, o.exit_code, o.stdout.as_ref()), (None, None, None));
        let o = run(
            &r,
            Some(stage(StageStatus::Timeout, None, Some(9), "")),
            None,
        );
        assert_eq!(
            o.compile_output.as_deref(),
            Some(&b"Compilation time limit exceeded."[..])
        );
        let mut warn = stage(StageStatus::Ok, Some(0), None, "");
        warn.stderr = Bytes::from("warning: x");
        let o = run(
            &r,
            Some(warn),
            Some(stage(StageStatus::Ok, Some(0), None, "ok")),
        );
        assert_eq!(
            (o.status_id, o.compile_output.as_deref()),
            (3, Some(&b"warning: x"[..]))
        );
        // Internal errors.
        let o = verdict(
            &r,
            executor::Outcome {
                result: Err(executor::RunFailure::NoAgent("refused".into())),
                timings: Default::default(),
                limits: cloude_api::AppliedLimits {
                    timeout_ms: 1,
                    compile_timeout_ms: 1,
                    memory_mib: 1,
                    output_limit_bytes: 1,
                    cpu_limit_ms: None,
                },
            },
        );
        assert_eq!(
            (o.status_id, o.message.as_deref()),
            (13, Some("cannot talk to the VM's agent: refused"))
        );
        // stderr into stdout.
        let mut r2 = req(Some("ab"));
        r2.redirect_stderr_to_stdout = true;
        let mut s = stage(StageStatus::Ok, Some(0), None, "a");
        s.stderr = Bytes::from("b");
        let o = run(&r2, None, Some(s));
        assert_eq!((o.status_id, o.stderr.as_ref()), (3, None));
    }

    fn with_host(req: &Request, run: StageResult, host_cpu_ms: u64, run_ms: u64) -> Outcome {
        verdict(
            req,
            executor::Outcome {
                result: Ok(RunResponse {
                    compile: None,
                    run: Some(run),
                    tests: vec![],
                }),
                timings: cloude_api::Timings {
                    run_ms,
                    host_cpu_ms: Some(host_cpu_ms),
                    ..Default::default()
                },
                limits: Default::default(),
            },
        )
    }

    #[test]
    fn the_host_measure_bounds_what_the_guest_reports() {
        let r = req(Some("ok"));
        let ok = stage(StageStatus::Ok, Some(0), None, "ok");
        // Within the slack: the guest's figures stand.
        let o = with_host(&r, ok.clone(), 250, 400);
        assert_eq!(
            (o.status_id, o.time, o.wall_time),
            (3, Some(0.01), Some(0.02))
        );
        // The guest says 10 ms of CPU; the host measured 4 s: Time Limit Exceeded (limit 2 s),
        // with the time the host allows at least.
        let o = with_host(&r, ok.clone(), 4000, 4200);
        assert_eq!(o.status_id, 5, "{o:?}");
        assert!(o.time.unwrap_or(0.0) >= 2.0, "{o:?}");
        assert!(
            o.message.as_deref().unwrap_or("").contains("host measured"),
            "{o:?}"
        );
        // Hidden wall-clock time past the 5 s wall limit: TLE too.
        let o = with_host(&r, ok.clone(), 100, 9000);
        assert_eq!(o.status_id, 5, "{o:?}");
        assert!(o.wall_time.unwrap_or(0.0) > 5.0, "{o:?}");
        // Hidden time under the limits raises the reported time but keeps the verdict.
        let o = with_host(&r, ok, 1500, 1600);
        assert_eq!(o.status_id, 3, "{o:?}");
        assert!(o.time.unwrap_or(0.0) > 0.7, "{o:?}");
        // The host's own deadline passed: TLE, never an internal error.
        let o = verdict(
            &r,
            executor::Outcome {
                result: Err(executor::RunFailure::AgentTimeout(12000)),
                timings: Default::default(),
                limits: Default::default(),
            },
        );
        assert_eq!(o.status_id, 5, "{o:?}");
    }

    #[test]
    fn several_runs_average() {
        let a = Outcome {
            status_id: 3,
            time: Some(1.0),
            memory: Some(100),
            ..Outcome::default()
        };
        let b = Outcome {
            status_id: 4,
            time: Some(2.0),
            memory: Some(300),
            ..Outcome::default()
        };
        let c = combine(vec![a.clone(), b.clone()]);
        assert_eq!((c.status_id, c.time, c.memory), (4, Some(1.5), Some(200)));
        // The first run that failed is the one reported.
        let c = combine(vec![b, a.clone(), a]);
        assert_eq!(c.status_id, 4);
    }

    #[test]
    fn runs_sent_as_test_cases_are_combined() {
        let r = req(Some("ok"));
        let ok = stage(StageStatus::Ok, Some(0), None, "ok");
        let mut slow = stage(StageStatus::CpuLimit, None, Some(9), "");
        slow.cpu_ms = 2500;
        let o = verdict(
            &r,
            executor::Outcome {
                result: Ok(RunResponse {
                    compile: None,
                    run: None,
                    tests: vec![ok.clone(), slow, ok],
                }),
                timings: Default::default(),
                limits: Default::default(),
            },
        );
        assert_eq!(o.status_id, 5, "{o:?}");
        // The mean of 10, 2500 and 10 ms.
        assert!(o.time.is_some_and(|t| (t - 0.84).abs() < 1e-9), "{o:?}");
    }

    #[test]
    fn fields_and_rendering() {
        assert_eq!(
            requested_fields(None).expect("default"),
            DEFAULT_FIELDS.to_vec()
        );
        assert_eq!(
            requested_fields(Some("")).expect("empty"),
            DEFAULT_FIELDS.to_vec()
        );
        assert_eq!(
            requested_fields(Some("stdout,status_id,bogus,x")).expect_err("invalid"),
            vec!["bogus".to_string(), "x".to_string()]
        );
        assert_eq!(requested_fields(Some("*")).expect("all").len(), 35);
        let r = req(None);
        let o = Outcome {
            status_id: 3,
            stdout: Some(b"hello, Judge0\n".to_vec()),
            time: Some(0.001),
            memory: Some(376),
            ..Outcome::default()
        };
        let v = View {
            token: "t",
            status_id: 3,
            created_at: 0,
            finished_at: Some(1000),
            request: &r,
            outcome: Some(&o),
            language_name: "Python (3.11.2)".into(),
        };
        let j = render(&v, &DEFAULT_FIELDS, false).expect("render");
        assert_eq!(
            j,
            json!({"token": "t", "time": "0.001", "memory": 376, "stdout": "hello, Judge0\n",
                   "stderr": null, "compile_output": null, "message": null,
                   "status": {"id": 3, "description": "Accepted"}})
        );
        let j = render(&v, &["stdout", "finished_at", "language"], true).expect("b64");
        assert_eq!(
            j,
            json!({"stdout": "aGVsbG8sIEp1ZGdlMAo=\n", "finished_at": "1970-01-01T00:00:01.000Z",
                   "language": {"id": 71, "name": "Python (3.11.2)"}})
        );
        let bin = Outcome {
            stdout: Some(vec![0xff]),
            ..o.clone()
        };
        let v = View {
            outcome: Some(&bin),
            ..v
        };
        assert_eq!(render(&v, &["stdout"], false), Err(NotUtf8));
        assert!(
            render(&v, &["time"], false).is_ok(),
            "only requested fields count"
        );
    }
}
