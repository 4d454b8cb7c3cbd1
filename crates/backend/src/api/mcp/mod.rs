//! The MCP face: `/mcp` (Streamable HTTP, through the official Rust SDK `rmcp`), the tools an
//! AI agent uses to run code in fresh VMs and in sandboxes. `cloude mcp` (the CLI) carries the
//! same messages over stdio to this route.
//!
//! Each tool is a thin wrapper over the operation the HTTP faces use (`v1::run_once`,
//! `sandboxes::create_sandbox`, `sandboxes::exec_in`, the `Sandboxes` file calls), so limits,
//! validation and error sentences are the same. A program that fails to compile or exits
//! non-zero is a normal result; a refusal (unknown language, bad argument, unknown sandbox, a
//! full queue) is a tool error (`isError`) whose text is the API's sentence. The route is
//! stateless (no MCP session is kept: sandboxes are named by id), answers JSON, accepts bodies up
//! to the API's body limit and, by `rmcp`'s default, only loopback `Host` headers
//! (`[mcp] allowed_hosts` adds others).

use std::sync::Arc;

use cloude_api::sandbox::{ExecIn, SandboxCreate};
use cloude_api::ExecutionRequest;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool, tool_handler, tool_router, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;

use super::conn::ConnWatch;
use super::error::ApiError;
use super::AppState;
use crate::agent::FileAnswer;

/// `/mcp`: the SDK's service. rmcp runs each tool call in a task of its own, so a client that
/// goes away is noticed inside the tools (`until_gone`), which drop their work (and its VM).
pub async fn handle(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use tower::ServiceExt as _;
    // Stateless: a service per request costs a few allocations and holds nothing between them.
    match service(state).oneshot(req).await {
        Ok(resp) => resp.into_response(),
        Err(e) => match e {},
    }
}

/// Runs `work` unless the HTTP client of this call goes away first (its connection's
/// [`ConnWatch`], which the SDK hands over with the request's parts); then `work` is dropped,
/// which kills its VM.
async fn until_gone(
    ctx: &RequestContext<RoleServer>,
    work: impl std::future::Future<Output = CallToolResult>,
) -> CallToolResult {
    let conn = ctx
        .extensions
        .get::<axum::http::request::Parts>()
        .and_then(|p| p.extensions.get::<ConnWatch>().cloned())
        .unwrap_or_else(ConnWatch::none);
    tokio::select! {
        r = work => r,
        () = conn.closed() => {
            tracing::info!("MCP client disconnected; its call (and VM, if any) was dropped");
            refused(ApiError::client_gone())
        }
    }
}

/// The `/mcp` service.
pub fn service(state: Arc<AppState>) -> StreamableHttpService<Cloude, LocalSessionManager> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    hosts.extend(state.config.mcp.allowed_hosts.iter().cloned());
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_json_response(true)
        .with_max_request_body_bytes(state.body_limit())
        .with_sse_keep_alive(None)
        // No session per client: nothing to hoard, and any request may come on any connection.
        .with_legacy_session_mode(false);
    StreamableHttpService::new(
        move || Ok(Cloude::new(state.clone())),
        Default::default(),
        config,
    )
}

/// The tools' server (one per request: it holds only the server's state).
#[derive(Clone)]
pub struct Cloude {
    state: Arc<AppState>,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCode {
    /// Language name or alias, as `list_languages` shows (python, c, cpp, javascript, rust, go, java, bash, ...).
    pub language: String,
    /// The program's source code (the whole file).
    pub code: String,
    /// Standard input for the program.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Command-line arguments for the program.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Wall-clock limit for the run in milliseconds (the server's default when absent).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateSandbox {
    /// A language's image (`list_languages`) or `base` (bash, python3 and a Debian userland; the default).
    #[serde(default)]
    pub template: Option<String>,
    /// Seconds without a call after which the sandbox is deleted (the server's default when absent).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCommand {
    /// The id `create_sandbox` returned.
    pub sandbox_id: String,
    /// A shell command line, run by `/bin/bash -lc` in `/home/user` as the user `user`.
    pub command: String,
    /// Wall-clock limit in milliseconds (the server's default when absent).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteFile {
    /// The id `create_sandbox` returned.
    pub sandbox_id: String,
    /// Absolute path, or relative to `/home/user`. Parent directories are made.
    pub path: String,
    /// The file's new content (text).
    pub content: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FilePath {
    /// The id `create_sandbox` returned.
    pub sandbox_id: String,
    /// Absolute path, or relative to `/home/user`.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxId {
    /// The id `create_sandbox` returned.
    pub sandbox_id: String,
}

/// A tool error: the API's sentence, for the model to read (never a protocol error).
fn refused(e: ApiError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(format!(
        "{}: {}",
        e.code, e.message
    ))])
}

/// A normal result: text for the model and the same as structured content.
fn answer(text: String, structured: serde_json::Value) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(structured);
    r
}

impl RunCode {
    /// The execution `run_code` asks for.
    fn request(self) -> ExecutionRequest {
        ExecutionRequest {
            language: self.language,
            code: Some(self.code),
            stdin: self.stdin,
            args: self.args.unwrap_or_default(),
            timeout_ms: self.timeout_ms,
            ..Default::default()
        }
    }
}

impl RunCommand {
    /// The sandbox command `run_command` asks for.
    fn request(&self) -> ExecIn {
        ExecIn {
            cmd: Some(self.command.clone()),
            argv: None,
            stdin: None,
            env: None,
            cwd: None,
            timeout_ms: self.timeout_ms,
            user: None,
        }
    }
}

/// Fuzzing (`fuzz/fuzz_targets/mcp_arguments.rs`): a client's `tools/call` parameters
/// (`{"name", "arguments"}`) decoded into the tool's arguments as rmcp does, then checked as the
/// tool checks them before it reaches a VM (the execution's validation against `catalog` and
/// `config`, sandbox ids, paths, a command's limits). Never panics; every refusal is a client
/// error with a sentence; a command that passes is one the agent accepts. Returns the job an
/// accepted `run_code` would run, for the caller's checks of the limits.
#[doc(hidden)]
pub fn fuzz_tool_call(
    data: &[u8],
    catalog: &cloude_image::catalog::Catalog,
    config: &crate::config::Config,
) -> Option<Result<crate::executor::Job, ApiError>> {
    let call: serde_json::Value = serde_json::from_slice(data).ok()?;
    let name = call.get("name")?.as_str()?;
    let args = call
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let refused_well = |r: Result<(), ApiError>| {
        if let Err(e) = r {
            assert!(e.status.is_client_error(), "{} for {e:?}", e.status);
            assert!(!e.message.is_empty(), "{e:?}");
        }
    };
    match name {
        "run_code" => {
            let p: RunCode = serde_json::from_value(args).ok()?;
            Some(super::v1::job_from_request(catalog, config, p.request()))
        }
        "run_command" => {
            let p: RunCommand = serde_json::from_value(args).ok()?;
            refused_well(super::sandboxes::checked_id(&p.sandbox_id).map(|_| ()));
            let r = super::sandboxes::exec_request_within(&config.limits, p.request());
            if let Ok(req) = &r {
                assert!(req.validate().is_ok(), "the agent refuses {req:?}");
                assert!(req.timeout_ms <= config.limits.max_timeout_ms);
            }
            refused_well(r.map(|_| ()));
            None
        }
        "write_file" => {
            let p: WriteFile = serde_json::from_value(args).ok()?;
            refused_well(super::sandboxes::checked_id(&p.sandbox_id).map(|_| ()));
            refused_well(sandbox_path(&p.path).map(|_| ()));
            None
        }
        "read_file" | "list_files" => {
            let p: FilePath = serde_json::from_value(args).ok()?;
            refused_well(super::sandboxes::checked_id(&p.sandbox_id).map(|_| ()));
            refused_well(sandbox_path(&p.path).map(|_| ()));
            None
        }
        "close_sandbox" => {
            let p: SandboxId = serde_json::from_value(args).ok()?;
            refused_well(super::sandboxes::checked_id(&p.sandbox_id).map(|_| ()));
            None
        }
        _ => None,
    }
}

/// A sandbox path as the agent takes it (absolute; relative ones are under the home).
fn sandbox_path(path: &str) -> Result<String, ApiError> {
    let p = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", cloude_protocol::sandbox::SANDBOX_HOME)
    };
    cloude_protocol::sandbox::validate_sandbox_path(&p)
        .map_err(|e| ApiError::invalid("path", e.to_string()))?;
    Ok(p)
}

/// How a run or a command ended, in words.
fn ending(status: &str, exit_code: Option<i32>, signal: Option<&str>) -> String {
    match (status, exit_code, signal) {
        ("ok", Some(c), _) => format!("exit code {c}"),
        ("ok", None, Some(s)) => format!("killed by {s}"),
        (s, _, _) => s.replace('_', " "),
    }
}

#[tool_router(router = tool_router)]
impl Cloude {
    pub fn new(state: Arc<AppState>) -> Self {
        Cloude {
            state,
            tool_router: Self::tool_router(),
        }
    }

    /// Runs a program in a fresh, isolated micro-VM and returns its output.
    #[tool(
        name = "run_code",
        description = "Run a program in a fresh, isolated micro-VM (no network) and return its stdout, stderr and exit code. Compiled languages are compiled first; a compile error or a non-zero exit is a normal result, reported with the compiler's or program's output. Each call starts from a clean machine: nothing persists between calls (use a sandbox for that)."
    )]
    async fn run_code(
        &self,
        Parameters(p): Parameters<RunCode>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        until_gone(&ctx, self.run_code_now(p)).await
    }

    /// Runs the tool.
    async fn run_code_now(&self, p: RunCode) -> CallToolResult {
        let req = p.request();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rid = format!("mcp-{}-{n}", std::process::id());
        match super::v1::run_once(&self.state, req, &rid, "mcp").await {
            Err(e) => refused(e),
            Ok(r) => {
                let mut text = format!(
                    "status: {} ({})\n",
                    r.status.as_str(),
                    ending(r.status.as_str(), r.exit_code, r.signal.as_deref())
                );
                if let Some(c) = &r.compile {
                    if c.exit_code != Some(0) || !c.stderr.is_empty() {
                        text.push_str(&format!("compiler output:\n{}{}\n", c.stdout, c.stderr));
                    }
                }
                text.push_str(&format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr));
                if let Some(m) = &r.message {
                    text.push_str(&format!("\nnote: {m}"));
                }
                answer(text, serde_json::to_value(&r).unwrap_or_default())
            }
        }
    }

    /// The languages (and their versions) `run_code` and sandboxes accept.
    #[tool(
        name = "list_languages",
        description = "List the programming languages run_code accepts, with their versions and aliases."
    )]
    async fn list_languages(&self) -> CallToolResult {
        let langs: Vec<serde_json::Value> = self
            .state
            .catalog
            .languages
            .iter()
            .map(
                |l| serde_json::json!({"name": l.name, "version": l.version, "aliases": l.aliases}),
            )
            .collect();
        let text = self
            .state
            .catalog
            .languages
            .iter()
            .map(|l| format!("{} {}", l.name, l.version))
            .collect::<Vec<_>>()
            .join("\n");
        answer(text, serde_json::json!({ "languages": langs }))
    }

    #[tool(
        name = "create_sandbox",
        description = "Create a sandbox: a micro-VM that keeps its files and background processes across calls until close_sandbox or its idle timeout. Returns its sandbox_id for run_command, write_file, read_file, list_files and close_sandbox."
    )]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<CreateSandbox>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        until_gone(&ctx, self.create_sandbox_now(p)).await
    }

    async fn create_sandbox_now(&self, p: CreateSandbox) -> CallToolResult {
        let req = SandboxCreate {
            template: p.template,
            timeout_s: p.timeout_s,
            env: None,
            metadata: None,
        };
        match super::sandboxes::create_sandbox(&self.state, req, true, None).await {
            Err(e) => refused(e),
            Ok(info) => answer(
                format!("sandbox_id: {}", info.id),
                serde_json::json!({"sandbox_id": info.id, "template": info.template, "expires_at": info.expires_at}),
            ),
        }
    }

    #[tool(
        name = "run_command",
        description = "Run a shell command in a sandbox (bash -lc, in /home/user, as the user 'user'; files and processes started in the background persist). Returns stdout, stderr and the exit code; a non-zero exit is a normal result."
    )]
    async fn run_command(
        &self,
        Parameters(p): Parameters<RunCommand>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        until_gone(&ctx, self.run_command_now(p)).await
    }

    async fn run_command_now(&self, p: RunCommand) -> CallToolResult {
        let req = p.request();
        match super::sandboxes::exec_killable(&self.state, &p.sandbox_id, req).await {
            Err(e) => refused(e),
            Ok(r) => {
                let status = serde_json::to_value(r.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let text = format!(
                    "status: {status} ({})\nstdout:\n{}\nstderr:\n{}",
                    ending(&status, r.exit_code, r.signal.as_deref()),
                    r.stdout,
                    r.stderr
                );
                answer(text, serde_json::to_value(&r).unwrap_or_default())
            }
        }
    }

    #[tool(
        name = "write_file",
        description = "Write a text file in a sandbox (parent directories are made; the file belongs to the user 'user')."
    )]
    async fn write_file(&self, Parameters(p): Parameters<WriteFile>) -> CallToolResult {
        let r = async {
            let sbx = super::sandboxes::sandboxes(&self.state)?;
            let id = super::sandboxes::checked_id(&p.sandbox_id)?;
            let path = sandbox_path(&p.path)?;
            let n = p.content.len();
            sbx.write(
                id,
                path.clone(),
                cloude_protocol::sandbox::SandboxUser::User,
                None,
                p.content.into_bytes(),
            )
            .await?;
            Ok::<_, ApiError>((path, n))
        }
        .await;
        match r {
            Err(e) => refused(e),
            Ok((path, n)) => answer(
                format!("wrote {n} bytes to {path}"),
                serde_json::json!({"path": path, "bytes": n}),
            ),
        }
    }

    #[tool(
        name = "read_file",
        description = "Read a file from a sandbox (text; a binary file comes back base64-encoded)."
    )]
    async fn read_file(&self, Parameters(p): Parameters<FilePath>) -> CallToolResult {
        match self.file(&p).await {
            Err(e) => refused(e),
            Ok(FileAnswer::File(data)) => match String::from_utf8(data) {
                Ok(text) => answer(text.clone(), serde_json::json!({"content": text})),
                Err(e) => {
                    use base64::Engine as _;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(e.as_bytes());
                    answer(
                        format!("(binary, base64) {b64}"),
                        serde_json::json!({"content_base64": b64}),
                    )
                }
            },
            Ok(FileAnswer::Listing(_)) => refused(ApiError::invalid(
                "path",
                format!("{} is a directory: use list_files", p.path),
            )),
        }
    }

    #[tool(
        name = "list_files",
        description = "List a directory of a sandbox (names, kinds and sizes)."
    )]
    async fn list_files(&self, Parameters(p): Parameters<FilePath>) -> CallToolResult {
        match self.file(&p).await {
            Err(e) => refused(e),
            Ok(FileAnswer::Listing(l)) => {
                let text = l
                    .entries
                    .iter()
                    .map(|e| serde_json::to_string(e).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n");
                answer(text, serde_json::to_value(&l).unwrap_or_default())
            }
            Ok(FileAnswer::File(_)) => refused(ApiError::invalid(
                "path",
                format!("{} is a file: use read_file", p.path),
            )),
        }
    }

    #[tool(
        name = "close_sandbox",
        description = "Delete a sandbox and its VM (its files and processes are gone)."
    )]
    async fn close_sandbox(&self, Parameters(p): Parameters<SandboxId>) -> CallToolResult {
        let r = async {
            let sbx = super::sandboxes::sandboxes(&self.state)?;
            sbx.delete(super::sandboxes::checked_id(&p.sandbox_id)?)
                .await?;
            Ok::<_, ApiError>(())
        }
        .await;
        match r {
            Err(e) => refused(e),
            Ok(()) => answer(
                format!("sandbox {} closed", p.sandbox_id),
                serde_json::json!({"closed": p.sandbox_id}),
            ),
        }
    }
}

impl Cloude {
    async fn file(&self, p: &FilePath) -> Result<FileAnswer, ApiError> {
        let sbx = super::sandboxes::sandboxes(&self.state)?;
        let id = super::sandboxes::checked_id(&p.sandbox_id)?;
        Ok(sbx.read(id, sandbox_path(&p.path)?).await?)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Cloude {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(rmcp::model::Implementation::new(
                "cloude",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Cloude runs untrusted code in fresh, isolated micro-VMs. Use run_code for a one-off program; use create_sandbox, run_command, write_file, read_file, list_files and close_sandbox for work that spans several steps.",
            )
    }
}
