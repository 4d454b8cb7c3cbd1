//! Interactive runs end to end on the QEMU fallback (real jailed VMs): Piston's WebSocket
//! (`/api/v2/connect`, every close code) and the native one (`/v1/executions/ws`). Standard
//! input reaches a program while it runs, turn by turn; signals arrive by message; stages come
//! in order; a client that never reads holds the server's memory down; a client that goes away
//! takes its VM with it.

use cloude_testkit as support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Server;
use tokio_tungstenite::tungstenite::{self, Message};

/// Kernel build plus the images when nothing is cached yet.
const FIRST_START: Duration = Duration::from_secs(3600);
/// One message, at most (a VM start under emulation plus a compile).
const WAIT: Duration = Duration::from_secs(120);

fn server(extra: &str) -> Server {
    let config = format!(
        "[vm]\nprebuild = [\"python\", \"c\", \"bash\"]\n[limits]\nmax_concurrent_vms = 3\n{extra}"
    );
    Server::start(&["--hypervisor", "qemu"], Some(&config), FIRST_START)
        .unwrap_or_else(|e| panic!("interactive: {e}"))
}

type Socket = tungstenite::WebSocket<TcpStream>;

struct Ws {
    ws: Socket,
    /// The close frame's code, once it came.
    closed: Option<u16>,
}

impl Ws {
    fn connect(s: &Server, path: &str) -> Ws {
        let stream = TcpStream::connect(s.addr).expect("connect");
        let (ws, resp) = tungstenite::client(format!("ws://{}{path}", s.addr), stream)
            .unwrap_or_else(|e| panic!("WebSocket handshake on {path}: {e}"));
        assert_eq!(resp.status(), 101);
        Ws { ws, closed: None }
    }

    fn send(&mut self, v: &Value) {
        self.ws
            .send(Message::Text(v.to_string()))
            .unwrap_or_else(|e| panic!("send {v}: {e}"));
    }

    /// The next JSON message within `within`; `None` once the server closed (the code is then
    /// in `closed`).
    fn recv(&mut self, within: Duration) -> Option<Value> {
        self.ws
            .get_mut()
            .set_read_timeout(Some(within))
            .expect("timeout");
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON")),
                Ok(Message::Close(f)) => {
                    self.closed = Some(f.map_or(1005, |f| u16::from(f.code)));
                    return None;
                }
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return None
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no message within {within:?}")
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Messages until one of `kind` (returned) or the close.
    fn until(&mut self, kind: &str, seen: &mut Vec<Value>) -> Option<Value> {
        while let Some(m) = self.recv(WAIT) {
            if m["type"] == kind {
                return Some(m);
            }
            seen.push(m);
        }
        None
    }

    /// Reads to the close and returns its code.
    fn close_code(&mut self) -> u16 {
        while self.recv(WAIT).is_some() {}
        self.closed.expect("a close frame")
    }
}

/// The text of every `data` message of `stream` in `msgs`.
fn text_of(msgs: &[Value], stream: &str) -> String {
    msgs.iter()
        .filter(|m| m["type"] == "data" && m["stream"] == stream)
        .filter_map(|m| m["data"].as_str())
        .collect()
}

const ECHO_PY: &str = r#"import sys
for line in sys.stdin:
    print("echo:" + line.strip(), flush=True)
"#;

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn piston_connect_talks_to_a_running_program() {
    let s = server("");

    // Python: each line is answered before the next is sent (turn by turn, not at the end).
    let mut ws = Ws::connect(&s, "/api/v2/connect");
    ws.send(
        &json!({"type": "init", "language": "python", "version": "*",
        "files": [{"name": "echo.py", "content": ECHO_PY}], "run_timeout": 60000}),
    );
    let rt = ws.recv(WAIT).expect("runtime");
    assert_eq!(rt["type"], "runtime", "{rt}");
    assert_eq!(rt["language"], "python");
    let mut seen = vec![];
    let stage = ws.until("stage", &mut seen).expect("stage");
    assert_eq!(stage["stage"], "run");
    let mut rtts = vec![];
    for word in ["one", "two", "three", "four", "five"] {
        let t = Instant::now();
        ws.send(&json!({"type": "data", "stream": "stdin", "data": format!("{word}\n")}));
        let mut got = String::new();
        while !got.contains('\n') {
            let m = ws.recv(WAIT).expect("data");
            assert_eq!(m["type"], "data", "{m}");
            got.push_str(m["data"].as_str().unwrap_or_default());
        }
        rtts.push(t.elapsed());
        assert_eq!(got, format!("echo:{word}\n"));
    }
    eprintln!("line round trips over /api/v2/connect: {rtts:?}");
    // A signal by message ends it; Piston reports the signal's name.
    ws.send(&json!({"type": "signal", "signal": "SIGKILL"}));
    let exit = ws
        .until("exit", &mut seen)
        .unwrap_or_else(|| panic!("closed ({:?}) with no exit after: {seen:?}", ws.closed));
    assert_eq!(exit["stage"], "run");
    assert_eq!(exit["signal"], "SIGKILL", "{exit}");
    assert_eq!(exit["code"], Value::Null);
    assert_eq!(ws.close_code(), 4999);

    // C: compile stage then run stage, in order, with stdin sent at once (before the VM is
    // even up): it is kept for the run stage, never given to the compiler, never lost.
    let c = r#"#include <stdio.h>
int main(void) { int a, b; if (scanf("%d %d", &a, &b) != 2) return 9;
  printf("sum=%d\n", a + b); fflush(stdout); return 3; }
"#;
    let mut ws = Ws::connect(&s, "/api/v2/connect");
    ws.send(&json!({"type": "init", "language": "c", "version": "*",
        "files": [{"name": "sum.c", "content": c}], "run_timeout": 30000}));
    ws.send(&json!({"type": "data", "stream": "stdin", "data": "20 "}));
    ws.send(&json!({"type": "data", "stream": "stdin", "data": "22\n"}));
    let mut msgs = vec![];
    while let Some(m) = ws.recv(WAIT) {
        msgs.push(m);
    }
    assert_eq!(ws.closed, Some(4999), "{msgs:?}");
    let kinds: Vec<String> = msgs
        .iter()
        .filter(|m| m["type"] != "data")
        .map(|m| {
            format!(
                "{}:{}",
                m["type"].as_str().unwrap_or(""),
                m["stage"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "runtime:",
            "stage:compile",
            "exit:compile",
            "stage:run",
            "exit:run"
        ],
        "{msgs:?}"
    );
    assert_eq!(text_of(&msgs, "stdout"), "sum=42\n", "{msgs:?}");
    let exit = msgs.iter().rfind(|m| m["type"] == "exit").expect("exit");
    assert_eq!(exit["code"], 3, "{exit}");
    assert_eq!(exit["status"], "RE", "{exit}");
    assert_eq!(exit["stdout"], "sum=42\n", "{exit}");

    // SIGINT reaches the program (Python turns it into KeyboardInterrupt).
    let mut ws = Ws::connect(&s, "/api/v2/connect");
    ws.send(&json!({"type": "init", "language": "python", "version": "*",
        "files": [{"content": "import time\ntry:\n    print('ready', flush=True)\n    time.sleep(100)\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n"}],
        "run_timeout": 60000}));
    let mut seen = vec![];
    while !text_of(&seen, "stdout").contains("ready") {
        seen.push(ws.recv(WAIT).expect("ready"));
    }
    ws.send(&json!({"type": "signal", "signal": "SIGINT"}));
    let exit = ws
        .until("exit", &mut seen)
        .unwrap_or_else(|| panic!("closed ({:?}) with no exit after: {seen:?}", ws.closed));
    assert!(text_of(&seen, "stdout").contains("interrupted"), "{seen:?}");
    assert_eq!(exit["code"], 0, "{exit}");
    assert_eq!(ws.close_code(), 4999);
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn piston_connect_close_codes() {
    let s = server("");
    // 4001: no init within a second.
    let mut ws = Ws::connect(&s, "/api/v2/connect");
    let t = Instant::now();
    assert_eq!(ws.close_code(), 4001);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // 4003: data before init.
    let mut ws = Ws::connect(&s, "/api/v2/connect");
    ws.send(&json!({"type": "data", "stream": "stdin", "data": "x"}));
    assert_eq!(ws.close_code(), 4003);
    // 4002: an error message first (an unknown language), then the close.
    let mut ws = Ws::connect(&s, "/api/v2/connect");
    ws.send(&json!({"type": "init", "language": "cobol-9000", "version": "*", "files": [{"content": "x"}]}));
    let m = ws.recv(WAIT).expect("error");
    assert_eq!(m["type"], "error", "{m}");
    assert!(
        m["message"]
            .as_str()
            .unwrap_or("")
            .contains("runtime is unknown"),
        "{m}"
    );
    assert_eq!(ws.close_code(), 4002);
    // 4000, 4004, 4005 on an initialised job (each kills its VM).
    for (msg, code) in [
        (
            json!({"type": "init", "language": "bash", "version": "*", "files": [{"content": "x"}]}),
            4000,
        ),
        (
            json!({"type": "data", "stream": "stdout", "data": "x"}),
            4004,
        ),
        (json!({"type": "signal", "signal": "SIGNOPE"}), 4005),
    ] {
        let mut ws = Ws::connect(&s, "/api/v2/connect");
        ws.send(&json!({"type": "init", "language": "bash", "version": "*",
            "files": [{"content": "echo up; sleep 60"}], "run_timeout": 60000}));
        let mut seen = vec![];
        while !text_of(&seen, "stdout").contains("up") {
            seen.push(ws.recv(WAIT).expect("up"));
        }
        ws.send(&msg);
        assert_eq!(ws.close_code(), code, "{msg}");
    }
    // The VMs of closed sockets are gone.
    let t = Instant::now();
    while !s.children().is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        s.children().is_empty(),
        "VM processes left: {:?}",
        s.children()
    );
    // A plain GET is told to upgrade.
    assert_eq!(s.get("/api/v2/connect").status, 426);
    // A page of another site cannot open a socket through the visitor's browser.
    for (origin, want) in [
        ("https://evil.example", "403"),
        ("http://localhost:3000", "101"),
    ] {
        use std::io::{Read as _, Write as _};
        let mut c = TcpStream::connect(s.addr).expect("connect");
        write!(
            c,
            "GET /v1/executions/ws HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\norigin: {origin}\r\n\r\n",
            s.addr
        )
        .expect("write");
        let mut head = [0u8; 12];
        c.read_exact(&mut head).expect("status line");
        assert_eq!(
            &head[9..12],
            want.as_bytes(),
            "{origin}: {}",
            String::from_utf8_lossy(&head)
        );
    }
}

#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn native_websocket_runs_stdin_signals_and_result() {
    let s = server("output_limit_bytes = 67108864\n");
    // Initial stdin from the request, more while it runs, then end of input.
    let py = "import sys\nn = 0\nfor line in sys.stdin:\n    n += int(line)\n    print('total', n, flush=True)\nprint('eof', n)\n";
    let mut ws = Ws::connect(&s, "/v1/executions/ws");
    ws.send(&json!({"language": "python", "code": py, "stdin": "1\n", "timeout_ms": 60000}));
    let mut seen = vec![];
    let st = ws.until("stage", &mut seen).expect("stage");
    assert_eq!(st["stage"], "run");
    let out = |seen: &[Value]| -> String {
        seen.iter()
            .filter(|m| m["type"] == "output" && m["stream"] == "stdout")
            .filter_map(|m| m["data"].as_str())
            .collect()
    };
    while !out(&seen).contains("total 1\n") {
        seen.push(ws.recv(WAIT).expect("total 1"));
    }
    ws.send(&json!({"type": "stdin", "data": "2\n"}));
    ws.send(&json!({"type": "stdin", "data_base64": "Mwo="}));
    while !out(&seen).contains("total 6\n") {
        seen.push(ws.recv(WAIT).expect("total 6"));
    }
    ws.send(&json!({"type": "close_stdin"}));
    let exit = ws.until("exit", &mut seen).expect("exit");
    assert_eq!(exit["exit_code"], 0, "{exit}");
    let result = ws.until("result", &mut seen).expect("result");
    assert_eq!(result["result"]["status"], "ok", "{result}");
    assert_eq!(out(&seen), "total 1\ntotal 3\ntotal 6\neof 6\n", "{seen:?}");
    // The result leaves out what the output lines carried (it stays one modest message).
    assert_eq!(result["result"]["stdout"], "", "{result}");
    assert_eq!(result["result"]["exit_code"], 0, "{result}");
    assert_eq!(ws.close_code(), 1000);

    // Bad messages are refused with an error line and 1008; unknown fields too.
    let mut ws = Ws::connect(&s, "/v1/executions/ws");
    ws.send(&json!({"language": "python", "code": "x", "bogus": 1}));
    let m = ws.recv(WAIT).expect("error");
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(ws.close_code(), 1008);

    // A client that never reads: the program writes 48 MiB, the server's memory stays flat
    // (output is paced by the socket, never buffered without limit).
    let rss = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = rss(s.pid());
    let mut ws = Ws::connect(&s, "/v1/executions/ws");
    ws.send(&json!({"language": "bash", "code": "head -c 50331648 /dev/zero | tr '\\0' x; echo done >&2", "timeout_ms": 60000}));
    let mut peak = before;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(rss(s.pid()));
    }
    eprintln!("server RSS with a client that does not read: {before} KiB -> peak {peak} KiB");
    assert!(
        peak < before + 48 * 1024,
        "the server buffered output for a client that does not read: {before} -> {peak} KiB"
    );
    // Reading now gets everything, in order, and the result.
    let mut total = 0usize;
    let result = loop {
        let m = ws
            .recv(WAIT)
            .unwrap_or_else(|| panic!("closed with {:?} after {total} bytes", ws.closed));
        if m["type"] == "output" && m["stream"] == "stdout" {
            total += m["data"].as_str().map_or(0, str::len);
        }
        assert_ne!(m["type"], "error", "{m}");
        if m["type"] == "result" {
            break m;
        }
    };
    assert_eq!(total, 50331648, "{result}");
    assert_eq!(result["result"]["status"], "ok", "{result}");

    // A client that goes away mid-run takes its VM with it.
    let mut ws = Ws::connect(&s, "/v1/executions/ws");
    ws.send(&json!({"language": "bash", "code": "echo up; sleep 100", "timeout_ms": 60000}));
    let mut seen = vec![];
    while !out(&seen).contains("up") {
        seen.push(ws.recv(WAIT).expect("up"));
    }
    assert!(!s.children().is_empty(), "a VM runs");
    drop(ws);
    let t = Instant::now();
    while !s.children().is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        s.children().is_empty(),
        "VM processes left: {:?}",
        s.children()
    );
    eprintln!("VM gone {:?} after the client left", t.elapsed());
}

/// Piston's own CLI (`cli/index.js … run LANG FILE -t`, its `ws` client), unchanged, from a
/// Piston source tree named by `CLOUDE_PISTON_SRC` (a checkout, or a git directory whose HEAD
/// is exported); its npm dependencies are installed from the registry once.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn pistons_own_cli_runs_interactively() {
    use std::process::{Command, Stdio};
    let Some(src) = std::env::var_os(support::vars::PISTON_SRC) else {
        eprintln!(
            "SKIPPED: set {} to a Piston source tree (engineer-man/piston) to run its CLI; \
             the CLI is not published on npm and GitHub is out of reach here",
            support::vars::PISTON_SRC
        );
        return;
    };
    let src = std::path::PathBuf::from(src);
    let cli = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("piston-cli");
    if !cli.join("node_modules").is_dir() {
        let _ = std::fs::remove_dir_all(&cli);
        std::fs::create_dir_all(&cli).expect("mkdir");
        let ok = if src.join("cli/index.js").is_file() {
            Command::new("cp")
                .arg("-r")
                .arg(src.join("cli/."))
                .arg(&cli)
                .status()
        } else {
            // A git directory: export its cli/ folder.
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "git --git-dir='{}' archive HEAD cli | tar -x --strip-components=1 -C '{}'",
                    src.display(),
                    cli.display()
                ))
                .status()
        };
        assert!(ok.is_ok_and(|s| s.success()), "cannot copy Piston's CLI");
        let st = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--omit=dev"])
            .current_dir(&cli)
            .status()
            .expect("npm");
        assert!(st.success(), "npm install for Piston's CLI failed");
    }
    let s = server("");
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = dir.path().join("greet.py");
    std::fs::write(
        &prog,
        "name = input()\nprint('hello, ' + name[::-1], flush=True)\n",
    )
    .expect("write");
    let mut child = Command::new("node")
        .arg(cli.join("index.js"))
        .args(["-u", &s.url, "run", "python"])
        .arg(&prog)
        .arg("-t")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"dlrow\n").expect("stdin");
    }
    let t = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > WAIT {
            let _ = child.kill();
            panic!("Piston's CLI did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello, world"),
        "Piston's CLI printed {stdout:?} (stderr {:?})",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cloude run -i`: the CLI's standard input reaches the program line by line while it runs
/// (each answer read before the next line is written), end of input closes the program's, and
/// the CLI exits with the program's code.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn cli_run_interactive_talks_turn_by_turn() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};
    let s = server("");
    let code = "import sys\nfor line in sys.stdin:\n    print(int(line) * 2, flush=True)\nprint('done')\nsys.exit(5)\n";
    let mut child = Command::new(support::sibling_bin("cloude").expect("cloude binary"))
        .args(["--server", &s.url, "run", "-i", "-l", "python", "-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cloude");
    let mut stdin = child.stdin.take().expect("stdin");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    for (n, want) in [(3, "6"), (21, "42"), (50, "100")] {
        writeln!(stdin, "{n}").expect("write");
        stdin.flush().expect("flush");
        let got = rx
            .recv_timeout(WAIT)
            .expect("an answer before the next line");
        assert_eq!(got, want);
    }
    drop(stdin);
    assert_eq!(rx.recv_timeout(WAIT).expect("done"), "done");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(t.elapsed() < WAIT, "cloude run -i did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(5));
}

/// The native WebSocket with a terminal: an interactive bash in the VM shows its prompt,
/// `tty` names a pts, Ctrl-C (typed as `\x03`) stops `sleep 100` and the shell lives on, a
/// resize is seen by `stty size`, and `exit 7` ends the run with that code.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn native_websocket_terminal_runs_an_interactive_shell() {
    let s = server("");
    let mut ws = Ws::connect(&s, "/v1/executions/ws");
    ws.send(
        &json!({"language": "bash", "code": "exec bash -i", "timeout_ms": 60000,
        "tty": {"rows": 24, "cols": 80}}),
    );
    let mut text = String::new();
    /// Messages until the terminal's output contains `want` (or the result, returned).
    fn until(ws: &mut Ws, text: &mut String, want: &str) -> Option<Value> {
        while !text.contains(want) {
            let m = ws
                .recv(WAIT)
                .unwrap_or_else(|| panic!("closed before {want:?}: {text:?}"));
            match m["type"].as_str() {
                Some("output") => {
                    assert_eq!(m["stream"], "stdout", "a terminal is one stream");
                    text.push_str(m["data"].as_str().unwrap_or_default());
                }
                Some("result") => return Some(m),
                Some("error") => panic!("{m}"),
                _ => {}
            }
        }
        None
    }
    until(&mut ws, &mut text, "$ ");
    ws.send(&json!({"type": "stdin", "data": "tty; stty size\n"}));
    until(&mut ws, &mut text, "24 80");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    ws.send(&json!({"type": "stdin", "data": "sleep 100; echo slept\n"}));
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    ws.send(&json!({"type": "stdin", "data": "\u{3}"}));
    ws.send(&json!({"type": "resize", "rows": 30, "cols": 100}));
    ws.send(&json!({"type": "stdin", "data": "echo alive; stty size\n"}));
    until(&mut ws, &mut text, "30 100");
    eprintln!("Ctrl-C to the next answer: {:?}", t.elapsed());
    assert!(text.contains("alive"), "{text:?}");
    // The typed command is echoed; its own output line "slept" must never come.
    assert!(
        !text.contains("\r\nslept\r\n"),
        "sleep ran to its end: {text:?}"
    );
    ws.send(&json!({"type": "stdin", "data": "exit 7\n"}));
    let result = until(&mut ws, &mut text, "\u{0}never").expect("the result");
    assert_eq!(result["result"]["exit_code"], 7, "{result}");
    assert_eq!(ws.close_code(), 1000);
    // A terminal on the plain route is refused with a sentence.
    let r = s.post(
        "/v1/executions",
        &json!({"language": "bash", "code": "true", "tty": {"rows": 24, "cols": 80}}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
}

/// `cloude run -i` on a real terminal (`script` gives it a pseudo-terminal): the program gets a
/// terminal in the guest (an interactive bash shows its prompt and runs what is typed), our
/// terminal is raw while it runs, and the CLI exits with the shell's code.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn cli_run_interactive_on_a_terminal() {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    let s = server("");
    let cloude = support::sibling_bin("cloude").expect("cloude binary");
    let cmd = format!(
        "{} --server {} run -i -l bash -c 'exec bash -i'",
        cloude.display(),
        s.url
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    stdin.write_all(b"echo hi-$((6*7)); tty\n").expect("type");
    std::thread::sleep(Duration::from_secs(3));
    stdin.write_all(b"exit 3\n").expect("type");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(t.elapsed() < WAIT, "cloude run -i did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    let out = reader.join().expect("reader");
    assert!(out.contains("$ "), "a prompt: {out:?}");
    assert!(out.contains("hi-42"), "{out:?}");
    assert!(
        out.contains("/dev/pts/"),
        "the program's streams are a terminal: {out:?}"
    );
    assert_eq!(status.code(), Some(3), "{out:?}");
}

/// Every VM busy and no room in the queue: the native socket's refusal says when to try again
/// (`retry_after_s`, the `Retry-After` of the HTTP routes) and closes with 1008.
#[test]
#[ignore = "boots VMs; run with --include-ignored"]
fn native_websocket_says_when_to_retry_a_full_queue() {
    // Judge0 off: its dispatcher takes a VM slot for a moment on every poll of its store, which
    // with no queue at all could refuse the first run too.
    let config = "[vm]\nprebuild = [\"bash\"]\n[limits]\nmax_concurrent_vms = 1\nmax_queue = 0\n\
                  [judge0]\nenabled = false\n";
    let s = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("interactive: {e}"));
    let mut busy = Ws::connect(&s, "/v1/executions/ws");
    busy.send(&json!({"language": "bash", "code": "echo up; sleep 100", "timeout_ms": 60000}));
    let mut seen = vec![];
    while !seen.iter().any(|m: &Value| {
        m["type"] == "output" && m["data"].as_str().is_some_and(|d| d.contains("up"))
    }) {
        seen.push(busy.recv(WAIT).expect("up"));
    }
    let mut ws = Ws::connect(&s, "/v1/executions/ws");
    ws.send(&json!({"language": "bash", "code": "echo never"}));
    let m = ws.recv(WAIT).expect("the refusal");
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["error"], "saturated", "{m}");
    assert_eq!(m["retry_after_s"], 1, "{m}");
    assert_eq!(ws.close_code(), 1008);
}
