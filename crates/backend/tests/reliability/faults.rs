//! Faults: a hypervisor killed mid-run, clients that disconnect mid-run, SIGTERM (idle and
//! under load).

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::checks::{short, Checks};
use crate::leaks::{dead, processes_mentioning, LeakProbe};
use crate::raw;
use crate::support::Server;

/// Time for a VM to boot under emulation on a loaded machine before we hit it.
const LET_IT_BOOT: Duration = Duration::from_secs(8);

/// Waits until the server has at least `n` children; returns them in pid order.
fn wait_children(server: &Server, n: usize, within: Duration) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let mut kids = server.children();
        kids.sort_unstable();
        if kids.len() >= n || t.elapsed() > within {
            return kids;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    body: &Value,
    within: Duration,
) -> Result<raw::RawResponse, String> {
    raw::post(addr, path, &serde_json::to_vec(body).expect("json"), within)
}

/// `kill -9` of one hypervisor mid-run: that request gets `internal_error` with a clear
/// message; a concurrent request is unaffected.
pub fn hypervisor_kill(server: &Server, c: &mut Checks) {
    c.faults += 1;
    let addr = server.addr;
    let victim = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/executions",
            &json!({"language": "bash", "code": "echo started; sleep 60", "timeout_ms": 60000}),
            Duration::from_secs(180),
        )
    });
    let first = wait_children(server, 1, Duration::from_secs(30));
    let other = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/executions",
            &json!({"language": "bash", "code": "sleep 4; echo bystander-ok", "timeout_ms": 30000}),
            Duration::from_secs(180),
        )
    });
    std::thread::sleep(LET_IT_BOOT);
    let Some(&pid) = first.first() else {
        c.check(
            "hypervisor kill: a VM to kill",
            false,
            "no VM process appeared",
        );
        return;
    };
    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let t = Instant::now();
    let r = victim.join().expect("thread");
    let answered = t.elapsed();
    let v = r
        .as_ref()
        .ok()
        .and_then(raw::RawResponse::json)
        .unwrap_or(Value::Null);
    let msg = v["message"].as_str().unwrap_or("");
    c.check(
        "hypervisor kill -9 mid-run -> internal_error with a clear message",
        killed.is_ok_and(|s| s.success())
            && r.as_ref().is_ok_and(|r| r.status == 200)
            && v["status"] == "internal_error"
            && (msg.contains("stopped unexpectedly") || msg.contains("failed to start")),
        format!("{r:?}"),
    );
    c.note(format!(
        "killed hypervisor {pid}: answered {} ms later: {msg}",
        answered.as_millis()
    ));
    let r = other.join().expect("thread");
    let v = r
        .as_ref()
        .ok()
        .and_then(raw::RawResponse::json)
        .unwrap_or(Value::Null);
    c.check(
        "concurrent request unaffected by the kill",
        v["status"] == "ok" && v["stdout"] == "bystander-ok\n",
        short(&v),
    );
}

/// A client that disconnects mid-run (plain and streaming): its VM is killed within seconds.
pub fn client_disconnect(server: &Server, c: &mut Checks) {
    for path in ["/v1/executions", "/v1/executions/stream"] {
        c.faults += 1;
        let body = serde_json::to_vec(
            &json!({"language": "bash", "code": "sleep 60", "timeout_ms": 60000}),
        )
        .expect("json");
        let mut s = TcpStream::connect(server.addr).expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(&body))
            .expect("send");
        let kids = wait_children(server, 1, Duration::from_secs(30));
        std::thread::sleep(LET_IT_BOOT);
        drop(s);
        let t = Instant::now();
        while !kids
            .iter()
            .all(|&p| dead(p) || !server.children().contains(&p))
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let gone = kids
            .iter()
            .all(|&p| dead(p) || !server.children().contains(&p));
        c.check(
            &format!("client disconnect on {path}: VM killed within 5 s"),
            kids.len() == 1 && gone,
            format!(
                "VMs {kids:?}, still there after {} ms",
                t.elapsed().as_millis()
            ),
        );
        c.note(format!(
            "disconnect on {path}: VM gone {} ms after the client left",
            t.elapsed().as_millis()
        ));
    }
}

/// Sends SIGTERM and waits for the process to end (it stays a zombie until `stop` reaps it).
fn term_and_wait(server: &Server, within: Duration) -> Option<Duration> {
    let pid = server.pid();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let t = Instant::now();
    while t.elapsed() < within {
        if dead(pid) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn after_exit(server: Server, probe: &LeakProbe, label: &str, c: &mut Checks) {
    let procs = processes_mentioning(&probe.server_rt, server.pid());
    let rt_left = probe.server_rt.exists();
    c.leaks += procs.len() + usize::from(rt_left);
    c.check(
        &format!("{label}: no VM process survives the server"),
        procs.is_empty(),
        format!("{procs:?}"),
    );
    c.check(
        &format!("{label}: runtime dir removed at exit"),
        !rt_left,
        format!("{} still exists", probe.server_rt.display()),
    );
    let status = server.stop(Duration::from_secs(10));
    c.check(
        &format!("{label}: exit status 0"),
        matches!(&status, Ok(s) if s.success()),
        format!("{status:?}"),
    );
}

/// SIGTERM to an idle server: prompt clean exit.
pub fn sigterm_idle_exit(server: Server, probe: &LeakProbe, c: &mut Checks) {
    c.faults += 1;
    let took = term_and_wait(&server, Duration::from_secs(30));
    c.check(
        "SIGTERM (idle): server exits",
        took.is_some(),
        "still running after 30 s",
    );
    if let Some(t) = took {
        c.note(format!(
            "idle server exited {} ms after SIGTERM",
            t.as_millis()
        ));
    }
    after_exit(server, probe, "SIGTERM (idle)", c);
}

/// SIGTERM with VMs running and requests queued: in-flight requests finish or fail cleanly
/// (an HTTP answer, never a cut connection), queued ones get 503, no VM survives.
pub fn sigterm_under_load(server: Server, probe: &LeakProbe, c: &mut Checks) {
    c.faults += 1;
    let addr = server.addr;
    let spawn = |code: String, timeout: u64| {
        std::thread::spawn(move || {
            post_json(
                addr,
                "/v1/executions",
                &json!({"language": "bash", "code": code, "timeout_ms": timeout}),
                Duration::from_secs(180),
            )
        })
    };
    let mut running = vec![];
    for i in 0..2 {
        running.push((
            format!("short-{i}"),
            spawn(format!("sleep 1; echo short-{i}"), 20000),
        ));
    }
    running.push(("long".to_string(), spawn("sleep 300".into(), 60000)));
    let kids = wait_children(&server, 3, Duration::from_secs(30));
    let mut queued = vec![];
    for i in 0..2 {
        queued.push((
            format!("queued-{i}"),
            spawn(format!("echo queued-{i}"), 20000),
        ));
    }
    std::thread::sleep(Duration::from_secs(5));
    let took = term_and_wait(&server, Duration::from_secs(60));
    c.check(
        "SIGTERM under load: server exits within grace + 45 s",
        took.is_some(),
        "still running after 60 s",
    );
    if let Some(t) = took {
        c.note(format!(
            "server under load exited {} ms after SIGTERM ({} VMs running)",
            t.as_millis(),
            kids.len()
        ));
    }
    let after = raw::post(
        addr,
        "/v1/executions",
        br#"{"language":"bash","code":"echo late"}"#,
        Duration::from_secs(5),
    );
    c.check(
        "SIGTERM under load: no new request accepted",
        after.as_ref().map_or(true, |r| r.status == 503),
        format!("{after:?}"),
    );
    for (name, h) in running.into_iter().chain(queued) {
        let r = h.join().expect("thread");
        let (st, v) = match &r {
            Ok(r) => (r.status, r.json().unwrap_or(Value::Null)),
            Err(e) => (0, Value::String(format!("no answer: {e}"))),
        };
        let finished = st == 200 && v["status"] == "ok" && v["stdout"] == format!("{name}\n");
        let failed_cleanly =
            (st == 200 && v["status"] == "internal_error" && v["message"].is_string())
                || (st == 503
                    && v["error"].is_string()
                    && r.as_ref().is_ok_and(|r| r.header("retry-after").is_some()));
        let ok = match name.as_str() {
            n if n.starts_with("short") => finished || failed_cleanly,
            "long" => failed_cleanly || (st == 200 && v["status"] == "timeout"),
            _ => finished || failed_cleanly,
        };
        c.check(
            &format!("SIGTERM under load: {name} answered cleanly"),
            ok,
            format!("HTTP {st}: {}", short(&v)),
        );
        c.note(format!(
            "SIGTERM under load: {name}: HTTP {st} {}",
            v["status"].as_str().or(v["error"].as_str()).unwrap_or("-")
        ));
    }
    let survivors: Vec<u32> = kids.iter().copied().filter(|&p| !dead(p)).collect();
    c.leaks += survivors.len();
    c.check(
        "SIGTERM under load: every VM killed",
        survivors.is_empty(),
        format!("{survivors:?}"),
    );
    after_exit(server, probe, "SIGTERM under load", c);
}

/// The console ring server A runs with (`[vm] console_bytes`).
pub const CONSOLE_CAP: u64 = 256 * 1024;

/// Guest root floods the serial console (4 MiB, 16 × the ring), then writes a last line: the
/// VM's console log never grows past `[vm] console_bytes`, it ends with the newest output (the
/// last line, after the "older output dropped" mark), the request still gets an answer, and the
/// hypervisor is not killed for it.
pub fn console_flood(server: &Server, c: &mut Checks) {
    c.faults += 1;
    let addr = server.addr;
    let req = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/executions",
            &json!({"language": "bash-root",
                    "code": "head -c 4194304 /dev/zero | tr '\\0' x > /dev/ttyS0; \
                             echo CONSOLE-LAST-WORDS > /dev/ttyS0; echo flooded",
                    "timeout_ms": 60000}),
            Duration::from_secs(240),
        )
    });
    let mut largest = 0u64;
    let mut newest_kept = false;
    while !req.is_finished() {
        for rt in std::fs::read_dir(server.runtime_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            for vm in std::fs::read_dir(rt.path()).into_iter().flatten().flatten() {
                let log = vm.path().join("console.log");
                if let Ok(m) = std::fs::metadata(&log) {
                    largest = largest.max(m.len());
                }
                if !newest_kept {
                    let text = std::fs::read(&log).unwrap_or_default();
                    newest_kept = text.starts_with(b"[cloude: older console output dropped]")
                        && text.windows(18).any(|w| w == b"CONSOLE-LAST-WORDS");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = req.join().expect("thread");
    let v = r
        .as_ref()
        .ok()
        .and_then(raw::RawResponse::json)
        .unwrap_or(Value::Null);
    c.check(
        "console flood by guest root: the console log stays at or under its cap",
        (CONSOLE_CAP / 2..=CONSOLE_CAP).contains(&largest),
        format!("largest console.log seen: {largest} bytes (cap {CONSOLE_CAP})"),
    );
    c.check(
        "console flood: console.log keeps the newest output (the last line after the flood)",
        newest_kept,
        "never saw CONSOLE-LAST-WORDS after the dropped-output mark",
    );
    c.check(
        "console flood: the request is answered and the VM was not killed for it",
        v["status"] == "ok" && v["stdout"] == "flooded\n",
        short(&v),
    );
    c.note(format!(
        "console flood: 4 MiB written to ttyS0, console.log peaked at {largest} bytes (ring {CONSOLE_CAP}), newest output kept: {newest_kept}"
    ));
}
