//! `cloude run -i`: the program's standard input and output connected to this terminal (or
//! pipe) while it runs, over `/v1/executions/ws`. Input goes line by line as it is typed (end
//! of input closes the program's); output appears as the program writes it.

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

/// Runs `req` interactively; the final answer, or the server's error.
pub fn run(server: &str, req: &ExecutionRequest) -> anyhow::Result<ExecutionResponse> {
    let hostport = server
        .strip_prefix("http://")
        .context("interactive runs need an http:// server URL")?
        .trim_end_matches('/');
    let stream =
        TcpStream::connect(hostport).with_context(|| format!("cannot connect to {hostport}"))?;
    let (mut ws, _) = tungstenite::client(format!("ws://{hostport}/v1/executions/ws"), stream)
        .context("WebSocket handshake")?;
    ws.send(Message::Text(serde_json::to_string(req)?))?;
    ws.get_mut().set_read_timeout(Some(POLL))?;
    let ws: Socket = Arc::new(Mutex::new(ws));
    let input = ws.clone();
    std::thread::spawn(move || forward_stdin(&input));
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        let msg = {
            let mut ws = ws.lock().map_err(|_| anyhow::anyhow!("socket lock"))?;
            match ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => anyhow::bail!("the connection ended: {e}"),
            }
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(f) => anyhow::bail!(
                "the server closed the connection without a result{}",
                f.map(|f| format!(": {}", f.reason)).unwrap_or_default()
            ),
            _ => continue,
        };
        match serde_json::from_str::<StreamLine>(&text)? {
            StreamLine::Output { stream, data, .. } => {
                let w: &mut dyn std::io::Write = match stream {
                    StreamKind::Stdout => &mut out,
                    StreamKind::Stderr => &mut err,
                };
                let _ = w.write_all(data.as_bytes());
                let _ = w.flush();
            }
            StreamLine::Result { result } => return Ok(*result),
            StreamLine::Error { error, message } => anyhow::bail!("{error}: {message}"),
            StreamLine::Stage { .. } | StreamLine::Exit { .. } => {}
        }
    }
}

/// Sends each line of our standard input as it comes, then the end of input.
fn forward_stdin(ws: &Socket) {
    let send = |m: &WsInput| {
        let Ok(text) = serde_json::to_string(m) else {
            return false;
        };
        ws.lock()
            .map(|mut ws| ws.send(Message::Text(text)).is_ok())
            .unwrap_or(false)
    };
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
