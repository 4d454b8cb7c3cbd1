//! The real server on loopback TCP (and over a pty standing in for virtio-serial), driven by a
//! real HTTP/1.1 client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloude_agent::serve;
use cloude_agent::server::AgentState;
use cloude_protocol::{
    ErrorBody, Health, RunResponse, StageStatus, StreamEvent, StreamKind, PROTOCOL_VERSION,
};
use common::*;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _cg: TestCgroup,
    _work: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(tag: &str) -> Option<(Server, Arc<AgentState>)> {
    let cg = cgroup_or_skip(tag)?;
    let work = work_root();
    // poweroff_enabled = true: outside PID 1 the agent must still never reset the machine.
    let state = AgentState::new(executor(work.path(), &cg), true);
    let (addr, task) = serve::start_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        state.clone(),
        serve::Peers::Any,
        None,
    )
    .await
    .expect("bind");
    Some((
        Server {
            addr,
            task,
            _cg: cg,
            _work: work,
        },
        state,
    ))
}

async fn client<IO>(io: IO) -> SendRequest<Full<Bytes>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn tcp_client(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    client(TcpStream::connect(addr).await.expect("connect")).await
}

async fn call(
    c: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, hyper::HeaderMap, Bytes) {
    c.ready().await.expect("connection usable");
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agent")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("request");
    let resp = c.send_request(req).await.expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

fn json(req: &cloude_protocol::RunRequest) -> Vec<u8> {
    serde_json::to_vec(req).expect("serialise")
}

#[tokio::test]
async fn health_and_runs_on_one_keep_alive_connection() {
    let Some((srv, _)) = start("http-basic").await else {
        return;
    };
    let mut c = tcp_client(srv.addr).await;
    let (st, _, body) = call(&mut c, Method::GET, "/v1/health", "").await;
    assert_eq!(st, StatusCode::OK);
    let h: Health = serde_json::from_slice(&body).expect("health json");
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);

    let mut req = sh("cat; echo err >&2; exit 7");
    req.stdin = "from stdin\n".into();
    req.poweroff_after = true;
    let (st, headers, body) = call(&mut c, Method::POST, "/v1/run", json(&req)).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let r: RunResponse = serde_json::from_slice(&body).expect("run json");
    let run = r.run.expect("run stage");
    assert_eq!(run.stdout.0, b"from stdin\n");
    assert_eq!(run.stderr.0, b"err\n");
    assert_eq!(run.exit_code, Some(7));

    // The poweroff run closed that connection; a new one works and keeps alive.
    let mut c = tcp_client(srv.addr).await;
    for _ in 0..3 {
        let (st, _, body) = call(&mut c, Method::POST, "/v1/run", json(&sh("echo again"))).await;
        assert_eq!(st, StatusCode::OK);
        let r: RunResponse = serde_json::from_slice(&body).expect("run json");
        assert_eq!(r.run.expect("run").stdout.0, b"again\n");
    }
}

#[tokio::test]
async fn bad_requests_get_400_with_an_error_body() {
    let Some((srv, _)) = start("http-bad").await else {
        return;
    };
    let mut c = tcp_client(srv.addr).await;
    let good = String::from_utf8(json(&sh("echo hi"))).expect("utf8");
    let with_files = |name_json: &str| -> Vec<u8> {
        let mut v = good
            .replacen(
                "\"files\":[]",
                &format!("\"files\":[{{\"name\":{name_json},\"content\":\"x\"}}]"),
                1,
            )
            .into_bytes();
        v.shrink_to_fit();
        v
    };
    // Raw invalid UTF-8 inside the name, a lone surrogate escape, a path escape, bad JSON.
    let mut raw_bad = with_files("\"abc\"");
    let pos = raw_bad.windows(3).position(|w| w == b"abc").expect("abc");
    raw_bad[pos + 1] = 0xff;
    let cases: Vec<Vec<u8>> = vec![
        raw_bad,
        with_files("\"\\udc80.py\""),
        with_files("\"../etc/passwd\""),
        b"{not json".to_vec(),
        good.replace("\"protocol_version\":1", "\"protocol_version\":99")
            .into_bytes(),
    ];
    for body in cases {
        let (st, _, resp) = call(&mut c, Method::POST, "/v1/run", body.clone()).await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let e: ErrorBody = serde_json::from_slice(&resp).expect("error body");
        assert!(!e.error.is_empty());
    }
    // Unknown route.
    let (st, _, _) = call(&mut c, Method::GET, "/nope", "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The connection (and server) survived all of that.
    let (st, _, _) = call(&mut c, Method::GET, "/v1/health", "").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn oversized_body_is_refused_with_413() {
    let Some((srv, _)) = start("http-big").await else {
        return;
    };
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let head = format!(
        "POST /v1/run HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{",
        cloude_protocol::MAX_REQUEST_BODY_BYTES + 1
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without reading the body")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"error\""), "{text}");
}

#[tokio::test]
async fn a_second_concurrent_run_gets_409() {
    let Some((srv, _)) = start("http-busy").await else {
        return;
    };
    let addr = srv.addr;
    let slow = tokio::spawn(async move {
        let mut c = tcp_client(addr).await;
        call(
            &mut c,
            Method::POST,
            "/v1/run",
            json(&sh("sleep 1; echo slow")),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = tcp_client(addr).await;
    let (st, _, body) = call(&mut c, Method::POST, "/v1/run", json(&sh("echo fast"))).await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (st, _, _) = call(&mut c, Method::GET, "/v1/health", "").await;
    assert_eq!(st, StatusCode::OK, "health answers during a run");
    let (st, _, body) = slow.await.expect("slow run");
    assert_eq!(st, StatusCode::OK);
    let r: RunResponse = serde_json::from_slice(&body).expect("json");
    assert_eq!(r.run.expect("run").stdout.0, b"slow\n");
}

#[tokio::test]
async fn streaming_run_emits_chunks_then_the_result() {
    let Some((srv, _)) = start("http-stream").await else {
        return;
    };
    let mut c = tcp_client(srv.addr).await;
    c.ready().await.expect("ready");
    let req = sh("echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; exit 4");
    let http = Request::builder()
        .method(Method::POST)
        .uri("/v1/run/stream")
        .header("host", "agent")
        .body(Full::new(Bytes::from(json(&req))))
        .expect("request");
    let resp = c.send_request(http).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut frames_seen = 0;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Some(d) = frame.data_ref() {
            frames_seen += 1;
            buf.extend_from_slice(d);
        }
    }
    let events: Vec<StreamEvent> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("ndjson line"))
        .collect();
    assert!(
        frames_seen >= 3,
        "chunks arrive separately ({frames_seen} frames)"
    );
    let outputs: Vec<(StreamKind, Vec<u8>)> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Output { stream, data, .. } => Some((*stream, data.0.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        outputs,
        vec![
            (StreamKind::Stdout, b"one\n".to_vec()),
            (StreamKind::Stderr, b"two\n".to_vec()),
            (StreamKind::Stdout, b"three\n".to_vec()),
        ]
    );
    match events.last() {
        Some(StreamEvent::Result { result }) => {
            let run = result.run.as_ref().expect("run");
            assert_eq!(run.exit_code, Some(4));
            assert_eq!(run.status, StageStatus::Ok);
            assert_eq!(run.stdout.0, b"one\nthree\n");
        }
        other => panic!("last event is not the result: {other:?}"),
    }
}

#[tokio::test]
async fn serial_channel_writes_ready_line_then_serves_http() {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let Some(cg) = cgroup_or_skip("http-serial") else {
        return;
    };
    let work = work_root();
    let state = AgentState::new(executor(work.path(), &cg), true);
    // A raw pty stands in for /dev/vportNpM: a pollable character device with both directions.
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut t = tcgetattr(&pty.slave).expect("tcgetattr");
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t).expect("tcsetattr");
    let path = nix::unistd::ttyname(&pty.slave).expect("ttyname");
    let task = serve::spawn_serial(path, state);
    let mut host = cloude_agent::transport::FdStream::new(pty.master).expect("master");
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), host.read_exact(&mut b))
            .await
            .expect("ready line in time")
            .expect("read");
        line.push(b[0]);
    }
    assert_eq!(
        cloude_protocol::parse_ready_line(&String::from_utf8_lossy(&line)),
        Some(PROTOCOL_VERSION)
    );
    let mut c = client(host).await;
    let (st, _, _) = call(&mut c, Method::GET, "/v1/health", "").await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, body) = call(
        &mut c,
        Method::POST,
        "/v1/run",
        json(&sh("printf 'over serial'")),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let r: RunResponse = serde_json::from_slice(&body).expect("json");
    assert_eq!(r.run.expect("run").stdout.0, b"over serial");
    task.abort();
    drop(pty.slave);
}

#[tokio::test]
async fn host_only_mode_refuses_connections_from_inside() {
    let Some(cg) = cgroup_or_skip("http-hostonly") else {
        return;
    };
    let work = work_root();
    let state = AgentState::new(executor(work.path(), &cg), true);
    let (addr, task) = serve::start_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        state,
        serve::Peers::HostOnly,
        Some("ab".repeat(32)),
    )
    .await
    .expect("bind");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /v1/health HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .ok();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed promptly");
    assert!(
        n.is_err() || buf.is_empty(),
        "got an answer: {}",
        String::from_utf8_lossy(&buf)
    );
    task.abort();
}

#[tokio::test]
async fn a_sealed_agent_runs_nothing_until_woken() {
    let Some((srv, _)) = start("http-seal").await else {
        return;
    };
    let mut c = tcp_client(srv.addr).await;
    let (st, headers, _) = call(&mut c, Method::POST, "/v1/snapshot/prepare", "").await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        headers.get("connection"),
        None,
        "the connection stays open: a clone's host sends its wake on it"
    );
    for path in ["/v1/run", "/v1/run/stream"] {
        let (st, _, body) = call(&mut c, Method::POST, path, json(&sh("echo no"))).await;
        assert_eq!(st, StatusCode::CONFLICT, "{path}");
        let e: ErrorBody = serde_json::from_slice(&body).expect("error json");
        assert!(e.error.contains("wake"), "{}", e.error);
    }
    // A wake with too little entropy, a bad hostname or garbage is refused and leaves it sealed.
    let wake = |entropy: usize, host: &str| {
        serde_json::to_vec(&cloude_protocol::WakeRequest {
            protocol_version: PROTOCOL_VERSION,
            entropy: cloude_protocol::Bytes(vec![9; entropy]),
            unix_time_ns: 1_700_000_000_000_000_000,
            hostname: host.into(),
        })
        .expect("json")
    };
    for body in [wake(8, "cloude"), wake(32, "bad host"), b"{".to_vec()] {
        let (st, _, _) = call(&mut c, Method::POST, "/v1/wake", body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
    }
    let (st, _, _) = call(&mut c, Method::POST, "/v1/run", json(&sh("echo no"))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    // Outside PID 1 the wake touches neither the host's RNG nor its clock.
    let (st, _, body) = call(&mut c, Method::POST, "/v1/wake", wake(32, "cloude")).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let w: cloude_protocol::WakeResponse = serde_json::from_slice(&body).expect("wake json");
    assert!(!w.reseeded);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    assert!(
        now.as_secs() > 1_700_000_100,
        "the host clock was not set back"
    );
    let (st, _, body) = call(&mut c, Method::POST, "/v1/run", json(&sh("echo yes"))).await;
    assert_eq!(st, StatusCode::OK);
    let r: RunResponse = serde_json::from_slice(&body).expect("run json");
    assert_eq!(r.run.expect("run").stdout.0, b"yes\n");
}

/// `GET /v1/run/interactive`: after the upgrade, input lines reach the program while it runs
/// (each answered before the next is sent), a signal reaches its process group, the stage
/// events frame the output, and the result comes last.
#[tokio::test]
async fn interactive_run_reads_input_as_it_comes() {
    use cloude_protocol::interactive::Input;
    use tokio::io::AsyncBufReadExt as _;
    let Some((srv, _)) = start("http-interactive").await else {
        return;
    };
    let mut c = tcp_client(srv.addr).await;
    c.ready().await.expect("ready");
    // Without the Upgrade header: refused.
    let (status, _, _) = call(&mut c, Method::GET, "/v1/run/interactive", Vec::new()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (rd, mut wr) = interactive(srv.addr).await;
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let req = sh("trap 'echo got-usr1' USR1; while read -r l; do echo \"echo:$l\"; done; echo eof; sleep 30 & wait; sleep 30");
    let mut first = json(&req);
    first.push(b'\n');
    wr.write_all(&first).await.expect("request line");
    let send = |i: Input| {
        let mut l = serde_json::to_vec(&i).expect("input");
        l.push(b'\n');
        l
    };
    async fn next_event<R: tokio::io::AsyncBufRead + Unpin>(
        lines: &mut tokio::io::Lines<R>,
    ) -> StreamEvent {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("an event in time")
            .expect("read")
            .expect("a line");
        serde_json::from_str::<StreamEvent>(&line).expect("event")
    }
    assert!(matches!(
        next_event(&mut lines).await,
        StreamEvent::Started { .. }
    ));
    for word in ["a", "b", "c"] {
        wr.write_all(&send(Input::Stdin {
            data: format!("{word}\n").as_str().into(),
        }))
        .await
        .expect("stdin");
        match next_event(&mut lines).await {
            StreamEvent::Output { data, .. } => {
                assert_eq!(data.0, format!("echo:{word}\n").into_bytes())
            }
            other => panic!("{other:?}"),
        }
    }
    wr.write_all(&send(Input::CloseStdin)).await.expect("close");
    match next_event(&mut lines).await {
        StreamEvent::Output { data, .. } => assert_eq!(data.0, b"eof\n"),
        other => panic!("{other:?}"),
    }
    // SIGUSR1 (10) reaches the shell's trap, then SIGKILL ends the stage.
    wr.write_all(&send(Input::Signal { signal: 10 }))
        .await
        .expect("usr1");
    match next_event(&mut lines).await {
        StreamEvent::Output { data, .. } => assert_eq!(data.0, b"got-usr1\n"),
        other => panic!("{other:?}"),
    }
    wr.write_all(&send(Input::Signal { signal: 9 }))
        .await
        .expect("kill");
    match next_event(&mut lines).await {
        StreamEvent::Ended { signal, .. } => assert_eq!(signal, Some(9)),
        other => panic!("{other:?}"),
    }
    match next_event(&mut lines).await {
        StreamEvent::Result { result } => {
            let run = result.run.expect("run");
            assert_eq!(run.signal, Some(9));
            assert_eq!(run.stdout.0, b"echo:a\necho:b\necho:c\neof\ngot-usr1\n");
        }
        other => panic!("{other:?}"),
    }
}

/// An interactive run with a `tty`: the program's streams are a terminal (`tty` names a pts,
/// `stty size` the size asked, then the size of a `resize`), Ctrl-C typed as `\x03` interrupts
/// the foreground program and the shell lives on, typed input is echoed and read by lines.
#[tokio::test]
async fn interactive_run_on_a_terminal() {
    use cloude_protocol::interactive::Input;
    use tokio::io::AsyncBufReadExt as _;
    let Some((srv, _)) = start("http-tty").await else {
        return;
    };
    let (rd, mut wr) = interactive(srv.addr).await;
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let mut req =
        sh("trap 'echo INT' INT; tty; stty size; sleep 100; stty size; read x; echo got:$x");
    req.tty = Some(cloude_protocol::TtySize { rows: 24, cols: 80 });
    let mut first = json(&req);
    first.push(b'\n');
    wr.write_all(&first).await.expect("request line");
    let send = |i: Input| {
        let mut l = serde_json::to_vec(&i).expect("input");
        l.push(b'\n');
        l
    };
    let mut text = String::new();
    // Reads events until the output so far contains `want`.
    async fn until<R: tokio::io::AsyncBufRead + Unpin>(
        lines: &mut tokio::io::Lines<R>,
        text: &mut String,
        want: &str,
    ) -> Option<RunResponse> {
        while !text.contains(want) {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {want:?} in {text:?}"))
                .expect("read")
                .expect("a line");
            match serde_json::from_str::<StreamEvent>(&line).expect("event") {
                StreamEvent::Output { data, stream, .. } => {
                    assert_eq!(stream, StreamKind::Stdout, "a terminal is one stream");
                    text.push_str(&String::from_utf8_lossy(&data.0));
                }
                StreamEvent::Result { result } => return Some(result),
                _ => {}
            }
        }
        None
    }
    until(&mut lines, &mut text, "24 80").await;
    assert!(text.contains("/dev/pts/"), "{text:?}");
    wr.write_all(&send(Input::Resize {
        rows: 30,
        cols: 100,
    }))
    .await
    .expect("resize");
    wr.write_all(&send(Input::Stdin {
        data: "\x03".into(),
    }))
    .await
    .expect("ctrl-c");
    until(&mut lines, &mut text, "30 100").await;
    assert!(text.contains("INT"), "the shell's trap ran: {text:?}");
    wr.write_all(&send(Input::Stdin {
        data: "hello\n".into(),
    }))
    .await
    .expect("line");
    until(&mut lines, &mut text, "got:hello").await;
    // The typed line was echoed by the terminal before the program answered.
    assert!(text.find("hello").expect("echo") < text.find("got:hello").expect("answer"));
    let result = until(&mut lines, &mut text, "\u{0}never")
        .await
        .expect("the result");
    let run = result.run.expect("run");
    assert_eq!(run.exit_code, Some(0), "{run:?}");
}

/// Opens an interactive run's connection (`GET /v1/run/interactive`, upgraded): its two halves.
async fn interactive(
    addr: SocketAddr,
) -> (
    tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>,
    tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn.with_upgrades());
    let up = Request::builder()
        .method(Method::GET)
        .uri("/v1/run/interactive")
        .header("host", "agent")
        .header("connection", "upgrade")
        .header("upgrade", cloude_protocol::interactive::UPGRADE)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(up).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgrade"));
    tokio::io::split(io)
}

/// Sandbox processes: output nobody reads stays within the buffer (the rest is counted as
/// skipped), at most `MAX_PROCS` run at once (an ended one makes room), signals are capped.
#[tokio::test]
async fn sandbox_processes_are_capped_and_their_output_bounded() {
    use cloude_protocol::sandbox::{ProcOutput, ProcStart, MAX_PROCS, PROC_BUFFER_BYTES};
    let Some((server, _state)) = start("procs").await else {
        return;
    };
    let mut c = tcp_client(server.addr).await;
    let start_proc = |argv: &[&str]| {
        serde_json::to_vec(&ProcStart {
            protocol_version: PROTOCOL_VERSION,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: Some("/tmp".into()),
            user: Default::default(),
            tag: None,
            timeout_ms: 0,
            stdin: false,
            tty: None,
        })
        .expect("json")
    };
    let id_of = |b: &Bytes| {
        serde_json::from_slice::<serde_json::Value>(b).expect("json")["id"]
            .as_u64()
            .expect("id")
    };
    // 5 MB written, nobody reading.
    let (st, _, b) = call(
        &mut c,
        Method::POST,
        "/v1/procs",
        start_proc(&["sh", "-c", "head -c 5000000 /dev/zero | tr '\\0' a"]),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b:?}");
    let noisy = id_of(&b);
    let out = loop {
        let (st, _, b) = call(
            &mut c,
            Method::POST,
            &format!("/v1/procs/{noisy}/read"),
            r#"{"since": 0, "wait_ms": 1000}"#,
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let o: ProcOutput = serde_json::from_slice(&b).expect("output");
        if o.end.is_some() {
            break o;
        }
    };
    let kept: usize = out.chunks.iter().map(|c| c.data.0.len()).sum();
    assert!(kept <= PROC_BUFFER_BYTES, "{kept} bytes kept");
    assert_eq!(out.next, 5_000_000);
    assert_eq!(out.skipped as usize + kept, 5_000_000);
    // MAX_PROCS running: one more is refused; the ended one made room for the last.
    let mut ids = Vec::new();
    for _ in 0..MAX_PROCS {
        let (st, _, b) = call(
            &mut c,
            Method::POST,
            "/v1/procs",
            start_proc(&["sleep", "60"]),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{b:?}");
        ids.push(id_of(&b));
    }
    let (st, _, b) = call(
        &mut c,
        Method::POST,
        "/v1/procs",
        start_proc(&["sleep", "60"]),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{b:?}");
    // Signals are capped per process.
    let first = ids[0];
    let mut refused = false;
    for _ in 0..=cloude_protocol::interactive::MAX_SIGNALS {
        let (st, _, _) = call(
            &mut c,
            Method::POST,
            &format!("/v1/procs/{first}/input"),
            r#"{"type": "signal", "signal": 28}"#,
        )
        .await;
        if st == StatusCode::BAD_REQUEST {
            refused = true;
            break;
        }
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    assert!(refused, "more than MAX_SIGNALS signals are refused");
    for id in ids {
        let (st, _, _) = call(&mut c, Method::DELETE, &format!("/v1/procs/{id}"), "").await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    let (st, _, b) = call(&mut c, Method::GET, "/v1/procs", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&b[..], b"[]", "all forgotten");
}
