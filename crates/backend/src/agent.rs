//! HTTP/1.1 client for the guest agent, over whatever byte stream the driver provides.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use cloude_protocol::interactive::Input;
use cloude_protocol::{RunRequest, RunResponse, StreamEvent, WakeRequest, WakeResponse};

use crate::vm::AgentIo;

/// What an answer may hold beside the programs' output (JSON keys, statuses, messages,
/// timings), bytes.
const ANSWER_SLACK_BYTES: usize = 64 * 1024;
/// Largest error body we read from the agent.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Largest process listing taken from an agent (64 processes, 64 arguments of 1 KiB each, in
/// JSON).
const MAX_PROC_LIST_BYTES: usize = 8 << 20;

/// Bounds on one answer, derived from the request's output limit (the agent is not trusted to
/// honour it: a hostile agent may send anything).
#[derive(Clone, Copy, Debug)]
struct AnswerLimits {
    /// Output bytes of one stage (stdout + stderr), as the request set them.
    output: usize,
    /// Output bytes of one test case, and how many cases the request has.
    test_output: usize,
    tests: usize,
    /// The whole `/v1/run` body: two stages and every test case of base64 output, plus slack.
    body: usize,
    /// One NDJSON line of a stream: a result with two stages, or one output chunk.
    line: usize,
    /// Decoded output across every streamed event: two stages at the limit.
    streamed: usize,
}

impl AnswerLimits {
    fn for_request(req: &RunRequest) -> Self {
        let output = usize::try_from(req.output_limit_bytes).unwrap_or(usize::MAX);
        let b64 = |n: usize| n.saturating_add(2) / 3 * 4;
        let test_output = usize::try_from(req.test_output_limit()).unwrap_or(usize::MAX);
        let tests = req.tests.len();
        let body = b64(output)
            .saturating_mul(2)
            .saturating_add(b64(test_output).saturating_mul(tests))
            .saturating_add(ANSWER_SLACK_BYTES.saturating_mul(tests + 1));
        AnswerLimits {
            output,
            test_output,
            tests,
            body,
            line: body,
            streamed: output.saturating_mul(2),
        }
    }

    /// Re-checks a decoded answer: no stage may carry more output than the request allows.
    fn check(&self, r: &RunResponse) -> Result<(), AgentError> {
        for st in [&r.compile, &r.run].into_iter().flatten() {
            let n = st.stdout.0.len() + st.stderr.0.len();
            if n > self.output {
                return Err(AgentError::Body(format!(
                    "a stage carries {n} bytes of output, over the limit of {}",
                    self.output
                )));
            }
        }
        if r.tests.len() > self.tests {
            return Err(AgentError::Body(format!(
                "{} test results for {} test cases",
                r.tests.len(),
                self.tests
            )));
        }
        for st in &r.tests {
            let n = st.stdout.0.len() + st.stderr.0.len();
            if n > self.test_output {
                return Err(AgentError::Body(format!(
                    "a test case carries {n} bytes of output, over the limit of {}",
                    self.test_output
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("HTTP to the agent failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the agent answered {0}: {1}")]
    Status(u16, String),
    #[error("reading the agent's answer failed: {0}")]
    Body(String),
    #[error("the agent's answer is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent reported an error: {0}")]
    Reported(String),
    #[error("the agent's stream ended without a result")]
    NoResult,
    #[error("the VM exited before the agent answered")]
    VmExited,
}

/// One HTTP/1.1 connection to an agent.
pub struct AgentClient {
    sender: SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl AgentClient {
    pub async fn handshake(io: Box<dyn AgentIo>) -> Result<Self, AgentError> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let conn = tokio::spawn(async move {
            // Interactive runs take the connection over (an HTTP upgrade).
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("agent connection ended: {e}");
            }
        });
        Ok(AgentClient { sender, conn })
    }

    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        self.send(hyper::Method::POST, path, "application/json", body)
            .await
    }

    async fn send(
        &mut self,
        method: hyper::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agent")
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AgentError::Body(format!("cannot build the request: {e}")))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        Ok(resp)
    }

    /// `POST /v1/snapshot/prepare`: the agent refuses runs until woken (a snapshot is next).
    pub async fn prepare_snapshot(&mut self) -> Result<(), AgentError> {
        let resp = self.post("/v1/snapshot/prepare", Vec::new()).await?;
        let _ = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        Ok(())
    }

    /// `POST /v1/wake`: makes a VM restored from a snapshot a new machine (fresh entropy from
    /// this host's kernel, its clock, the hostname).
    pub async fn wake(&mut self, hostname: &str) -> Result<WakeResponse, AgentError> {
        let mut entropy = vec![0u8; cloude_protocol::MIN_WAKE_ENTROPY_BYTES * 2];
        fill_random(&mut entropy).map_err(|e| AgentError::Body(format!("no entropy: {e}")))?;
        let req = WakeRequest {
            protocol_version: cloude_protocol::PROTOCOL_VERSION,
            entropy: cloude_protocol::Bytes(entropy),
            unix_time_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            hostname: hostname.to_string(),
        };
        let resp = self.post("/v1/wake", serde_json::to_vec(&req)?).await?;
        let body = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        let w: WakeResponse = serde_json::from_slice(&body)?;
        if !w.reseeded {
            return Err(AgentError::Reported(
                "the agent did not reseed its random number generator".into(),
            ));
        }
        Ok(w)
    }

    /// `POST /v1/exec`: one sandbox command. Its answer is bounded like a run's stage.
    pub async fn exec(
        &mut self,
        req: &cloude_protocol::sandbox::ExecRequest,
    ) -> Result<cloude_protocol::StageResult, AgentError> {
        let output = usize::try_from(req.output_limit_bytes).unwrap_or(usize::MAX);
        let max = (output.saturating_add(2) / 3 * 4)
            .saturating_mul(2)
            .saturating_add(ANSWER_SLACK_BYTES);
        let resp = self.post("/v1/exec", serde_json::to_vec(req)?).await?;
        let body = collect(resp.into_body(), max).await?;
        let r: cloude_protocol::StageResult = serde_json::from_slice(&body)?;
        let n = r.stdout.0.len() + r.stderr.0.len();
        if n > output {
            return Err(AgentError::Body(format!(
                "a command carries {n} bytes of output, over the limit of {output}"
            )));
        }
        Ok(r)
    }

    /// `POST /v1/files/op`: stat, make a directory, move.
    pub async fn file_op(
        &mut self,
        op: &cloude_protocol::sandbox::FileOp,
    ) -> Result<cloude_protocol::sandbox::FileOpAnswer, AgentError> {
        let resp = self.post("/v1/files/op", serde_json::to_vec(op)?).await?;
        let body = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// `POST /v1/procs`: starts a sandbox process; its id.
    pub async fn proc_start(
        &mut self,
        req: &cloude_protocol::sandbox::ProcStart,
    ) -> Result<u32, AgentError> {
        let resp = self.post("/v1/procs", serde_json::to_vec(req)?).await?;
        let body = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        let r: cloude_protocol::sandbox::ProcStarted = serde_json::from_slice(&body)?;
        Ok(r.id)
    }

    /// `POST /v1/procs/{id}/read`: output from `since` on (at most the agent's buffer).
    pub async fn proc_read(
        &mut self,
        id: u32,
        req: &cloude_protocol::sandbox::ProcRead,
    ) -> Result<cloude_protocol::sandbox::ProcOutput, AgentError> {
        let max = cloude_protocol::sandbox::PROC_BUFFER_BYTES / 3 * 4 * 2 + ANSWER_SLACK_BYTES;
        let resp = self
            .post(&format!("/v1/procs/{id}/read"), serde_json::to_vec(req)?)
            .await?;
        let body = collect(resp.into_body(), max).await?;
        let r: cloude_protocol::sandbox::ProcOutput = serde_json::from_slice(&body)?;
        let n: usize = r.chunks.iter().map(|c| c.data.0.len()).sum();
        if n > cloude_protocol::sandbox::PROC_BUFFER_BYTES || r.chunks.len() > n.max(1) {
            return Err(AgentError::Body(format!(
                "a process read carries {n} bytes in {} chunks, more than its buffer holds",
                r.chunks.len()
            )));
        }
        Ok(r)
    }

    /// `POST /v1/procs/{id}/input`.
    pub async fn proc_input(
        &mut self,
        id: u32,
        input: &cloude_protocol::interactive::Input,
    ) -> Result<(), AgentError> {
        let resp = self
            .post(&format!("/v1/procs/{id}/input"), serde_json::to_vec(input)?)
            .await?;
        let _ = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        Ok(())
    }

    /// `GET /v1/procs`.
    pub async fn proc_list(
        &mut self,
    ) -> Result<Vec<cloude_protocol::sandbox::ProcInfo>, AgentError> {
        let resp = self
            .send(
                hyper::Method::GET,
                "/v1/procs",
                "application/json",
                Vec::new(),
            )
            .await?;
        let body = collect(resp.into_body(), MAX_PROC_LIST_BYTES).await?;
        let v: Vec<cloude_protocol::sandbox::ProcInfo> = serde_json::from_slice(&body)?;
        if v.len() > cloude_protocol::sandbox::MAX_PROCS {
            return Err(AgentError::Body(format!("{} processes listed", v.len())));
        }
        Ok(v)
    }

    /// `DELETE /v1/procs/{id}`: kills it if it runs and forgets it.
    pub async fn proc_delete(&mut self, id: u32) -> Result<(), AgentError> {
        let resp = self
            .send(
                hyper::Method::DELETE,
                &format!("/v1/procs/{id}"),
                "application/json",
                Vec::new(),
            )
            .await?;
        let _ = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        Ok(())
    }

    /// `GET /v1/files?path=`: a file's bytes (at most `max`) or a directory's listing.
    pub async fn file_get(&mut self, path: &str, max: u64) -> Result<FileAnswer, AgentError> {
        let uri = format!(
            "/v1/files?path={}&max={max}",
            cloude_api::query_escape(path)
        );
        let resp = self
            .send(
                hyper::Method::GET,
                &uri,
                "application/octet-stream",
                Vec::new(),
            )
            .await?;
        let json = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if json {
            let body = collect(resp.into_body(), MAX_LISTING_BODY_BYTES).await?;
            return Ok(FileAnswer::Listing(serde_json::from_slice(&body)?));
        }
        // The agent refuses a file over `max` itself; one that sends more anyway is cut.
        let cap = usize::try_from(max).unwrap_or(usize::MAX);
        let body = collect(resp.into_body(), cap).await?;
        Ok(FileAnswer::File(body.to_vec()))
    }

    /// `PUT /v1/files?path=&user=&mode=`.
    pub async fn file_put(
        &mut self,
        path: &str,
        user: cloude_protocol::sandbox::SandboxUser,
        mode: Option<u32>,
        data: Vec<u8>,
    ) -> Result<(), AgentError> {
        let user = match user {
            cloude_protocol::sandbox::SandboxUser::User => "user",
            cloude_protocol::sandbox::SandboxUser::Root => "root",
        };
        let mut uri = format!(
            "/v1/files?path={}&user={user}",
            cloude_api::query_escape(path)
        );
        if let Some(m) = mode {
            uri.push_str(&format!("&mode={m:o}"));
        }
        let resp = self
            .send(hyper::Method::PUT, &uri, "application/octet-stream", data)
            .await?;
        let _ = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        Ok(())
    }

    /// `DELETE /v1/files?path=`.
    pub async fn file_delete(&mut self, path: &str) -> Result<(), AgentError> {
        let uri = format!("/v1/files?path={}", cloude_api::query_escape(path));
        let resp = self
            .send(
                hyper::Method::DELETE,
                &uri,
                "application/octet-stream",
                Vec::new(),
            )
            .await?;
        let _ = collect(resp.into_body(), MAX_ERROR_BODY_BYTES).await?;
        Ok(())
    }

    /// `POST /v1/run`.
    pub async fn run(&mut self, req: &RunRequest) -> Result<RunResponse, AgentError> {
        let limits = AnswerLimits::for_request(req);
        let resp = self.post("/v1/run", serde_json::to_vec(req)?).await?;
        let body = collect(resp.into_body(), limits.body).await?;
        let r: RunResponse = serde_json::from_slice(&body)?;
        limits.check(&r)?;
        Ok(r)
    }

    /// `POST /v1/run/stream`: forwards output events to `tx` and returns the final result.
    /// A closed `tx` (the client went away) ends the call early.
    pub async fn run_stream(
        &mut self,
        req: &RunRequest,
        tx: &mpsc::Sender<StreamEvent>,
    ) -> Result<RunResponse, AgentError> {
        let resp = self
            .post("/v1/run/stream", serde_json::to_vec(req)?)
            .await?;
        let mut lines = EventLines::new(AnswerLimits::for_request(req));
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if let Some(result) = lines.push(data, tx).await? {
                return Ok(result);
            }
        }
        Err(AgentError::NoResult)
    }

    /// `GET /v1/run/interactive` (an upgrade): sends the request, then every [`Input`] from
    /// `input` as it comes, while forwarding the agent's events to `tx`; returns the final
    /// result. `input` ending ends the program's standard input (the agent sees our side
    /// close); a closed `tx` (the client went away) ends the call early.
    pub async fn run_interactive(
        &mut self,
        req: &RunRequest,
        tx: &mpsc::Sender<StreamEvent>,
        mut input: mpsc::Receiver<Input>,
    ) -> Result<RunResponse, AgentError> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let upgrade = hyper::Request::builder()
            .method(hyper::Method::GET)
            .uri("/v1/run/interactive")
            .header("host", "agent")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(
                hyper::header::UPGRADE,
                cloude_protocol::interactive::UPGRADE,
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| AgentError::Body(format!("cannot build the request: {e}")))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(upgrade).await?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            return Err(refusal(resp).await);
        }
        let io = TokioIo::new(hyper::upgrade::on(resp).await?);
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut first = serde_json::to_vec(req)?;
        first.push(b'\n');
        wr.write_all(&first).await.map_err(io_error)?;
        let mut lines = EventLines::new(AnswerLimits::for_request(req));
        let mut buf = vec![0u8; 16 * 1024];
        let mut open = true;
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = n.map_err(io_error)?;
                    if n == 0 {
                        return Err(AgentError::NoResult);
                    }
                    if let Some(result) = lines.push(&buf[..n], tx).await? {
                        return Ok(result);
                    }
                }
                i = input.recv(), if open => match i {
                    Some(i) => {
                        let mut line = serde_json::to_vec(&i)?;
                        line.push(b'\n');
                        wr.write_all(&line).await.map_err(io_error)?;
                    }
                    None => {
                        open = false;
                        wr.shutdown().await.map_err(io_error)?;
                    }
                },
            }
        }
    }
}

/// An agent's refusal: its status and the message of its error body.
async fn refusal(resp: hyper::Response<hyper::body::Incoming>) -> AgentError {
    let status = resp.status().as_u16();
    let body = collect(resp.into_body(), MAX_ERROR_BODY_BYTES)
        .await
        .unwrap_or_default();
    let msg = serde_json::from_slice::<cloude_protocol::ErrorBody>(&body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    AgentError::Status(status, msg)
}

fn io_error(e: std::io::Error) -> AgentError {
    AgentError::Body(format!("the agent's connection failed: {e}"))
}

/// Stage events (`started`, `ended`) one stream may carry: two per stage.
const MAX_STAGE_EVENTS: usize = 4;

/// The NDJSON events of one streamed or interactive run, read under the run's bounds: line
/// length, output bytes, blank lines, stage events and the pace of events.
struct EventLines {
    limits: AnswerLimits,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline (a long line sent in small frames is
    /// scanned once, not once per frame).
    scanned: usize,
    streamed: usize,
    blank: usize,
    stage_events: usize,
    pace: Pace,
}

impl EventLines {
    fn new(limits: AnswerLimits) -> Self {
        EventLines {
            limits,
            buf: Vec::new(),
            scanned: 0,
            streamed: 0,
            blank: 0,
            stage_events: 0,
            pace: Pace::new(),
        }
    }

    /// Takes the next bytes from the agent, forwards complete events to `tx`, and returns the
    /// result once it has come.
    async fn push(
        &mut self,
        data: &[u8],
        tx: &mpsc::Sender<StreamEvent>,
    ) -> Result<Option<RunResponse>, AgentError> {
        self.buf.extend_from_slice(data);
        while let Some(off) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=self.scanned + off).collect();
            self.scanned = 0;
            self.pace.event().await;
            if line.iter().all(u8::is_ascii_whitespace) {
                self.blank += 1;
                if self.blank > MAX_BLANK_LINES {
                    return Err(AgentError::Body(format!(
                        "the agent sent more than {MAX_BLANK_LINES} blank stream lines"
                    )));
                }
                continue;
            }
            let ev = serde_json::from_slice::<StreamEvent>(&line)?;
            match ev {
                StreamEvent::Result { result } => {
                    self.limits.check(&result)?;
                    return Ok(Some(result));
                }
                StreamEvent::Error { message } => return Err(AgentError::Reported(message)),
                StreamEvent::Output { ref data, .. } => {
                    // The agent never reports an empty read: an empty event is a hostile
                    // agent looping (it costs us a line each and counts no byte against the
                    // output cap).
                    if data.0.is_empty() {
                        return Err(AgentError::Body(
                            "the agent sent an empty output event".into(),
                        ));
                    }
                    self.streamed += data.0.len();
                    if self.streamed > self.limits.streamed {
                        return Err(AgentError::Body(format!(
                            "the agent streamed {} bytes of output, over the limit of {}",
                            self.streamed, self.limits.streamed
                        )));
                    }
                }
                StreamEvent::Started { .. } | StreamEvent::Ended { .. } => {
                    self.stage_events += 1;
                    if self.stage_events > MAX_STAGE_EVENTS {
                        return Err(AgentError::Body(format!(
                            "the agent sent more than {MAX_STAGE_EVENTS} stage events"
                        )));
                    }
                }
            }
            if tx.send(ev).await.is_err() {
                return Err(AgentError::Body("the client went away".into()));
            }
        }
        self.scanned = self.buf.len();
        if self.buf.len() > self.limits.line {
            return Err(AgentError::Body(format!(
                "a stream line is longer than {} bytes",
                self.limits.line
            )));
        }
        Ok(None)
    }
}

/// Fuzzing (`fuzz/fuzz_targets/interactive_messages.rs`): `data` as a hostile agent's event
/// stream, cut into reads at every `0xFF` byte, read under small caps (1 KiB of output per
/// stage). Never panics; what it forwards stays within the caps. (Past 50,000 lines the pace
/// makes it wait a second: fuzz inputs are far shorter.)
#[doc(hidden)]
pub fn fuzz_event_lines(data: &[u8]) {
    let limits = AnswerLimits {
        output: 1024,
        test_output: 0,
        tests: 0,
        body: 16 * 1024,
        line: 16 * 1024,
        streamed: 2048,
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let (tx, mut rx) = mpsc::channel(data.len() + 1);
        let mut lines = EventLines::new(limits);
        for chunk in data.split(|b| *b == 0xFF) {
            match lines.push(chunk, &tx).await {
                Ok(None) => continue,
                Ok(Some(r)) => {
                    limits
                        .check(&r)
                        .expect("a result over the caps was accepted");
                    break;
                }
                Err(_) => break,
            }
        }
        drop(tx);
        let (mut out, mut stages) = (0, 0);
        while let Some(ev) = rx.recv().await {
            match ev {
                StreamEvent::Output { data, .. } => {
                    assert!(!data.0.is_empty(), "an empty output event was forwarded");
                    out += data.0.len();
                }
                StreamEvent::Started { .. } | StreamEvent::Ended { .. } => stages += 1,
                StreamEvent::Result { .. } | StreamEvent::Error { .. } => {
                    panic!("a result or error was forwarded as an event")
                }
            }
        }
        assert!(out <= limits.streamed, "{out} bytes of output forwarded");
        assert!(
            stages <= MAX_STAGE_EVENTS,
            "{stages} stage events forwarded"
        );
    });
}

/// Blank lines a stream may hold (an honest agent sends none).
const MAX_BLANK_LINES: usize = 1024;
/// Stream events handled per second from one agent; past it the reader waits for the next
/// second (a guest writing one byte at a time is slowed, not failed: its events are bounded by
/// the output cap, each carrying at least one byte).
const MAX_EVENTS_PER_SECOND: u32 = 50_000;

/// Paces the events of one stream ([`MAX_EVENTS_PER_SECOND`]).
struct Pace {
    window: tokio::time::Instant,
    count: u32,
}

impl Pace {
    fn new() -> Self {
        Pace {
            window: tokio::time::Instant::now(),
            count: 0,
        }
    }

    async fn event(&mut self) {
        self.count += 1;
        if self.count <= MAX_EVENTS_PER_SECOND {
            return;
        }
        let next = self.window + std::time::Duration::from_secs(1);
        tokio::time::sleep_until(next).await;
        self.window = tokio::time::Instant::now();
        self.count = 1;
    }
}

/// A file read from a sandbox, or a directory's listing.
#[derive(Debug)]
pub enum FileAnswer {
    File(Vec<u8>),
    Listing(cloude_protocol::sandbox::Listing),
}

/// Largest directory listing answer read from an agent.
const MAX_LISTING_BODY_BYTES: usize = 8 << 20;

async fn collect(body: hyper::body::Incoming, max: usize) -> Result<Bytes, AgentError> {
    Limited::new(body, max)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| AgentError::Body(e.to_string()))
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`).
#[allow(unsafe_code)]
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe the live, writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn request(output_limit_bytes: u64) -> RunRequest {
        RunRequest {
            protocol_version: cloude_protocol::PROTOCOL_VERSION,
            files: vec![cloude_protocol::FileSpec {
                name: "main.sh".into(),
                content: "true".into(),
                encoding: Default::default(),
            }],
            compile: None,
            run: vec!["bash".into(), "main.sh".into()],
            args: vec![],
            stdin: Default::default(),
            env: vec![],
            compile_timeout_ms: 1000,
            run_timeout_ms: 1000,
            output_limit_bytes,
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

    /// A hostile agent: reads the request head, then answers with `head` and writes `chunk`
    /// `times` times (in that many writes), as slowly as the reader takes it.
    async fn hostile_agent(head: &'static str, chunk: Vec<u8>, times: usize) -> AgentClient {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            let _ = theirs.read(&mut req).await;
            if theirs.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..times {
                if theirs.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        AgentClient::handshake(Box::new(ours))
            .await
            .expect("handshake")
    }

    #[tokio::test]
    async fn an_oversized_answer_is_cut_at_the_request_limit() {
        // 64 MiB announced and sent for a 1 MiB output limit: refused after ~2.7 MiB.
        let mut c = hostile_agent(
            "HTTP/1.1 200 OK\r\ncontent-length: 67108864\r\n\r\n",
            vec![b'x'; 1 << 20],
            64,
        )
        .await;
        let t = std::time::Instant::now();
        let e = c.run(&request(1 << 20)).await.expect_err("refused");
        assert!(matches!(e, AgentError::Body(_)), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_decoded_answer_over_the_output_limit_is_refused() {
        let big =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, vec![b'a'; 5000]);
        let body = format!(
            r#"{{"compile":null,"run":{{"stdout":"{big}","stderr":"","exit_code":0,"signal":null,"status":"ok","wall_ms":1,"cpu_ms":1,"memory_kib":1}}}}"#
        );
        let head: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let mut c = hostile_agent(head, Vec::new(), 0).await;
        let e = c.run(&request(4096)).await.expect_err("refused");
        assert!(e.to_string().contains("over the limit"), "{e}");
    }

    /// `line` and its newline as one HTTP/1.1 chunk.
    fn chunked_line(line: &[u8]) -> Vec<u8> {
        format!("{:x}\r\n", line.len() + 1)
            .into_bytes()
            .into_iter()
            .chain(line.iter().copied())
            .chain(*b"\n\r\n")
            .collect()
    }

    #[tokio::test]
    async fn a_million_empty_events_are_refused_at_once() {
        let line = br#"{"type":"output","stage":"run","stream":"stdout","data":""}"#;
        let chunk = chunked_line(line);
        let mut c = hostile_agent(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            chunk,
            1_000_000,
        )
        .await;
        let (tx, mut rx) = mpsc::channel(16);
        let t = std::time::Instant::now();
        let e = c
            .run_stream(&request(1 << 20), &tx)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("empty output event"), "{e}");
        assert!(rx.try_recv().is_err(), "nothing passed on to the client");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_million_blank_lines_are_refused() {
        let mut c = hostile_agent(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"1\r\n\n\r\n".to_vec(),
            1_000_000,
        )
        .await;
        let (tx, _rx) = mpsc::channel(16);
        let e = c
            .run_stream(&request(1 << 20), &tx)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("blank stream lines"), "{e}");
    }

    #[tokio::test]
    async fn one_byte_events_are_paced_not_failed() {
        let line = br#"{"type":"output","stage":"run","stream":"stdout","data":"eA=="}"#;
        let chunk = chunked_line(line);
        let mut c = hostile_agent(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            chunk,
            120_000,
        )
        .await;
        let (tx, mut rx) = mpsc::channel(1024);
        let counted = tokio::spawn(async move {
            let mut n = 0;
            while rx.recv().await.is_some() {
                n += 1;
            }
            n
        });
        let t = std::time::Instant::now();
        // The hostile agent ends its body without a result (and without a last chunk).
        let e = c
            .run_stream(&request(1 << 20), &tx)
            .await
            .expect_err("no result line");
        drop(tx);
        assert_eq!(
            counted.await.expect("counter"),
            120_000,
            "every event passed: {e}"
        );
        // 120,000 events at 50,000 a second: at least two seconds.
        assert!(
            t.elapsed() >= std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn an_endless_stream_line_is_cut() {
        // One line that never ends, sent in 1 KiB frames: refused once it passes the line cap
        // (~2.7 MiB for 1 MiB of output), after scanning each byte once.
        let mut c = hostile_agent(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"400\r\n"
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b'x', 1024))
                .chain(*b"\r\n")
                .collect(),
            1 << 20,
        )
        .await;
        let (tx, _rx) = mpsc::channel(16);
        let t = std::time::Instant::now();
        let e = c
            .run_stream(&request(1 << 20), &tx)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("stream line is longer"), "{e}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn test_results_are_checked_against_the_request() {
        let stage = |n: usize| cloude_protocol::StageResult {
            stdout: cloude_protocol::Bytes(vec![b'x'; n]),
            stderr: Default::default(),
            exit_code: Some(0),
            signal: None,
            status: cloude_protocol::StageStatus::Ok,
            message: None,
            wall_ms: 0,
            cpu_ms: 0,
            memory_kib: 0,
        };
        let mut req = request(1 << 20);
        req.tests = vec![Default::default(); 2];
        let limits = AnswerLimits::for_request(&req);
        let per_case = usize::try_from(req.test_output_limit()).expect("fits");
        let answer = |tests| RunResponse {
            compile: None,
            run: None,
            tests,
        };
        assert!(limits.check(&answer(vec![stage(per_case); 2])).is_ok());
        let e = limits
            .check(&answer(vec![stage(1); 3]))
            .expect_err("more results than cases");
        assert!(e.to_string().contains("3 test results for 2"), "{e}");
        let e = limits
            .check(&answer(vec![stage(per_case + 1)]))
            .expect_err("over the per-case cap");
        assert!(e.to_string().contains("test case carries"), "{e}");
        // The body cap leaves room for every case's base64 output.
        assert!(limits.body >= 2 * (per_case / 3 * 4));
    }
}
