//! Turns client input into a [`Job`], checking every limit and naming the field at fault.

use base64::Engine as _;
use cloude_image::catalog::{Catalog, Language};
use cloude_protocol::{Encoding, FileSpec};

use super::error::ApiError;
use crate::config::Limits;
use crate::executor::{Job, TestCase};

/// A file as the client sent it, after its encoding was understood.
pub struct RawFile {
    pub name: Option<String>,
    pub bytes: Vec<u8>,
    /// Path used in error messages, e.g. `files[2]`.
    pub field: String,
}

/// Everything needed to build a job, already type-checked.
pub struct Draft {
    pub language: Language,
    pub files: Vec<RawFile>,
    pub stdin: String,
    pub args: Vec<String>,
    pub timeout_ms: Option<u64>,
    pub compile_timeout_ms: Option<u64>,
    pub memory_mib: Option<u64>,
    /// Whether the program may use the VM's network (already checked against the config).
    pub network: bool,
    pub cpu_limit_ms: Option<u64>,
    /// Test cases (`tests[i]` in errors).
    pub tests: Vec<TestCase>,
}

pub fn find_language<'c>(
    catalog: &'c Catalog,
    name: &str,
    version: Option<&str>,
) -> Result<&'c Language, ApiError> {
    if catalog.find(name, None).is_none() {
        return Err(ApiError::invalid(
            "language",
            format!("unknown language {name:?}; GET /v1/languages lists them"),
        ));
    }
    catalog.find(name, version).ok_or_else(|| {
        ApiError::invalid(
            "version",
            format!("no version of {name} matches {:?}", version.unwrap_or("")),
        )
    })
}

/// Decodes a file's content according to its `encoding` (utf8, base64, hex).
pub fn decode_content(
    field: &str,
    content: &str,
    encoding: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    match encoding.unwrap_or("utf8") {
        "utf8" | "utf-8" => Ok(content.as_bytes().to_vec()),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(content.trim())
            .map_err(|_| {
                ApiError::invalid(format!("{field}.content"), "content is not valid base64")
            }),
        "hex" => decode_hex(content.trim()).ok_or_else(|| {
            ApiError::invalid(format!("{field}.content"), "content is not valid hex")
        }),
        other => Err(ApiError::invalid(
            format!("{field}.encoding"),
            format!("unknown encoding {other:?} (utf8, base64 or hex)"),
        )),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks limits and builds the job.
pub fn build_job(d: Draft, limits: &Limits) -> Result<Job, ApiError> {
    if d.files.is_empty() {
        return Err(ApiError::invalid(
            "code",
            "either code or at least one file is required",
        ));
    }
    if d.files.len() > limits.max_files {
        return Err(ApiError::invalid(
            "files",
            format!(
                "too many files: {} (at most {})",
                d.files.len(),
                limits.max_files
            ),
        ));
    }
    let total: usize = d.files.iter().map(|f| f.bytes.len()).sum();
    if total > limits.max_code_bytes {
        return Err(ApiError::too_large(
            Some(if d.files.len() == 1 {
                "code".into()
            } else {
                "files".into()
            }),
            format!(
                "the code is {total} bytes; the limit is {}",
                limits.max_code_bytes
            ),
        ));
    }
    if d.stdin.len() > limits.max_stdin_bytes {
        return Err(ApiError::too_large(
            Some("stdin".into()),
            format!(
                "stdin is {} bytes; the limit is {}",
                d.stdin.len(),
                limits.max_stdin_bytes
            ),
        ));
    }
    if d.args.len() > limits.max_args {
        return Err(ApiError::invalid(
            "args",
            format!(
                "too many arguments: {} (at most {})",
                d.args.len(),
                limits.max_args
            ),
        ));
    }
    if let Some(i) = d.args.iter().position(|a| a.contains('\0')) {
        return Err(ApiError::invalid(
            format!("args[{i}]"),
            "arguments must not contain NUL bytes",
        ));
    }
    let timeout = |field: &str, v: Option<u64>, default: u64, max: u64| match v {
        None => Ok(default),
        Some(t) if (1..=max).contains(&t) => Ok(t),
        Some(t) => Err(ApiError::invalid(
            field,
            format!("{t} is out of range: 1 to {max} ms"),
        )),
    };
    // A language's own defaults (a JVM compile needs more than gcc) stay within the maxima.
    let run_timeout_ms = timeout(
        "timeout_ms",
        d.timeout_ms,
        d.language
            .timeout_ms
            .unwrap_or(limits.default_timeout_ms)
            .min(limits.max_timeout_ms),
        limits.max_timeout_ms,
    )?;
    let compile_timeout_ms = timeout(
        "compile_timeout_ms",
        d.compile_timeout_ms,
        d.language
            .compile_timeout_ms
            .unwrap_or(limits.default_compile_timeout_ms)
            .min(limits.max_compile_timeout_ms),
        limits.max_compile_timeout_ms,
    )?;
    if let Some(c) = d.cpu_limit_ms {
        if !(1..=limits.max_timeout_ms).contains(&c) {
            return Err(ApiError::invalid(
                "cpu_limit_ms",
                format!("{c} is out of range: 1 to {} ms", limits.max_timeout_ms),
            ));
        }
    }
    check_tests(&d, limits)?;
    if let Some(m) = d.memory_mib {
        if !(16..=limits.max_memory_mib).contains(&m) {
            return Err(ApiError::invalid(
                "memory_mib",
                format!("{m} is out of range: 16 to {} MiB", limits.max_memory_mib),
            ));
        }
    }
    let mut files = Vec::with_capacity(d.files.len());
    let mut seen = std::collections::HashSet::new();
    for (i, f) in d.files.into_iter().enumerate() {
        let name = match f.name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None if i == 0 => d.language.file.clone(),
            None => format!("file{i}.code"),
        };
        if let Err(e) = cloude_protocol::validate_file_name(&name) {
            return Err(ApiError::invalid(
                format!("{}.name", f.field),
                e.to_string(),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(ApiError::invalid(
                format!("{}.name", f.field),
                format!("duplicate file name {name:?}"),
            ));
        }
        let (content, encoding) = match String::from_utf8(f.bytes) {
            Ok(s) => (s, Encoding::Utf8),
            Err(e) => (
                base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                Encoding::Base64,
            ),
        };
        files.push(FileSpec {
            name,
            content,
            encoding,
        });
    }
    Ok(Job {
        language: d.language,
        files,
        stdin: d.stdin.into_bytes(),
        args: d.args,
        run_timeout_ms,
        compile_timeout_ms,
        memory_mib: d.memory_mib,
        network: d.network,
        pids_limit: None,
        cpu_limit_ms: d.cpu_limit_ms,
        stack_limit_kib: None,
        file_size_limit_kib: None,
        merge_stderr: false,
        tests: d.tests,
        tty: None,
    })
}

/// Test cases: at most [`cloude_protocol::MAX_TEST_CASES`], their stdin together within the
/// stdin limit and their expected outputs too, and no top-level stdin beside them.
fn check_tests(d: &Draft, limits: &Limits) -> Result<(), ApiError> {
    if d.tests.is_empty() {
        return Ok(());
    }
    if d.tests.len() > cloude_protocol::MAX_TEST_CASES {
        return Err(ApiError::invalid(
            "tests",
            format!(
                "too many test cases: {} (at most {})",
                d.tests.len(),
                cloude_protocol::MAX_TEST_CASES
            ),
        ));
    }
    if !d.stdin.is_empty() {
        return Err(ApiError::invalid(
            "stdin",
            "with test cases, give each case its own stdin (tests[i].stdin)",
        ));
    }
    let stdin: usize = d.tests.iter().map(|t| t.stdin.len()).sum();
    let expected: usize = d
        .tests
        .iter()
        .map(|t| t.expected_output.as_ref().map_or(0, Vec::len))
        .sum();
    for (what, n) in [("stdin", stdin), ("expected_output", expected)] {
        if n > limits.max_stdin_bytes {
            return Err(ApiError::too_large(
                Some("tests".into()),
                format!(
                    "the test cases' {what} is {n} bytes together; the limit is {}",
                    limits.max_stdin_bytes
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64() {
        assert_eq!(
            decode_content("f", "6869", Some("hex")).expect("hex"),
            b"hi"
        );
        assert_eq!(
            decode_content("f", "aGk=", Some("base64")).expect("b64"),
            b"hi"
        );
        assert!(decode_content("f", "zz", Some("hex")).is_err());
        let e = decode_content("files[1]", "x", Some("rot13")).expect_err("enc");
        assert_eq!(e.field.as_deref(), Some("files[1].encoding"));
    }
}
