//! `cloude run` and `cloude languages`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use cloude_api::client::{Client, ClientError};
use cloude_api::{ExecutionRequest, ExecutionResponse, StageStatus, Status};

/// Exit code on a timeout, as `timeout(1)`.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit code when the server or the CLI failed (not the program).
pub const EXIT_CLIENT_ERROR: u8 = 125;
/// Exit code on a compile error.
pub const EXIT_COMPILE_ERROR: u8 = 1;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The file to run (omit with -c).
    file: Option<PathBuf>,
    /// Language name or alias (default: from the file's extension).
    #[arg(short, long)]
    language: Option<String>,
    /// Inline code instead of a file.
    #[arg(short, long, conflicts_with = "file")]
    code: Option<String>,
    /// Language version (default: the newest).
    #[arg(long)]
    version: Option<String>,
    /// Run timeout in milliseconds.
    #[arg(short, long)]
    timeout_ms: Option<u64>,
    /// Memory limit in MiB.
    #[arg(short, long)]
    memory_mib: Option<u64>,
    /// CPU-time limit in milliseconds (apart from the wall-clock timeout).
    #[arg(long)]
    cpu_limit_ms: Option<u64>,
    /// Connect this terminal (or pipe) to the program while it runs: input goes as it is
    /// typed, output comes as it is written (over the server's WebSocket).
    #[arg(short, long)]
    interactive: bool,
    /// Arguments passed to the program (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

fn language_for(args: &RunArgs, client: &Client) -> anyhow::Result<String> {
    if let Some(l) = &args.language {
        return Ok(l.clone());
    }
    let Some(file) = &args.file else {
        anyhow::bail!("-c needs -l LANGUAGE");
    };
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .with_context(|| format!("{} has no extension; pass -l LANGUAGE", file.display()))?;
    // The server's catalogue decides (it may differ from the default one).
    let langs = client.languages()?;
    langs
        .languages
        .iter()
        .find(|l| l.extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)))
        .map(|l| l.name.clone())
        .with_context(|| {
            format!("no language on the server uses the extension .{ext}; pass -l LANGUAGE")
        })
}

pub fn run(client: &Client, args: RunArgs, raw_json: bool) -> anyhow::Result<u8> {
    let language = language_for(&args, client)?;
    let mut req = ExecutionRequest {
        language,
        args: args.args.clone(),
        version: args.version.clone(),
        timeout_ms: args.timeout_ms,
        memory_mib: args.memory_mib,
        cpu_limit_ms: args.cpu_limit_ms,
        ..Default::default()
    };
    match (&args.code, &args.file) {
        (Some(code), _) => req.code = Some(code.clone()),
        (None, Some(file)) => {
            let code =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("main");
            match String::from_utf8(code) {
                Ok(text) => req.code = Some(text),
                Err(_) => anyhow::bail!("{name} is not UTF-8 text"),
            }
        }
        (None, None) => anyhow::bail!("give a FILE to run, or -c CODE with -l LANGUAGE"),
    }
    if args.interactive {
        let resp = crate::interactive::run(client.base(), &req)?;
        if raw_json {
            println!("{}", serde_json::to_string(&resp)?);
        } else if let Some(line) = status_line(&resp) {
            eprintln!("cloude: {line}");
        }
        return Ok(exit_code(&resp));
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut input = String::new();
        stdin
            .lock()
            .read_to_string(&mut input)
            .context("cannot read standard input")?;
        req.stdin = Some(input);
    }
    let resp = match client.execute(&req) {
        Ok(v) => v,
        Err(ClientError::Api { body, .. }) if raw_json => {
            println!("{body}");
            return Ok(EXIT_CLIENT_ERROR);
        }
        Err(e) => return Err(e.into()),
    };
    if raw_json {
        println!("{}", serde_json::to_string(&resp)?);
        return Ok(exit_code(&resp));
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&output(resp.stdout_base64.as_deref(), &resp.stdout));
    let _ = out.flush();
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(&output(resp.stderr_base64.as_deref(), &resp.stderr));
    // After the program's own output: why it stopped, when the program did not decide.
    if let Some(line) = status_line(&resp) {
        let _ = writeln!(err, "cloude: {line}");
    }
    Ok(exit_code(&resp))
}

/// The exact bytes of an output (`*_base64` when the output is not UTF-8).
fn output(base64: Option<&str>, text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// `10 s`, `1.5 s`, `250 ms`.
fn duration(ms: u64) -> String {
    match ms {
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms if ms >= 1000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms => format!("{ms} ms"),
    }
}

/// `1 MiB`, `64 KiB`, `100 bytes`.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// The one stderr line for a status the program did not choose, naming the limit.
pub fn status_line(resp: &ExecutionResponse) -> Option<String> {
    let l = &resp.limits;
    match resp.status {
        Status::Ok | Status::CompileError => None,
        Status::Timeout => Some(
            if resp
                .compile
                .as_ref()
                .is_some_and(|c| c.status == StageStatus::Timeout)
            {
                format!(
                    "compilation timed out after {}",
                    duration(l.compile_timeout_ms)
                )
            } else {
                format!("timed out after {}", duration(l.timeout_ms))
            },
        ),
        Status::OutputLimit => Some(format!(
            "output limit reached ({}); the rest was dropped",
            size(l.output_limit_bytes)
        )),
        Status::MemoryLimit => Some(format!("memory limit reached ({} MiB)", l.memory_mib)),
        Status::CpuLimit => Some(format!(
            "CPU time limit reached ({})",
            duration(l.cpu_limit_ms.unwrap_or(0))
        )),
        Status::InternalError => Some(format!(
            "internal error: the server could not run the program: {}",
            resp.message.as_deref().unwrap_or("no details")
        )),
    }
}

/// The CLI's exit code for a response.
pub fn exit_code(resp: &ExecutionResponse) -> u8 {
    match resp.status {
        Status::Timeout | Status::CpuLimit => EXIT_TIMEOUT,
        Status::CompileError => resp
            .exit_code
            .and_then(|c| u8::try_from(c).ok())
            .filter(|c| *c != 0)
            .unwrap_or(EXIT_COMPILE_ERROR),
        Status::InternalError => EXIT_CLIENT_ERROR,
        Status::Ok | Status::OutputLimit | Status::MemoryLimit => {
            let signal = resp
                .signal_number
                .or_else(|| resp.signal.as_deref().and_then(cloude_api::signal_number));
            if let Some(n) = signal {
                return 128u8.saturating_add(u8::try_from(n).unwrap_or(u8::MAX));
            }
            resp.exit_code
                .map(|c| (c & 0xff) as u8)
                .unwrap_or(EXIT_CLIENT_ERROR)
        }
    }
}

pub fn languages(client: &Client, raw_json: bool) -> anyhow::Result<u8> {
    let v = client.languages()?;
    if raw_json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    for l in &v.languages {
        let _ = writeln!(
            out,
            "{:<12} {:<10} aliases: {:<24} extensions: {}",
            l.name,
            l.version,
            l.aliases.join(", "),
            l.extensions.join(", "),
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(v: serde_json::Value) -> ExecutionResponse {
        let mut base = serde_json::json!({
            "request_id": "r", "language": "python", "version": "3", "stdout": "", "stderr": "",
            "exit_code": null, "signal": null, "status": "ok",
            "timings": {"queue_ms": 0, "boot_ms": 0, "run_ms": 0, "total_ms": 0},
            "limits": {"timeout_ms": 10000, "compile_timeout_ms": 30000, "memory_mib": 256,
                       "output_limit_bytes": 1048576}
        });
        for (k, x) in v.as_object().expect("object") {
            base[k] = x.clone();
        }
        serde_json::from_value(base).expect("response")
    }

    #[test]
    fn binary_output_is_exact() {
        assert_eq!(output(Some("/w=="), "\u{fffd}"), vec![0xff]);
        assert_eq!(output(None, "x"), b"x");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(&resp(serde_json::json!({"exit_code": 3}))), 3);
        assert_eq!(exit_code(&resp(serde_json::json!({"exit_code": 0}))), 0);
        assert_eq!(
            exit_code(&resp(
                serde_json::json!({"status": "timeout", "signal": "SIGKILL"})
            )),
            124
        );
        // Every signal N gives 128 + N, by number or by name.
        for (name, n) in [
            ("SIGSEGV", 11),
            ("SIGUSR1", 10),
            ("SIGBUS", 7),
            ("SIGXFSZ", 25),
        ] {
            assert_eq!(
                exit_code(&resp(serde_json::json!({"signal": name}))),
                128 + n
            );
            assert_eq!(
                exit_code(&resp(
                    serde_json::json!({"signal": name, "signal_number": n})
                )),
                128 + n
            );
        }
        assert_eq!(
            exit_code(&resp(
                serde_json::json!({"status": "compile_error", "exit_code": 1})
            )),
            1
        );
        assert_eq!(
            exit_code(&resp(serde_json::json!({"status": "internal_error"}))),
            125
        );
    }

    #[test]
    fn status_lines_name_the_limit() {
        let line = |v| status_line(&resp(v));
        assert_eq!(line(serde_json::json!({})), None);
        assert_eq!(
            line(serde_json::json!({"status": "timeout"})).as_deref(),
            Some("timed out after 10 s")
        );
        assert_eq!(
            line(serde_json::json!({"status": "output_limit"})).as_deref(),
            Some("output limit reached (1 MiB); the rest was dropped")
        );
        assert_eq!(
            line(serde_json::json!({"status": "memory_limit"})).as_deref(),
            Some("memory limit reached (256 MiB)")
        );
        assert!(
            line(serde_json::json!({"status": "internal_error", "message": "boom"}))
                .is_some_and(|l| l.contains("boom"))
        );
        assert_eq!(duration(1500), "1.5 s");
        assert_eq!(duration(250), "250 ms");
    }
}
