//! Hostile requests: every one gets a clear 4xx JSON error naming the problem — never a 500,
//! a hang or a VM. Plus slowloris (headers and body) and a client that gives up mid-body.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::checks::Checks;
use crate::raw;
use crate::support::Server;

/// A bad request answers at once (no VM): generous for a loaded 2-core machine.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);
/// The server's header and body read timeouts are 30 s; give it this long to cut a slow client.
const SLOW_CUTOFF: Duration = Duration::from_secs(45);
/// How long a slow client keeps dribbling before the test gives up on the server.
const SLOW_GIVE_UP: Duration = Duration::from_secs(75);

struct Case {
    name: String,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    /// The field the error must name (native API), or a word its message must contain.
    names: Option<&'static str>,
}

fn case(name: &str, body: impl Into<Vec<u8>>, status: u16, names: Option<&'static str>) -> Case {
    Case {
        name: name.to_string(),
        path: "/v1/executions",
        body: body.into(),
        status,
        names,
    }
}

fn j(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).expect("json")
}

fn files(names: &[&str]) -> Vec<u8> {
    let f: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "content": "echo hi"}))
        .collect();
    j(json!({"language": "bash", "files": f}))
}

fn cases() -> Vec<Case> {
    let big = "x".repeat(1024 * 1024 + 1);
    let mut v = vec![
        case("malformed JSON", "{not json", 400, None),
        case(
            "truncated JSON",
            r#"{"language": "python", "code": "x""#,
            400,
            None,
        ),
        case("JSON array instead of object", "[1, 2]", 400, None),
        case("empty body", "", 400, None),
        case(
            "language of the wrong type",
            j(json!({"language": 5, "code": "x"})),
            400,
            Some("language"),
        ),
        case(
            "timeout_ms as a string",
            j(json!({"language": "bash", "code": "x", "timeout_ms": "10"})),
            400,
            Some("timeout_ms"),
        ),
        case(
            "args not an array",
            j(json!({"language": "bash", "code": "x", "args": "a b"})),
            400,
            Some("args"),
        ),
        case(
            "args with a number",
            j(json!({"language": "bash", "code": "x", "args": [1]})),
            400,
            Some("args[0]"),
        ),
        case(
            "files not an array",
            j(json!({"language": "bash", "files": {"a": 1}})),
            400,
            Some("files"),
        ),
        case(
            "network as a string",
            j(json!({"language": "bash", "code": "x", "network": "yes"})),
            400,
            Some("network"),
        ),
        case(
            "unknown field",
            j(json!({"language": "bash", "code": "x", "evil": 1})),
            400,
            Some("evil"),
        ),
        case(
            "missing language",
            j(json!({"code": "x"})),
            400,
            Some("language"),
        ),
        case(
            "missing code and files",
            j(json!({"language": "bash"})),
            422,
            Some("code"),
        ),
        case(
            "file without content",
            j(json!({"language": "bash", "files": [{"name": "a.sh"}]})),
            400,
            Some("files[0].content"),
        ),
        case(
            "unknown language",
            j(json!({"language": "no-such-language", "code": "x"})),
            422,
            Some("language"),
        ),
        case(
            "unknown version",
            j(json!({"language": "python", "version": "9.9", "code": "x"})),
            422,
            Some("version"),
        ),
        case(
            "empty code",
            j(json!({"language": "python", "code": ""})),
            422,
            Some("code"),
        ),
        case(
            "code and files both",
            j(json!({"language": "bash", "code": "x", "files": [{"name": "a", "content": "y"}]})),
            422,
            Some("files"),
        ),
        case(
            "code over the limit",
            j(json!({"language": "bash", "code": big})),
            413,
            Some("code"),
        ),
        case(
            "stdin over the limit",
            j(json!({"language": "bash", "code": "cat", "stdin": big})),
            413,
            Some("stdin"),
        ),
        case(
            "body over the body limit (5 MiB)",
            j(json!({"language": "bash", "code": "x".repeat(5 << 20)})),
            413,
            None,
        ),
        case(
            "negative timeout",
            j(json!({"language": "bash", "code": "x", "timeout_ms": -1})),
            400,
            Some("timeout_ms"),
        ),
        case(
            "zero timeout",
            j(json!({"language": "bash", "code": "x", "timeout_ms": 0})),
            422,
            Some("timeout_ms"),
        ),
        case(
            "huge timeout",
            j(json!({"language": "bash", "code": "x", "timeout_ms": 1_000_000_000_000u64})),
            422,
            Some("timeout_ms"),
        ),
        case(
            "timeout beyond u64",
            r#"{"language": "bash", "code": "x", "timeout_ms": 1e30}"#,
            400,
            Some("timeout_ms"),
        ),
        case(
            "huge compile timeout",
            j(json!({"language": "c", "code": "x", "compile_timeout_ms": u64::MAX})),
            422,
            Some("compile_timeout_ms"),
        ),
        case(
            "negative memory",
            j(json!({"language": "bash", "code": "x", "memory_mib": -1})),
            400,
            Some("memory_mib"),
        ),
        case(
            "tiny memory",
            j(json!({"language": "bash", "code": "x", "memory_mib": 1})),
            422,
            Some("memory_mib"),
        ),
        case(
            "huge memory",
            j(json!({"language": "bash", "code": "x", "memory_mib": 1_000_000_000u64})),
            422,
            Some("memory_mib"),
        ),
        case(
            "invalid UTF-8 inside a string",
            b"{\"language\": \"bash\", \"code\": \"echo \xff\xfe\"}".to_vec(),
            400,
            Some("code"),
        ),
        case(
            "invalid UTF-8 after the object",
            b"{\"language\": \"bash\", \"code\": \"x\"}\xc3\x28".to_vec(),
            400,
            None,
        ),
        case(
            "lone surrogate escape",
            r#"{"language": "bash", "code": "x", "stdin": "\ud800"}"#,
            400,
            Some("stdin"),
        ),
        case(
            "file name with ../",
            files(&["../evil.sh"]),
            422,
            Some("files[0].name"),
        ),
        case(
            "file name escaping through a dir",
            files(&["main.sh", "a/../../evil"]),
            422,
            Some("files[1].name"),
        ),
        case(
            "absolute file name",
            files(&["/etc/passwd"]),
            422,
            Some("files[0].name"),
        ),
        case(
            "file name with NUL",
            files(&["a\0b.sh"]),
            422,
            Some("files[0].name"),
        ),
        case(
            "file name with a backslash",
            files(&["a\\..\\b"]),
            422,
            Some("files[0].name"),
        ),
        case(
            "file name too long",
            files(&[&"n".repeat(300)]),
            422,
            Some("files[0].name"),
        ),
        case(
            "duplicate file names",
            files(&["main.sh", "lib.sh", "main.sh"]),
            422,
            Some("files[2].name"),
        ),
        case(
            "unknown encoding",
            j(
                json!({"language": "bash", "files": [{"name": "a", "content": "x", "encoding": "rot13"}]}),
            ),
            422,
            Some("files[0].encoding"),
        ),
        case(
            "bad base64 content",
            j(
                json!({"language": "bash", "files": [{"name": "a", "content": "!!!", "encoding": "base64"}]}),
            ),
            422,
            Some("files[0].content"),
        ),
        case(
            "argument with NUL",
            j(json!({"language": "bash", "code": "x", "args": ["ok", "a\u{0}b"]})),
            422,
            Some("args[1]"),
        ),
        case(
            "thousands of args",
            j(json!({"language": "bash", "code": "x", "args": vec!["a"; 5000]})),
            422,
            Some("args"),
        ),
        case(
            "network refused",
            j(json!({"language": "bash", "code": "x", "network": true})),
            422,
            Some("network"),
        ),
    ];
    let many: Vec<String> = (0..5000).map(|i| format!("f{i}.sh")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    v.push(case(
        "thousands of files (5000)",
        files(&many),
        422,
        Some("files"),
    ));
    // Piston v2: 400 {"message"} on bad input.
    for (name, body) in [
        ("piston: malformed JSON", b"{oops".to_vec()),
        (
            "piston: missing language",
            j(json!({"version": "*", "files": [{"content": "x"}]})),
        ),
        (
            "piston: unknown runtime",
            j(json!({"language": "python", "version": "9.9", "files": [{"content": "x"}]})),
        ),
        (
            "piston: files not an array",
            j(json!({"language": "python", "version": "*", "files": "x"})),
        ),
        (
            "piston: file name with ../",
            j(
                json!({"language": "python", "version": "*", "files": [{"name": "../x.py", "content": "x"}]}),
            ),
        ),
    ] {
        v.push(Case {
            name: name.to_string(),
            path: "/api/v2/execute",
            body,
            status: 400,
            names: None,
        });
    }
    v
}

/// Sends every hostile request and checks each answer.
pub fn run(server: &Server, c: &mut Checks) {
    let vms_before = server.children().len();
    for k in cases() {
        c.bad_requests += 1;
        let t = Instant::now();
        let r = raw::post(server.addr, k.path, &k.body, ANSWER_WITHIN);
        let took = t.elapsed();
        let name = format!("bad request: {}", k.name);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                c.check(&name, false, e);
                continue;
            }
        };
        let v = r.json().unwrap_or(Value::Null);
        let message = v["message"].as_str().unwrap_or("");
        let piston = k.path.starts_with("/api/v2");
        let shape_ok = if piston {
            !message.is_empty() && v.get("error").is_none()
        } else {
            !message.is_empty() && v["error"].as_str().is_some_and(|e| !e.is_empty())
        };
        let named = match k.names {
            None => true,
            Some(f) => v["field"] == f || message.contains(f),
        };
        c.check(
            &name,
            r.status == k.status && shape_ok && named && took < ANSWER_WITHIN,
            format!(
                "want {} naming {:?}; got {} in {} ms: {}",
                k.status,
                k.names,
                r.status,
                took.as_millis(),
                String::from_utf8_lossy(&r.body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ),
        );
    }
    // Wrong method and unknown route: still JSON errors.
    for (name, raw_req, want) in [
        (
            "GET on the executions route",
            "GET /v1/executions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            405,
        ),
        (
            "unknown route",
            "POST /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
            404,
        ),
    ] {
        c.bad_requests += 1;
        let r = raw::send(server.addr, raw_req.as_bytes(), ANSWER_WITHIN);
        let ok = r.as_ref().is_ok_and(|r| {
            r.status == want
                && r.json()
                    .is_some_and(|v| v["message"].as_str().is_some_and(|m| !m.is_empty()))
        });
        c.check(&format!("bad request: {name}"), ok, format!("{r:?}"));
    }
    // A client that sends half a body and goes away.
    c.bad_requests += 1;
    let gone = (|| -> std::io::Result<()> {
        let mut s = TcpStream::connect(server.addr)?;
        s.write_all(b"POST /v1/executions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"language\": \"bash\", ")?;
        Ok(())
    })();
    c.check(
        "bad request: half a body, then gone",
        gone.is_ok(),
        format!("{gone:?}"),
    );
    let vms_after = server.children().len();
    c.check(
        "bad requests start no VM",
        vms_before == 0 && vms_after == 0,
        format!("{vms_before} then {vms_after} VM processes"),
    );
    let h = server.get("/healthz");
    c.check("healthy after bad requests", h.status == 200, h.text());
}

/// When and how the server ended a slow client (elapsed, HTTP status if it answered).
type SlowResult = Result<(Duration, Option<u16>), String>;

/// Two slow clients running in the background: one sends its headers a byte a second, the other
/// sends headers and then its body a byte a second.
pub struct Slowloris {
    handles: Vec<(&'static str, JoinHandle<SlowResult>)>,
}

pub fn start_slowloris(addr: SocketAddr) -> Slowloris {
    let headers =
        b"POST /v1/executions HTTP/1.1\r\nHost: slow\r\nContent-Length: 40\r\n\r\n".to_vec();
    let body_slow = std::thread::spawn(move || {
        dribble(
            addr,
            &headers,
            b"{\"language\": \"bash\", \"code\": \"echo x\"}",
        )
    });
    let head_slow = std::thread::spawn(move || {
        dribble(addr, b"", b"POST /v1/executions HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    });
    Slowloris {
        handles: vec![("body", body_slow), ("headers", head_slow)],
    }
}

/// Sends `prefix` at once, then `slow` one byte a second until the server answers or closes.
/// Returns when that happened and the status of the answer (if any).
fn dribble(
    addr: SocketAddr,
    prefix: &[u8],
    slow: &[u8],
) -> Result<(Duration, Option<u16>), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    s.write_all(prefix).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut i = 0;
    loop {
        if t.elapsed() > SLOW_GIVE_UP {
            return Err(format!(
                "still connected after {} s",
                SLOW_GIVE_UP.as_secs()
            ));
        }
        if let Some(b) = slow.get(i % slow.len().max(1)) {
            if s.write_all(std::slice::from_ref(b)).is_err() {
                return Ok((t.elapsed(), raw::parse(&got).ok().map(|r| r.status)));
            }
        }
        i += 1;
        let mut buf = [0u8; 4096];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => return Ok((t.elapsed(), raw::parse(&got).ok().map(|r| r.status))),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok((t.elapsed(), raw::parse(&got).ok().map(|r| r.status))),
        }
    }
}

/// Joins the slow clients: each must have been cut off by the server in time (the other
/// phases ran meanwhile, so other clients were served).
pub fn finish_slowloris(s: Slowloris, server: &Server, c: &mut Checks) {
    for (kind, h) in s.handles {
        c.faults += 1;
        c.bad_requests += 1;
        let r = h.join().expect("slowloris thread");
        let ok = match &r {
            Ok((took, status)) => {
                *took < SLOW_CUTOFF && (kind == "headers" || *status == Some(408))
            }
            Err(_) => false,
        };
        c.check(
            &format!("slowloris ({kind}) cut off by the server"),
            ok,
            format!("{r:?}"),
        );
        if let Ok((took, status)) = r {
            c.note(format!(
                "slowloris {kind}: cut after {} s, answer {status:?}",
                took.as_secs()
            ));
        }
    }
    let h = server.get("/healthz");
    c.check("healthy after slowloris", h.status == 200, h.text());
}
