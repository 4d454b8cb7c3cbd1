//! `cloude run` and `cloude languages`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::client::{Client, ClientError};

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
    let v = client.get("/v1/languages")?;
    let found = v["languages"].as_array().and_then(|ls| {
        ls.iter().find(|l| {
            l["extensions"].as_array().is_some_and(|es| {
                es.iter()
                    .any(|e| e.as_str().is_some_and(|e| e.eq_ignore_ascii_case(ext)))
            })
        })
    });
    found
        .and_then(|l| l["name"].as_str())
        .map(str::to_string)
        .with_context(|| {
            format!("no language on the server uses the extension .{ext}; pass -l LANGUAGE")
        })
}

pub fn run(client: &Client, args: RunArgs, raw_json: bool) -> anyhow::Result<u8> {
    let language = language_for(&args, client)?;
    let mut body = json!({ "language": language, "args": args.args });
    match (&args.code, &args.file) {
        (Some(code), _) => body["code"] = json!(code),
        (None, Some(file)) => {
            let code =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("main");
            match String::from_utf8(code) {
                Ok(text) => body["code"] = json!(text),
                Err(_) => anyhow::bail!("{name} is not UTF-8 text"),
            }
        }
        (None, None) => anyhow::bail!("give a FILE to run, or -c CODE with -l LANGUAGE"),
    }
    if let Some(v) = &args.version {
        body["version"] = json!(v);
    }
    if let Some(t) = args.timeout_ms {
        body["timeout_ms"] = json!(t);
    }
    if let Some(m) = args.memory_mib {
        body["memory_mib"] = json!(m);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut input = String::new();
        stdin
            .lock()
            .read_to_string(&mut input)
            .context("cannot read standard input")?;
        body["stdin"] = json!(input);
    }
    let resp = match client.post("/v1/executions", &body) {
        Ok(v) => v,
        Err(ClientError::Api { body, .. }) if raw_json => {
            println!("{body}");
            return Ok(EXIT_CLIENT_ERROR);
        }
        Err(e) => return Err(e.into()),
    };
    if raw_json {
        println!("{resp}");
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&output(&resp, "stdout"));
        let _ = out.flush();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&output(&resp, "stderr"));
    }
    Ok(exit_code(&resp))
}

/// The exact bytes of `stdout`/`stderr` (`*_base64` when the output is not UTF-8).
fn output(resp: &Value, key: &str) -> Vec<u8> {
    use base64::Engine as _;
    resp[format!("{key}_base64")]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| resp[key].as_str().unwrap_or_default().as_bytes().to_vec())
}

/// The CLI's exit code for a response.
pub fn exit_code(resp: &Value) -> u8 {
    match resp["status"].as_str().unwrap_or("internal_error") {
        "timeout" => EXIT_TIMEOUT,
        "compile_error" => resp["exit_code"]
            .as_i64()
            .and_then(|c| u8::try_from(c).ok())
            .filter(|c| *c != 0)
            .unwrap_or(EXIT_COMPILE_ERROR),
        "internal_error" => {
            let msg = resp["message"].as_str().unwrap_or("no details");
            eprintln!("cloude: the server could not run the program: {msg}");
            EXIT_CLIENT_ERROR
        }
        _ => {
            if let Some(sig) = resp["signal"].as_str() {
                let n = signal_number(sig);
                return 128u8.saturating_add(n);
            }
            resp["exit_code"]
                .as_i64()
                .map(|c| (c & 0xff) as u8)
                .unwrap_or(EXIT_CLIENT_ERROR)
        }
    }
}

fn signal_number(name: &str) -> u8 {
    match name {
        "SIGHUP" => 1,
        "SIGINT" => 2,
        "SIGQUIT" => 3,
        "SIGILL" => 4,
        "SIGABRT" => 6,
        "SIGFPE" => 8,
        "SIGKILL" => 9,
        "SIGSEGV" => 11,
        "SIGPIPE" => 13,
        "SIGALRM" => 14,
        "SIGTERM" => 15,
        other => other.parse().unwrap_or(0),
    }
}

pub fn languages(client: &Client, raw_json: bool) -> anyhow::Result<u8> {
    let v = client.get("/v1/languages")?;
    if raw_json {
        println!("{v}");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    for l in v["languages"].as_array().into_iter().flatten() {
        let list = |k: &str| {
            l[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "{:<12} {:<10} aliases: {:<24} extensions: {}",
            l["name"].as_str().unwrap_or("?"),
            l["version"].as_str().unwrap_or("?"),
            list("aliases"),
            list("extensions"),
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_output_is_exact() {
        let v = json!({"stdout": "\u{fffd}", "stdout_base64": "/w==", "stderr": "x"});
        assert_eq!(output(&v, "stdout"), vec![0xff]);
        assert_eq!(output(&v, "stderr"), b"x");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(&json!({"status": "ok", "exit_code": 3})), 3);
        assert_eq!(exit_code(&json!({"status": "ok", "exit_code": 0})), 0);
        assert_eq!(
            exit_code(&json!({"status": "timeout", "exit_code": null, "signal": "SIGKILL"})),
            124
        );
        assert_eq!(
            exit_code(&json!({"status": "ok", "exit_code": null, "signal": "SIGSEGV"})),
            139
        );
        assert_eq!(
            exit_code(&json!({"status": "compile_error", "exit_code": 1})),
            1
        );
        assert_eq!(exit_code(&json!({"status": "internal_error"})), 125);
    }
}
