//! `cloude mcp`: the MCP server a desktop agent launches (stdio). It carries each JSON-RPC
//! message from our standard input to the server's `/mcp` (Streamable HTTP) and writes the
//! answers back, one per line; the tools themselves are the server's (`api/mcp` in
//! cloude-server), so they are defined once. Messages are passed through, not interpreted:
//! only the `id` is read, to answer a request the server could not take with a JSON-RPC error.

use std::io::{BufRead as _, Read as _, Write as _};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Longest message we take from the agent (code and files ride in tool arguments).
const MAX_LINE_BYTES: usize = 16 << 20;
/// Longest answer we read from the server.
const MAX_ANSWER_BYTES: u64 = 256 << 20;
/// Requests forwarded at once (each is a blocking HTTP request on a thread of its own).
const MAX_IN_FLIGHT: usize = 16;
/// A tool call may run a program for minutes.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Serves stdio until our standard input ends.
pub fn run(server: &str) -> anyhow::Result<u8> {
    let url = format!("{}/mcp", server.trim_end_matches('/'));
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(ANSWER_TIMEOUT)
        .build();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let slots = Arc::new((Mutex::new(0usize), Condvar::new()));
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut line = Vec::new();
    let mut threads = Vec::new();
    loop {
        line.clear();
        let n = input
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if line.len() > MAX_LINE_BYTES {
            anyhow::bail!("a message is longer than {MAX_LINE_BYTES} bytes");
        }
        let msg = String::from_utf8_lossy(&line).trim().to_string();
        if msg.is_empty() {
            continue;
        }
        {
            let (count, cv) = &*slots;
            let mut c = count.lock().map_err(|_| anyhow::anyhow!("lock"))?;
            while *c >= MAX_IN_FLIGHT {
                c = cv.wait(c).map_err(|_| anyhow::anyhow!("lock"))?;
            }
            *c += 1;
        }
        let (agent, url, out, slots) = (agent.clone(), url.clone(), out.clone(), slots.clone());
        threads.push(std::thread::spawn(move || {
            for answer in forward(&agent, &url, &msg) {
                if let Ok(mut o) = out.lock() {
                    let _ = writeln!(o, "{answer}");
                    let _ = o.flush();
                }
            }
            let (count, cv) = &*slots;
            if let Ok(mut c) = count.lock() {
                *c -= 1;
                cv.notify_one();
            }
        }));
        threads.retain(|t| !t.is_finished());
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(0)
}

/// Posts one message; the messages to write back (none for a notification).
fn forward(agent: &ureq::Agent, url: &str, msg: &str) -> Vec<String> {
    let id = serde_json::from_str::<serde_json::Value>(msg)
        .ok()
        .and_then(|v| v.get("id").cloned());
    let fail = |why: String| match &id {
        Some(id) => vec![serde_json::json!({
            "jsonrpc": "2.0", "id": id,
            "error": {"code": -32603, "message": format!("cloude mcp: {why}")}
        })
        .to_string()],
        None => {
            eprintln!("cloude mcp: {why}");
            vec![]
        }
    };
    let resp = agent
        .post(url)
        .set("content-type", "application/json")
        .set("accept", "application/json, text/event-stream")
        .send_string(msg);
    let resp = match resp {
        Ok(r) => r,
        // The server's own JSON-RPC error (a malformed message, say) is the answer.
        Err(ureq::Error::Status(status, r)) => {
            let body = read(r).unwrap_or_default();
            return match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) if v.get("jsonrpc").is_some() => vec![v.to_string()],
                _ => fail(format!("the server answered {status}: {}", body.trim())),
            };
        }
        Err(e) => return fail(format!("cannot reach {url}: {e}")),
    };
    if resp.status() == 202 {
        return vec![];
    }
    let sse = resp.content_type().starts_with("text/event-stream");
    let body = match read(resp) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if !sse {
        return vec![body.trim().to_string()];
    }
    // Server-sent events: each event's `data:` lines joined make one message.
    let mut msgs = Vec::new();
    let mut data = String::new();
    for l in body.lines().chain(std::iter::once("")) {
        if let Some(d) = l.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        } else if l.is_empty() && !data.is_empty() {
            msgs.push(std::mem::take(&mut data));
        }
    }
    msgs
}

fn read(r: ureq::Response) -> Result<String, String> {
    let mut body = String::new();
    r.into_reader()
        .take(MAX_ANSWER_BYTES)
        .read_to_string(&mut body)
        .map_err(|e| format!("reading the server's answer: {e}"))?;
    Ok(body)
}
