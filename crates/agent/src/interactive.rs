//! `GET /v1/run/interactive`: a run whose standard input arrives while it runs (the protocol is
//! in [`cloude_protocol::interactive`]). The host's `Upgrade` request is answered `101`; the
//! session then runs on the upgraded byte stream, one at a time like every run.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;
use cloude_protocol::interactive::{
    signal_allowed, Input, MAX_INPUT_LINE_BYTES, MAX_INTERACTIVE_STDIN_BYTES, MAX_SIGNALS, UPGRADE,
};
use cloude_protocol::{RunRequest, StreamEvent, MAX_REQUEST_BODY_BYTES};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::executor::{Control, Controls, StdinChunk};
use crate::power;
use crate::server::{check_unsealed, AgentState, ApiError, ConnCtx};

/// Output events queued between the program and the host.
const EVENT_QUEUE: usize = 64;

/// Answers the upgrade and starts the session once the connection is handed over.
pub async fn start(
    State(state): State<Arc<AgentState>>,
    ctx: Option<Extension<ConnCtx>>,
    req: Request,
) -> Result<Response, ApiError> {
    let asked = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes() == UPGRADE.as_bytes());
    if !asked {
        return Err(ApiError::BadRequest(format!(
            "an interactive run needs the header Upgrade: {UPGRADE}"
        )));
    }
    let guard = state.busy_lock()?;
    check_unsealed(&state)?;
    let upgrade = hyper::upgrade::on(req);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(Extension(ctx)) = ctx {
        if let Ok(mut s) = ctx.session.lock() {
            *s = Some(done_rx);
        }
    }
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => {
                let poweroff = session(&state, TokioIo::new(io)).await;
                drop(guard);
                drop(done_tx);
                if poweroff {
                    power::power_off(state.poweroff_enabled).await;
                }
            }
            Err(e) => tracing::warn!("interactive run: the upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE));
    Ok(resp)
}

/// Runs one interactive session; true when the run asked for a power-off afterwards.
async fn session<IO: AsyncRead + AsyncWrite + Send + 'static>(state: &AgentState, io: IO) -> bool {
    let (rd, mut wr) = tokio::io::split(io);
    let mut rd = tokio::io::BufReader::new(rd);
    let req = match read_line(&mut rd, MAX_REQUEST_BODY_BYTES).await {
        Ok(Some(line)) => serde_json::from_slice::<RunRequest>(&line)
            .map_err(|e| format!("invalid run request: {e}"))
            .and_then(|r| r.validate().map(|()| r).map_err(|e| e.to_string())),
        Ok(None) => Err("the host sent no run request".into()),
        Err(e) => Err(format!("reading the run request: {e}")),
    };
    let req = match req {
        Ok(r) => r,
        Err(message) => {
            let _ = write_event(&mut wr, &StreamEvent::Error { message }).await;
            let _ = wr.shutdown().await;
            return false;
        }
    };
    let (controls, stdin_tx, sig_tx) = Controls::new();
    let reader = tokio::spawn(read_inputs(rd, stdin_tx, sig_tx));
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    let run = state.executor.run_with(&req, Some(tx), Some(controls));
    let mut write_failed = false;
    let forward = async {
        while let Some(ev) = rx.recv().await {
            if !write_failed && write_event(&mut wr, &ev).await.is_err() {
                // The host is gone: keep draining so the run is never blocked on us.
                write_failed = true;
            }
        }
    };
    let (result, ()) = tokio::join!(run, forward);
    reader.abort();
    let last = match result {
        Ok(result) => StreamEvent::Result { result },
        Err(e) => StreamEvent::Error {
            message: ApiError::from(e).to_string(),
        },
    };
    if !write_failed {
        let _ = write_event(&mut wr, &last).await;
    }
    let _ = wr.shutdown().await;
    req.poweroff_after
}

/// Reads the host's [`Input`] lines into the run's controls until its side ends (which closes
/// the program's standard input) or it breaks the protocol or a cap (which does too).
async fn read_inputs<R: AsyncBufRead + Unpin>(
    mut rd: R,
    stdin: mpsc::UnboundedSender<StdinChunk>,
    control: mpsc::UnboundedSender<Control>,
) {
    let mut stdin_bytes = 0usize;
    let mut signal_count = 0usize;
    loop {
        let line = match read_line(&mut rd, MAX_INPUT_LINE_BYTES).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("interactive input ended: {e}");
                return;
            }
        };
        match serde_json::from_slice::<Input>(&line) {
            Ok(Input::Stdin { data }) => {
                stdin_bytes = stdin_bytes.saturating_add(data.0.len());
                if stdin_bytes > MAX_INTERACTIVE_STDIN_BYTES {
                    tracing::warn!(
                        "interactive stdin over {MAX_INTERACTIVE_STDIN_BYTES} bytes: closed"
                    );
                    return;
                }
                let _ = stdin.send(StdinChunk::Data(data.0));
            }
            Ok(Input::CloseStdin) => {
                let _ = stdin.send(StdinChunk::Close);
            }
            Ok(Input::Signal { signal }) => {
                signal_count += 1;
                if signal_count > MAX_SIGNALS || !signal_allowed(signal) {
                    tracing::warn!("interactive signal {signal} refused (#{signal_count})");
                    return;
                }
                let _ = control.send(Control::Signal(signal));
            }
            Ok(Input::Resize { rows, cols }) => {
                signal_count += 1;
                let size = cloude_protocol::TtySize { rows, cols };
                if signal_count > MAX_SIGNALS || size.validate().is_err() {
                    tracing::warn!("interactive resize {rows}x{cols} refused (#{signal_count})");
                    return;
                }
                let _ = control.send(Control::Resize(rows, cols));
            }
            Err(e) => {
                tracing::warn!("interactive input ended: invalid line: {e}");
                return;
            }
        }
    }
}

/// One line without its newline, at most `max` bytes (`None` at end of input; a longer line is
/// an error, read no further).
pub async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = rd.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            if line.len() + i > max {
                return Err(std::io::Error::other(format!("a line is over {max} bytes")));
            }
            line.extend_from_slice(&buf[..i]);
            rd.consume(i + 1);
            return Ok(Some(line));
        }
        let n = buf.len();
        if line.len() + n > max {
            return Err(std::io::Error::other(format!("a line is over {max} bytes")));
        }
        line.extend_from_slice(buf);
        rd.consume(n);
    }
}

async fn write_event<W: AsyncWrite + Unpin>(wr: &mut W, ev: &StreamEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut r = tokio::io::BufReader::with_capacity(4, &b"ab\ncdefgh\nlast"[..]);
        assert_eq!(
            read_line(&mut r, 5).await.expect("read"),
            Some(b"ab".to_vec())
        );
        assert!(read_line(&mut r, 5).await.is_err());
        let mut r = tokio::io::BufReader::new(&b"last"[..]);
        assert_eq!(
            read_line(&mut r, 5).await.expect("read"),
            Some(b"last".to_vec())
        );
        assert_eq!(read_line(&mut r, 5).await.expect("read"), None);
    }
}
