//! `cloude sandbox`: sandboxes (VMs that live across calls) from the shell, over
//! `/v1/sandboxes`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use cloude_api::client::Client;
use cloude_api::sandbox::{ExecIn, ExecOut, SandboxCreate, SandboxInfo, SandboxList};
use cloude_api::StageStatus;

use crate::run::{EXIT_CLIENT_ERROR, EXIT_TIMEOUT};

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox and print its id.
    Create {
        /// A language's image, or `base` (the default).
        #[arg(short, long)]
        template: Option<String>,
        /// Idle seconds before it is deleted.
        #[arg(long)]
        timeout_s: Option<u64>,
    },
    /// List the sandboxes.
    Ls,
    /// Run a command in a sandbox: `-c 'shell line'` (bash -lc) or `-- ARGV...`. Its output and
    /// exit code become ours.
    Exec {
        id: String,
        #[arg(short, long)]
        cmd: Option<String>,
        /// As root in the guest instead of `user`.
        #[arg(long)]
        root: bool,
        #[arg(short, long)]
        timeout_ms: Option<u64>,
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Copy a local file into a sandbox (parents made).
    Put {
        id: String,
        local: PathBuf,
        path: String,
    },
    /// Write a sandbox's file (or a directory's listing) to our standard output.
    Get { id: String, path: String },
    /// Delete a sandbox.
    Rm { id: String },
    /// Pause a sandbox: its VM frozen (no CPU, processes and files kept, memory held) until
    /// `resume`.
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume { id: String },
    /// A terminal in a sandbox: `bash -il` (or `-- ARGV...`) on a guest terminal of our size,
    /// our terminal raw until it ends; its exit code becomes ours.
    Shell {
        id: String,
        /// As root in the guest instead of `user`.
        #[arg(long)]
        root: bool,
        #[arg(last = true)]
        argv: Vec<String>,
    },
}

pub fn run(client: &Client, cmd: SandboxCmd, raw_json: bool) -> anyhow::Result<u8> {
    match cmd {
        SandboxCmd::Create {
            template,
            timeout_s,
        } => {
            let req = SandboxCreate {
                template,
                timeout_s,
                env: None,
                metadata: None,
            };
            let info: SandboxInfo = client.post("/v1/sandboxes", &req)?;
            if raw_json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("{}", info.id);
            }
            Ok(0)
        }
        SandboxCmd::Ls => {
            let list: SandboxList = client.get("/v1/sandboxes")?;
            if raw_json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for s in list.sandboxes {
                    println!(
                        "{}\t{}\t{}\texpires {}",
                        s.id, s.template, s.state, s.expires_at
                    );
                }
            }
            Ok(0)
        }
        SandboxCmd::Exec {
            id,
            cmd,
            root,
            timeout_ms,
            argv,
        } => {
            let req = ExecIn {
                cmd: cmd.clone(),
                argv: (cmd.is_none()).then_some(argv),
                timeout_ms,
                user: root.then(|| "root".to_string()),
                ..Default::default()
            };
            let out: ExecOut = client.post(
                &format!("/v1/sandboxes/{}/exec", cloude_api::query_escape(&id)),
                &req,
            )?;
            if raw_json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                let _ = std::io::stdout().write_all(out.stdout.as_bytes());
                let _ = std::io::stderr().write_all(out.stderr.as_bytes());
            }
            Ok(exit_code(&out))
        }
        SandboxCmd::Put { id, local, path } => {
            let data = std::fs::read(&local)
                .with_context(|| format!("cannot read {}", local.display()))?;
            let r = client.raw("PUT", &file_url(&id, &path), Some(&data))?;
            answered(r.status, &r.body)?;
            Ok(0)
        }
        SandboxCmd::Get { id, path } => {
            let r = client.raw("GET", &file_url(&id, &path), None)?;
            answered(r.status, &r.body)?;
            std::io::stdout().write_all(&r.body)?;
            Ok(0)
        }
        SandboxCmd::Shell { id, root, argv } => {
            crate::interactive::shell(client.base(), &id, argv, root)
        }
        SandboxCmd::Pause { id } => state_change(client, &id, "pause"),
        SandboxCmd::Resume { id } => state_change(client, &id, "resume"),
        SandboxCmd::Rm { id } => {
            let r = client.raw(
                "DELETE",
                &format!("/v1/sandboxes/{}", cloude_api::query_escape(&id)),
                None,
            )?;
            answered(r.status, &r.body)?;
            Ok(0)
        }
    }
}

/// `POST /v1/sandboxes/{id}/pause` or `…/resume`; prints the state it is in now.
fn state_change(client: &Client, id: &str, what: &str) -> anyhow::Result<u8> {
    let r = client.raw(
        "POST",
        &format!("/v1/sandboxes/{}/{what}", cloude_api::query_escape(id)),
        Some(b"{}"),
    )?;
    answered(r.status, &r.body)?;
    let info: serde_json::Value = serde_json::from_slice(&r.body)?;
    println!("{} {}", id, info["state"].as_str().unwrap_or("?"));
    Ok(0)
}

/// `/v1/sandboxes/{id}/files?path=`.
fn file_url(id: &str, path: &str) -> String {
    format!(
        "/v1/sandboxes/{}/files?path={}",
        cloude_api::query_escape(id),
        cloude_api::query_escape(path)
    )
}

/// A non-2xx answer as an error carrying the server's sentence.
fn answered(status: u16, body: &[u8]) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let msg = v
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    anyhow::bail!("the server answered {status}: {msg}")
}

/// The command's exit code as ours: its code, 128+N for signal N, 124 on timeout.
fn exit_code(o: &ExecOut) -> u8 {
    if o.status == StageStatus::Timeout {
        return EXIT_TIMEOUT;
    }
    match (
        o.exit_code,
        o.signal.as_deref().and_then(cloude_api::signal_number),
    ) {
        (Some(c), _) => u8::try_from(c.clamp(0, 255)).unwrap_or(EXIT_CLIENT_ERROR),
        (None, Some(n)) => u8::try_from(128 + n).unwrap_or(EXIT_CLIENT_ERROR),
        _ => EXIT_CLIENT_ERROR,
    }
}
