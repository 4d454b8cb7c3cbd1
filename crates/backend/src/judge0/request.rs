//! A Judge0 submission as the client sent it: decoding, Judge0's validations (same field
//! names and messages), Cloude's caps, and the [`Job`] it becomes.

use cloude_image::catalog::{Catalog, Language};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{decimal, Judge0Config, MAX_CALLBACK_URL_BYTES, MAX_OPTIONS_CHARS};
use crate::api::validate::{build_job, Draft, RawFile};
use crate::config::Config;
use crate::executor::{Job, TestCase};

/// Validation errors, Judge0's (Rails') shape: `{"field": ["message", ...]}`, in order.
#[derive(Debug, Default, PartialEq)]
pub struct FieldErrors(pub Vec<(String, String)>);

impl FieldErrors {
    pub fn add(&mut self, field: &str, msg: impl Into<String>) {
        self.0.push((field.to_string(), msg.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (f, msg) in &self.0 {
            let e = m.entry(f.clone()).or_insert_with(|| Value::Array(vec![]));
            if let Value::Array(a) = e {
                a.push(Value::String(msg.clone()));
            }
        }
        Value::Object(m)
    }
}

/// What the server keeps of an accepted submission (JSON in the store); limits hold the values
/// in force (defaults filled in), as Judge0 stores them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub language_id: u32,
    #[serde(with = "b64")]
    pub source_code: Vec<u8>,
    #[serde(with = "b64opt", default)]
    pub stdin: Option<Vec<u8>>,
    #[serde(with = "b64opt", default)]
    pub expected_output: Option<Vec<u8>>,
    /// The zip, as sent (decoded from base64).
    #[serde(with = "b64opt", default)]
    pub additional_files: Option<Vec<u8>>,
    pub compiler_options: Option<String>,
    pub command_line_arguments: Option<String>,
    pub number_of_runs: u64,
    pub cpu_time_limit: f64,
    pub cpu_extra_time: f64,
    pub wall_time_limit: f64,
    pub memory_limit: u64,
    pub stack_limit: u64,
    pub max_processes_and_or_threads: u64,
    pub enable_per_process_and_thread_time_limit: bool,
    pub enable_per_process_and_thread_memory_limit: bool,
    pub max_file_size: u64,
    pub redirect_stderr_to_stdout: bool,
    pub enable_network: bool,
    pub callback_url: Option<String>,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) mod b64opt {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Everything a submission is checked against.
pub struct Ctx<'a> {
    pub catalog: &'a Catalog,
    pub config: &'a Config,
    pub judge0: &'a Judge0Config,
}

/// A JSON value as Rails would read a scalar parameter: `None` for absent, null or "".
fn scalar(body: &serde_json::Map<String, Value>, name: &str) -> Option<Value> {
    match body.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(v.clone()),
    }
}

fn text(
    body: &serde_json::Map<String, Value>,
    name: &str,
    errs: &mut FieldErrors,
) -> Option<String> {
    match scalar(body, name)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => {
            errs.add(name, "is invalid");
            None
        }
    }
}

fn number(
    body: &serde_json::Map<String, Value>,
    name: &str,
    errs: &mut FieldErrors,
) -> Option<f64> {
    let n = match scalar(body, name)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() => Some(n),
        _ => {
            errs.add(name, "is not a number");
            None
        }
    }
}

fn boolean(
    body: &serde_json::Map<String, Value>,
    name: &str,
    errs: &mut FieldErrors,
) -> Option<bool> {
    match scalar(body, name)? {
        Value::Bool(b) => Some(b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "t" | "on" => Some(true),
            "false" | "0" | "f" | "off" => Some(false),
            _ => {
                errs.add(name, "is not a boolean");
                None
            }
        },
        Value::Number(n) => Some(n.as_f64() != Some(0.0)),
        _ => {
            errs.add(name, "is not a boolean");
            None
        }
    }
}

/// Rails' numericality messages, with the bound printed as Judge0 prints it.
fn range(
    errs: &mut FieldErrors,
    name: &str,
    v: f64,
    min: f64,
    min_inclusive: bool,
    max: f64,
    int_bounds: bool,
) {
    let show = |x: f64| {
        if int_bounds {
            format!("{}", x as i64)
        } else {
            decimal(x)
        }
    };
    if min_inclusive && v < min {
        errs.add(
            name,
            format!("must be greater than or equal to {}", show(min)),
        );
    } else if !min_inclusive && v <= min {
        errs.add(name, format!("must be greater than {}", show(min)));
    }
    if v > max {
        errs.add(name, format!("must be less than or equal to {}", show(max)));
    }
}

/// Rails' `blank?` for the source: empty or only whitespace.
fn blank(b: &[u8]) -> bool {
    b.iter().all(|c| c.is_ascii_whitespace())
}

/// Decodes and validates one submission object. `base64` is the `base64_encoded` parameter.
pub fn parse(body: &Value, base64: bool, ctx: &Ctx<'_>) -> Result<(Request, Job), FieldErrors> {
    let mut errs = FieldErrors::default();
    let Some(body) = body.as_object() else {
        errs.add("submission", "must be a JSON object");
        return Err(errs);
    };
    let j = ctx.judge0;
    let limits = &ctx.config.limits;
    let encoded = |name: &str, errs: &mut FieldErrors| -> Option<Vec<u8>> {
        let s = text(body, name, errs)?;
        if base64 {
            match super::decode64(&s) {
                Some(b) => Some(b),
                None => {
                    errs.add(name, "is not valid Base64");
                    None
                }
            }
        } else {
            Some(s.into_bytes())
        }
    };
    let source_code = encoded("source_code", &mut errs);
    let stdin = encoded("stdin", &mut errs);
    let expected_output = encoded("expected_output", &mut errs);
    let additional_files = match text(body, "additional_files", &mut errs) {
        None => None,
        Some(s) => match super::decode64(&s) {
            Some(b) => Some(b),
            None => {
                errs.add("additional_files", "is not valid Base64");
                None
            }
        },
    };
    let language = match scalar(body, "language_id") {
        None => {
            errs.add("language_id", "can't be blank");
            None
        }
        Some(v) => {
            let id = match &v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            match id.and_then(|i| u32::try_from(i).ok()) {
                Some(id) => match ctx.catalog.by_judge0_id(id) {
                    Some(l) => Some((id, l.clone())),
                    None => {
                        errs.add(
                            "language_id",
                            format!("language with id {id} doesn't exist"),
                        );
                        None
                    }
                },
                None => {
                    let shown = match &v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    errs.add(
                        "language_id",
                        format!("language with id {shown} doesn't exist"),
                    );
                    None
                }
            }
        }
    };
    let undecodable = errs.0.iter().any(|(f, _)| f == "source_code");
    match &source_code {
        None if undecodable => {}
        None => errs.add("source_code", "can't be blank"),
        Some(s) if blank(s) => errs.add("source_code", "can't be blank"),
        Some(s) if s.len() > limits.max_code_bytes => errs.add(
            "source_code",
            format!("is too long (maximum is {} bytes)", limits.max_code_bytes),
        ),
        Some(_) => {}
    }
    if let Some(s) = &stdin {
        if s.len() > limits.max_stdin_bytes {
            errs.add(
                "stdin",
                format!("is too long (maximum is {} bytes)", limits.max_stdin_bytes),
            );
        }
    }
    if let Some(s) = &expected_output {
        // Compared with at most the output limit's worth of stdout.
        if s.len() as u64 > limits.output_limit_bytes {
            errs.add(
                "expected_output",
                format!(
                    "is too long (maximum is {} bytes)",
                    limits.output_limit_bytes
                ),
            );
        }
    }
    let number_of_runs = number(body, "number_of_runs", &mut errs);
    let cpu_time_limit = number(body, "cpu_time_limit", &mut errs);
    let cpu_extra_time = number(body, "cpu_extra_time", &mut errs);
    let wall_time_limit = number(body, "wall_time_limit", &mut errs);
    let memory_limit = number(body, "memory_limit", &mut errs);
    let stack_limit = number(body, "stack_limit", &mut errs);
    let max_processes = number(body, "max_processes_and_or_threads", &mut errs);
    let per_process_time = boolean(body, "enable_per_process_and_thread_time_limit", &mut errs);
    let per_process_memory = boolean(
        body,
        "enable_per_process_and_thread_memory_limit",
        &mut errs,
    );
    let max_file_size = number(body, "max_file_size", &mut errs);
    let compiler_options = text(body, "compiler_options", &mut errs);
    let command_line_arguments = text(body, "command_line_arguments", &mut errs);
    let redirect = boolean(body, "redirect_stderr_to_stdout", &mut errs);
    let callback_url = text(body, "callback_url", &mut errs);
    let enable_network = boolean(body, "enable_network", &mut errs);

    let number_of_runs = number_of_runs.unwrap_or(j.number_of_runs as f64);
    range(
        &mut errs,
        "number_of_runs",
        number_of_runs,
        0.0,
        false,
        j.max_number_of_runs as f64,
        true,
    );
    let cpu_time_limit = cpu_time_limit.unwrap_or(j.cpu_time_limit);
    range(
        &mut errs,
        "cpu_time_limit",
        cpu_time_limit,
        0.0,
        true,
        j.max_cpu_time_limit,
        false,
    );
    let cpu_extra_time = cpu_extra_time.unwrap_or(j.cpu_extra_time);
    range(
        &mut errs,
        "cpu_extra_time",
        cpu_extra_time,
        0.0,
        true,
        j.max_cpu_extra_time,
        false,
    );
    let wall_time_limit = wall_time_limit.unwrap_or(j.wall_time_limit);
    range(
        &mut errs,
        "wall_time_limit",
        wall_time_limit,
        1.0f64.min(j.max_wall_time_limit),
        true,
        j.max_wall_time_limit,
        false,
    );
    let memory_limit = memory_limit.unwrap_or(j.memory_limit as f64);
    range(
        &mut errs,
        "memory_limit",
        memory_limit,
        2048.0,
        true,
        j.max_memory_limit as f64,
        true,
    );
    let stack_limit = stack_limit.unwrap_or(j.stack_limit as f64);
    range(
        &mut errs,
        "stack_limit",
        stack_limit,
        0.0,
        true,
        j.max_stack_limit as f64,
        true,
    );
    let max_processes = max_processes.unwrap_or(j.max_processes_and_or_threads as f64);
    range(
        &mut errs,
        "max_processes_and_or_threads",
        max_processes,
        0.0,
        false,
        j.max_max_processes_and_or_threads as f64,
        true,
    );
    // Per-process limits are a property of isolate; a VM limits the whole program.
    if per_process_time == Some(true) {
        errs.add(
            "enable_per_process_and_thread_time_limit",
            "this option cannot be enabled",
        );
    }
    if per_process_memory == Some(true) {
        errs.add(
            "enable_per_process_and_thread_memory_limit",
            "this option cannot be enabled",
        );
    }
    let max_file_size = max_file_size.unwrap_or(j.max_file_size as f64);
    range(
        &mut errs,
        "max_file_size",
        max_file_size,
        0.0,
        true,
        j.max_max_file_size as f64,
        true,
    );
    for (name, v) in [
        ("compiler_options", &compiler_options),
        ("command_line_arguments", &command_line_arguments),
    ] {
        if v.as_ref()
            .is_some_and(|s| s.chars().count() > MAX_OPTIONS_CHARS)
        {
            errs.add(
                name,
                format!("is too long (maximum is {MAX_OPTIONS_CHARS} characters)"),
            );
        }
    }
    let options_blank = |v: &Option<String>| v.as_deref().is_none_or(|s| s.trim().is_empty());
    if !options_blank(&compiler_options) {
        if !j.enable_compiler_options {
            errs.add(
                "compiler_options",
                "setting compiler options is not allowed",
            );
        } else if language.as_ref().is_some_and(|(_, l)| l.compile.is_none()) {
            errs.add(
                "compiler_options",
                "setting compiler options is only allowed for compiled languages",
            );
        }
    }
    if !options_blank(&command_line_arguments) && !j.enable_command_line_arguments {
        errs.add(
            "command_line_arguments",
            "setting command line arguments is not allowed",
        );
    }
    if let Some(url) = callback_url.as_deref().filter(|u| !u.trim().is_empty()) {
        if let Err(e) = super::callback::check_url(url, &j.callback_hosts) {
            errs.add("callback_url", e);
        }
        if url.len() > MAX_CALLBACK_URL_BYTES {
            errs.add(
                "callback_url",
                format!("is too long (maximum is {MAX_CALLBACK_URL_BYTES} characters)"),
            );
        }
    }
    if additional_files.as_ref().is_some_and(|z| !z.is_empty()) && !j.enable_additional_files {
        errs.add(
            "additional_files",
            "setting additional files is not allowed",
        );
    }
    let enable_network = enable_network.unwrap_or(false);
    if enable_network && !ctx.config.network.allow {
        errs.add("enable_network", "enabling network is not allowed");
    }
    let (Some((language_id, _)), Some(source_code), true) =
        (language, source_code, errs.is_empty())
    else {
        return Err(errs);
    };
    let req = Request {
        language_id,
        source_code,
        stdin,
        expected_output,
        additional_files: additional_files.filter(|z| !z.is_empty()),
        compiler_options,
        command_line_arguments,
        number_of_runs: number_of_runs as u64,
        cpu_time_limit,
        cpu_extra_time,
        wall_time_limit,
        memory_limit: memory_limit.ceil() as u64,
        stack_limit: stack_limit as u64,
        max_processes_and_or_threads: max_processes as u64,
        enable_per_process_and_thread_time_limit: false,
        enable_per_process_and_thread_memory_limit: false,
        max_file_size: max_file_size as u64,
        redirect_stderr_to_stdout: redirect.unwrap_or(j.redirect_stderr_to_stdout),
        enable_network,
        callback_url: callback_url.filter(|u| !u.trim().is_empty()),
    };
    let job = job(&req, ctx).map_err(|(f, m)| {
        let mut e = FieldErrors::default();
        e.add(&f, m);
        e
    })?;
    Ok((req, job))
}

/// Judge0 removes these from `compiler_options` and `command_line_arguments` before its shell
/// sees them; so do we (our argv never meets a shell, but the same input means the same words).
fn sanitise(s: &str) -> String {
    s.trim()
        .chars()
        .filter(|c| !matches!(c, '$' | '&' | ';' | '<' | '>' | '|' | '`'))
        .collect()
}

/// Splits words as the shell would (quotes, backslashes), without expansions.
fn words(field: &str, s: &str) -> Result<Vec<String>, (String, String)> {
    // A NUL cannot be part of an argv word (found by the judge0_request fuzz target).
    if s.contains('\0') {
        return Err((field.to_string(), "must not contain NUL bytes".into()));
    }
    shlex::split(&sanitise(s))
        .ok_or_else(|| (field.to_string(), "has an unterminated quote".into()))
}

/// The run's wall-clock timeout: `wall_time_limit`, as in Judge0 (the CPU limit is apart:
/// [`cpu_limit_ms`]).
pub fn run_timeout_ms(r: &Request) -> u64 {
    ((r.wall_time_limit * 1000.0).ceil() as u64).max(1)
}

/// The CPU-time limit enforced in the guest: `cpu_time_limit` plus `cpu_extra_time` (isolate
/// kills there, and the verdict is Time Limit Exceeded past `cpu_time_limit`); a CPU limit of
/// 0 means none.
pub fn cpu_limit_ms(r: &Request) -> Option<u64> {
    (r.cpu_time_limit > 0.0)
        .then(|| (((r.cpu_time_limit + r.cpu_extra_time) * 1000.0).ceil() as u64).max(1))
}

/// The job a stored submission runs as. Errors name the Judge0 field at fault.
pub fn job(r: &Request, ctx: &Ctx<'_>) -> Result<Job, (String, String)> {
    let mut language: Language = ctx
        .catalog
        .by_judge0_id(r.language_id)
        .ok_or_else(|| {
            (
                "language_id".to_string(),
                format!("language with id {} doesn't exist", r.language_id),
            )
        })?
        .clone();
    if let (Some(opts), Some(compile)) = (&r.compiler_options, language.compile.as_mut()) {
        let extra = words("compiler_options", opts)?;
        // Judge0 puts the options right before the source file (`gcc OPTIONS main.c`): after
        // the catalogue's own flags, so that the client's win (`-O0` after `-O2`).
        let at = compile
            .iter()
            .position(|a| *a == language.file)
            .unwrap_or(compile.len());
        compile.splice(at..at, extra);
    }
    let args = match &r.command_line_arguments {
        Some(a) => words("command_line_arguments", a)?,
        None => vec![],
    };
    let mut files = vec![RawFile {
        name: Some(language.file.clone()),
        bytes: r.source_code.clone(),
        field: "source_code".into(),
    }];
    if let Some(zip) = &r.additional_files {
        let caps = super::files::Caps::from_config(ctx.judge0, &ctx.config.limits);
        for (name, bytes) in
            super::files::unpack(zip, &caps).map_err(|e| ("additional_files".to_string(), e))?
        {
            // `unzip -n` in Judge0: an archive entry never replaces the source file.
            if name == language.file {
                continue;
            }
            files.push(RawFile {
                name: Some(name),
                bytes,
                field: "additional_files".into(),
            });
        }
    }
    let stdin = r.stdin.clone().unwrap_or_default();
    let mut job = build_job(
        Draft {
            language,
            files,
            stdin: String::new(),
            args,
            timeout_ms: Some(run_timeout_ms(r)),
            compile_timeout_ms: None,
            memory_mib: Some(r.memory_limit.div_ceil(1024).max(16)),
            network: r.enable_network,
            cpu_limit_ms: cpu_limit_ms(r),
            tests: vec![],
        },
        &ctx.config.limits,
    )
    .map_err(|e| {
        let field = match e.field.as_deref() {
            Some("code") => "source_code",
            Some("args") => "command_line_arguments",
            Some("memory_mib") => "memory_limit",
            Some("timeout_ms") => "wall_time_limit",
            Some("cpu_limit_ms") => "cpu_time_limit",
            _ => "additional_files",
        };
        (field.to_string(), e.message)
    })?;
    // Judge0's process limit: the agent's pids cgroup (threads count, as with isolate's -p).
    job.pids_limit = Some(r.max_processes_and_or_threads.max(1));
    // isolate's -k and -f, in KB as Judge0 gives them.
    job.stack_limit_kib = (r.stack_limit > 0).then_some(r.stack_limit);
    job.file_size_limit_kib = (r.max_file_size > 0).then_some(r.max_file_size);
    job.merge_stderr = r.redirect_stderr_to_stdout;
    if r.number_of_runs > 1 {
        // Several runs: compiled once, run as test cases in one VM.
        job.tests = (0..r.number_of_runs)
            .map(|_| TestCase {
                stdin: stdin.clone(),
                expected_output: None,
            })
            .collect();
    } else {
        job.stdin = stdin;
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx_parts() -> (Catalog, Config) {
        (Catalog::default_catalog(), Config::embedded())
    }

    fn parse_with(body: Value, base64: bool) -> Result<(Request, Job), FieldErrors> {
        let (catalog, config) = ctx_parts();
        let ctx = Ctx {
            catalog: &catalog,
            config: &config,
            judge0: &config.judge0,
        };
        parse(&body, base64, &ctx)
    }

    fn errors(body: Value) -> Value {
        parse_with(body, false).expect_err("invalid").to_json()
    }

    #[test]
    fn defaults_and_mapping() {
        let (r, job) = parse_with(
            json!({"source_code": "print(1)", "language_id": 71, "stdin": "x"}),
            false,
        )
        .expect("valid");
        assert_eq!(job.language.name, "python");
        assert_eq!(job.files[0].name, "main.py");
        assert_eq!(job.stdin, b"x");
        let j = Config::embedded().judge0;
        assert_eq!(r.cpu_time_limit, j.cpu_time_limit);
        assert_eq!(job.run_timeout_ms, (j.wall_time_limit * 1000.0) as u64);
        assert_eq!(
            job.cpu_limit_ms,
            Some(((j.cpu_time_limit + j.cpu_extra_time) * 1000.0) as u64)
        );
        assert_eq!(job.memory_mib, Some(j.memory_limit.div_ceil(1024)));
        assert_eq!(job.pids_limit, Some(j.max_processes_and_or_threads));
        assert_eq!(job.stack_limit_kib, Some(j.stack_limit));
        assert_eq!(job.file_size_limit_kib, Some(j.max_file_size));
        assert!(job.tests.is_empty() && !job.merge_stderr);
        // Several runs become test cases with the submission's stdin, compiled once.
        let (_, job) = parse_with(
            json!({"source_code": "print(1)", "language_id": 71, "stdin": "x",
                   "number_of_runs": 3, "redirect_stderr_to_stdout": true}),
            false,
        )
        .expect("valid");
        assert!(job.stdin.is_empty());
        assert_eq!(job.tests.len(), 3);
        assert!(job.tests.iter().all(|t| t.stdin == b"x"));
        assert!(job.merge_stderr);
        // Strings for numbers, as form-style clients send them; base64 input.
        let (r, job) = parse_with(
            json!({"source_code": "cHJpbnQoMSk=", "language_id": "54", "cpu_time_limit": "2",
                   "wall_time_limit": 3, "memory_limit": 65536,
                   "compiler_options": "-O0 -DX=\"a b\"", "command_line_arguments": "a 'b c' d;rm"}),
            true,
        )
        .expect("valid");
        assert_eq!(r.source_code, b"print(1)");
        assert_eq!(job.language.name, "cpp");
        assert_eq!(job.run_timeout_ms, 3000);
        assert_eq!(job.memory_mib, Some(64));
        let compile = job.language.compile.expect("compiled");
        assert_eq!(
            compile,
            ["g++", "-O2", "-pipe", "-o", "main", "-O0", "-DX=a b", "main.cpp"]
        );
        assert_eq!(job.args, ["a", "b c", "drm"]);
        // A CPU limit of 0 is "no CPU limit": the wall-clock limit applies.
        let (_, job) = parse_with(
            json!({"source_code": "x", "language_id": 46, "cpu_time_limit": 0, "wall_time_limit": 4}),
            false,
        )
        .expect("valid");
        assert_eq!(job.run_timeout_ms, 4000);
        assert_eq!(job.cpu_limit_ms, None);
    }

    #[test]
    fn judge0_messages() {
        assert_eq!(
            errors(json!({})),
            json!({"source_code": ["can't be blank"], "language_id": ["can't be blank"]})
        );
        assert_eq!(
            errors(json!({"source_code": "  ", "language_id": 9999})),
            json!({"language_id": ["language with id 9999 doesn't exist"], "source_code": ["can't be blank"]})
        );
        let max = Config::embedded().judge0.max_cpu_time_limit;
        assert_eq!(
            errors(
                json!({"source_code": "x", "language_id": 71, "cpu_time_limit": max + 1.0,
                          "memory_limit": 100, "wall_time_limit": "abc", "number_of_runs": 0})
            ),
            json!({
                "cpu_time_limit": [format!("must be less than or equal to {}", decimal(max))],
                "memory_limit": ["must be greater than or equal to 2048"],
                "wall_time_limit": ["is not a number"],
                "number_of_runs": ["must be greater than 0"],
            })
        );
        assert_eq!(
            errors(json!({"source_code": "x", "language_id": 71, "compiler_options": "-O2"})),
            json!({"compiler_options": ["setting compiler options is only allowed for compiled languages"]})
        );
        assert_eq!(
            errors(json!({"source_code": "x", "language_id": 71, "enable_network": true})),
            json!({"enable_network": ["enabling network is not allowed"]})
        );
        assert_eq!(
            errors(
                json!({"source_code": "x", "language_id": 71, "callback_url": "http://example.com/cb"})
            ),
            json!({"callback_url": ["setting callback is not allowed"]})
        );
        assert_eq!(
            errors(
                json!({"source_code": "x", "language_id": 71, "enable_per_process_and_thread_time_limit": true})
            ),
            json!({"enable_per_process_and_thread_time_limit": ["this option cannot be enabled"]})
        );
        let long_url = format!("http://127.0.0.1/{}", "a".repeat(MAX_CALLBACK_URL_BYTES));
        let (catalog, mut config) = ctx_parts();
        config.judge0.callback_hosts = vec!["127.0.0.1:*".into()];
        let ctx = Ctx {
            catalog: &catalog,
            config: &config,
            judge0: &config.judge0,
        };
        let e = parse(
            &json!({"source_code": "x", "language_id": 71, "callback_url": long_url}),
            false,
            &ctx,
        )
        .expect_err("long url")
        .to_json();
        assert_eq!(
            e,
            json!({"callback_url": [format!("is too long (maximum is {MAX_CALLBACK_URL_BYTES} characters)")]})
        );
        assert!(parse(
            &json!({"source_code": "x", "language_id": 71, "callback_url": "http://127.0.0.1:9/cb"}),
            false,
            &ctx,
        )
        .is_ok());
        let long = "a".repeat(MAX_OPTIONS_CHARS + 1);
        assert_eq!(
            errors(json!({"source_code": "x", "language_id": 50, "compiler_options": long})),
            json!({"compiler_options": ["is too long (maximum is 512 characters)"]})
        );
        assert_eq!(
            errors(
                json!({"source_code": "x", "language_id": 71, "command_line_arguments": "'open"})
            ),
            json!({"command_line_arguments": ["has an unterminated quote"]})
        );
        assert_eq!(
            parse_with(json!({"source_code": "@@@", "language_id": 71}), true)
                .expect_err("bad base64")
                .to_json(),
            json!({"source_code": ["is not valid Base64"]})
        );
        assert_eq!(
            parse_with(json!([1]), false).expect_err("array").to_json(),
            json!({"submission": ["must be a JSON object"]})
        );
    }

    #[test]
    fn size_caps() {
        let l = Config::embedded().limits;
        let big = "x".repeat(l.max_code_bytes + 1);
        assert_eq!(
            errors(json!({"source_code": big, "language_id": 71})),
            json!({"source_code": [format!("is too long (maximum is {} bytes)", l.max_code_bytes)]})
        );
        let big = "x".repeat(l.max_stdin_bytes + 1);
        assert_eq!(
            errors(json!({"source_code": "x", "language_id": 71, "stdin": big})),
            json!({"stdin": [format!("is too long (maximum is {} bytes)", l.max_stdin_bytes)]})
        );
        let big = "x".repeat(l.output_limit_bytes as usize + 1);
        assert!(
            errors(json!({"source_code": "x", "language_id": 71, "expected_output": big}))
                .get("expected_output")
                .is_some()
        );
    }

    #[test]
    fn stored_form_round_trips() {
        let (r, _) = parse_with(
            json!({"source_code": "print(1)", "language_id": 71, "stdin": "\u{0}\u{ff}", "expected_output": "1"}),
            false,
        )
        .expect("valid");
        let back: Request =
            serde_json::from_str(&serde_json::to_string(&r).expect("ser")).expect("de");
        assert_eq!(back, r);
    }
}
