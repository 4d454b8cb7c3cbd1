//! `cloude run -i`: the program's standard input and output connected to this terminal (or
//! pipe) while it runs, over `/v1/executions/ws`. On a pipe, input goes line by line (end of
//! input closes the program's). On a terminal the program gets a terminal of the same size in
//! the guest and ours is put in raw mode (restored on exit, whatever the exit): every key goes
//! as typed, so Ctrl-C interrupts the program's foreground job, not this client; a change of our
//! window's size (`SIGWINCH`) is sent as a resize.

use std::io::BufRead as _;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use cloude_api::{ExecutionRequest, ExecutionResponse, StreamKind, StreamLine, WsInput};
use tungstenite::{Message, WebSocket};

/// How long a read waits before the input side gets the socket.
const POLL: Duration = Duration::from_millis(20);

type Socket = Arc<Mutex<WebSocket<TcpStream>>>;

/// Runs `req` interactively (on a terminal when ours is one); the final answer, or the
/// server's error.
pub fn run(server: &str, req: &ExecutionRequest) -> anyhow::Result<ExecutionResponse> {
    use std::io::IsTerminal as _;
    let mut req = req.clone();
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let _raw = if tty {
        req.tty = Some(terminal_size().unwrap_or(cloude_api::TtySize { rows: 24, cols: 80 }));
        Some(RawMode::enter()?)
    } else {
        None
    };
    talk(server, &req, tty)
}

/// Opens the WebSocket at `path` on `server`, sends `first`, and starts sending our input
/// (keys on a terminal, lines on a pipe) on a thread of its own.
fn open(server: &str, path: &str, first: String, tty: bool) -> anyhow::Result<Socket> {
    let hostport = server
        .strip_prefix("http://")
        .context("interactive runs need an http:// server URL")?
        .trim_end_matches('/');
    let stream =
        TcpStream::connect(hostport).with_context(|| format!("cannot connect to {hostport}"))?;
    let (mut ws, _) = tungstenite::client(format!("ws://{hostport}{path}"), stream)
        .context("WebSocket handshake")?;
    ws.send(Message::Text(first))?;
    ws.get_mut().set_read_timeout(Some(POLL))?;
    let ws: Socket = Arc::new(Mutex::new(ws));
    let input = ws.clone();
    std::thread::spawn(move || {
        if tty {
            forward_keys(&input)
        } else {
            forward_stdin(&input)
        }
    });
    if tty {
        let resizes = ws.clone();
        let mut winch = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH])
            .context("watching SIGWINCH")?;
        std::thread::spawn(move || forward_resizes(&resizes, &mut winch));
    }
    Ok(ws)
}

/// Sends our terminal's new size whenever it changes (`SIGWINCH`), so that the program's
/// terminal in the guest follows (full-screen programs redraw; `stty size` tells).
fn forward_resizes(ws: &Socket, winch: &mut signal_hook::iterator::Signals) {
    for _ in winch.forever() {
        let Some(size) = terminal_size() else {
            continue;
        };
        let m = WsInput::Resize {
            rows: size.rows,
            cols: size.cols,
        };
        if !send_input(ws, &m) {
            return;
        }
    }
}

/// The next text message (`None`: the server closed, with its reason).
fn next_text(ws: &Socket) -> anyhow::Result<Result<String, String>> {
    loop {
        let msg = {
            let mut ws = ws.lock().map_err(|_| anyhow::anyhow!("socket lock"))?;
            match ws.read() {
                Ok(m) => m,
                // A poll that timed out, or a signal (SIGWINCH) that cut the wait short.
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => anyhow::bail!("the connection ended: {e}"),
            }
        };
        match msg {
            Message::Text(t) => return Ok(Ok(t)),
            Message::Close(f) => {
                return Ok(Err(f.map(|f| f.reason.to_string()).unwrap_or_default()))
            }
            _ => continue,
        }
    }
}

/// `cloude sandbox shell`: `argv` (default an interactive login bash) on a terminal in sandbox
/// `id`, connected to ours (raw, restored on exit) or to our pipes; its exit code (128+N for a
/// signal).
pub fn shell(server: &str, id: &str, argv: Vec<String>, root: bool) -> anyhow::Result<u8> {
    use cloude_api::sandbox::{ExecLine, ShellIn};
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let first = ShellIn {
        argv: (!argv.is_empty()).then_some(argv),
        tty: Some(terminal_size().unwrap_or(cloude_api::TtySize { rows: 24, cols: 80 })),
        user: root.then(|| "root".to_string()),
        ..Default::default()
    };
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    let path = format!("/v1/sandboxes/{}/shell", cloude_api::query_escape(id));
    let ws = open(server, &path, serde_json::to_string(&first)?, tty)?;
    let mut out = std::io::stdout();
    loop {
        let text = match next_text(&ws)? {
            Ok(t) => t,
            Err(reason) => anyhow::bail!("the server closed the shell: {reason}"),
        };
        match serde_json::from_str::<ExecLine>(&text)? {
            ExecLine::Output(c) => {
                use base64::Engine as _;
                let bytes = match &c.data_base64 {
                    Some(b) => base64::engine::general_purpose::STANDARD.decode(b)?,
                    None => c.text.into_bytes(),
                };
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
            ExecLine::Exit(e) => {
                let code = match (
                    e.exit_code,
                    e.signal.as_deref().and_then(cloude_api::signal_number),
                ) {
                    (Some(c), _) => u8::try_from(c.clamp(0, 255)).unwrap_or(1),
                    (None, Some(n)) => u8::try_from(128 + n.clamp(0, 127)).unwrap_or(1),
                    (None, None) => 1,
                };
                return Ok(code);
            }
            ExecLine::Error { error, message } => anyhow::bail!("{error}: {message}"),
            ExecLine::Started { .. } => {}
        }
    }
}

fn talk(server: &str, req: &ExecutionRequest, tty: bool) -> anyhow::Result<ExecutionResponse> {
    let ws = open(
        server,
        "/v1/executions/ws",
        serde_json::to_string(req)?,
        tty,
    )?;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        let text = match next_text(&ws)? {
            Ok(t) => t,
            Err(reason) => anyhow::bail!(
                "the server closed the connection without a result{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ),
        };
        match serde_json::from_str::<StreamLine>(&text)? {
            StreamLine::Output { stream, data, .. } => {
                let w: &mut dyn std::io::Write = match stream {
                    StreamKind::Stdout => &mut out,
                    StreamKind::Stderr => &mut err,
                };
                // A terminal in raw mode ends lines with \r\n itself (the guest's sends them).
                let _ = w.write_all(data.as_bytes());
                let _ = w.flush();
            }
            StreamLine::Result { result } => return Ok(*result),
            StreamLine::Error { error, message, .. } => anyhow::bail!("{error}: {message}"),
            StreamLine::Stage { .. } | StreamLine::Exit { .. } => {}
        }
    }
}

/// Sends one input message; false once the socket is gone.
fn send_input(ws: &Socket, m: &WsInput) -> bool {
    let Ok(text) = serde_json::to_string(m) else {
        return false;
    };
    ws.lock()
        .map(|mut ws| ws.send(Message::Text(text)).is_ok())
        .unwrap_or(false)
}

/// Sends each line of our standard input as it comes, then the end of input.
fn forward_stdin(ws: &Socket) {
    let send = |m: &WsInput| send_input(ws, m);
    let stdin = std::io::stdin();
    let mut lock = stdin.lock();
    let mut line = String::new();
    loop {
        line.clear();
        match lock.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let m = WsInput::Stdin {
                    data: Some(line.clone()),
                    data_base64: None,
                };
                if !send(&m) {
                    return;
                }
            }
        }
    }
    send(&WsInput::CloseStdin);
}

/// Sends every byte of our (raw) terminal as it is typed.
fn forward_keys(ws: &Socket) {
    use base64::Engine as _;
    use std::io::Read as _;
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let m = WsInput::Stdin {
            data: None,
            data_base64: Some(base64::engine::general_purpose::STANDARD.encode(&buf[..n])),
        };
        if !send_input(ws, &m) {
            return;
        }
    }
}

/// Our terminal's size (`stty size` on our standard input).
fn terminal_size() -> Option<cloude_api::TtySize> {
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(std::process::Stdio::inherit())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let size = cloude_api::TtySize {
        rows: it.next()?.ok()?,
        cols: it.next()?.ok()?,
    };
    size.validate().ok().map(|()| size)
}

/// Our terminal in raw mode until dropped (then as it was: `stty -g` saved, restored).
struct RawMode {
    saved: String,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stty = |args: &[&str]| {
            std::process::Command::new("stty")
                .args(args)
                .stdin(std::process::Stdio::inherit())
                .output()
        };
        let saved = stty(&["-g"]).context("stty -g")?;
        anyhow::ensure!(saved.status.success(), "stty -g failed");
        let saved = String::from_utf8_lossy(&saved.stdout).trim().to_string();
        let raw = stty(&["raw", "-echo"]).context("stty raw")?;
        anyhow::ensure!(raw.status.success(), "stty raw -echo failed");
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty")
            .arg(&self.saved)
            .stdin(std::process::Stdio::inherit())
            .status();
    }
}
