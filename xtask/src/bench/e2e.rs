//! End-to-end latency and throughput through a real `cloude-server` over HTTP.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::http;
use super::stats::{percentile, r1};

const HELLO: &str = r#"{"language":"python","code":"print(\"hello\")"}"#;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A `cloude-server` child that is killed (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub hypervisor: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts the server from `bin` with the given max VMs and waits for /healthz.
pub fn start_server(bin: &std::path::Path, max_vms: usize) -> anyhow::Result<Server> {
    start_server_with(bin, max_vms, "")
}

/// Like [`start_server`], with `extra` appended to its configuration.
pub fn start_server_with(
    bin: &std::path::Path,
    max_vms: usize,
    extra: &str,
) -> anyhow::Result<Server> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    // Beside results.json (kept for reading after a run), not a temporary directory per run.
    let dir = crate::deps::root().join("target/bench/server");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!("[limits]\nmax_concurrent_vms = {max_vms}\nmax_queue = 256\n{extra}"),
    )?;
    let log = std::fs::File::create(dir.join("server.log"))?;
    let child = Command::new(bin)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start cloude-server")?;
    let mut server = Server {
        child,
        addr,
        hypervisor: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Ok(r) = http::request(addr, "GET", "/healthz", None, Duration::from_secs(2)) {
            if r.status == 200 {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
                server.hypervisor = v["hypervisor"].as_str().unwrap_or("unknown").to_string();
                return Ok(server);
            }
        }
        if let Ok(Some(st)) = server.child.try_wait() {
            bail!(
                "cloude-server exited ({st}) before serving; log: {}",
                dir.join("server.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("cloude-server did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One hello-world request; its latency, the server's boot time in ms and where its VM came
/// from, or an error.
fn hello_timed(addr: SocketAddr) -> Result<(f64, Option<f64>, String), String> {
    timed(addr, HELLO, "hello\n")
}

/// One request with `body`, which must answer `expect` on stdout: its latency in ms, the VM's
/// boot (or restore) time and where the VM came from.
pub fn timed(
    addr: SocketAddr,
    body: &str,
    expect: &str,
) -> Result<(f64, Option<f64>, String), String> {
    let t = Instant::now();
    let r = http::request(addr, "POST", "/v1/executions", Some(body), REQUEST_TIMEOUT)
        .map_err(|e| format!("{e:#}"))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if r.status != 200 {
        return Err(format!("HTTP {}: {}", r.status, r.body));
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
    if v["stdout"] != expect || v["status"] != "ok" {
        return Err(format!("unexpected answer: {}", r.body));
    }
    let source = v["timings"]["vm_source"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    Ok((ms, v["timings"]["boot_ms"].as_f64(), source))
}

/// Where the server's VMs came from over `latency`'s requests (`timings.vm_source` counts).
fn count_sources(sources: &[String]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for s in sources {
        let n = m.get(s).and_then(serde_json::Value::as_u64).unwrap_or(0);
        m.insert(s.clone(), json!(n + 1));
    }
    serde_json::Value::Object(m)
}

/// One hello-world request; its latency in ms, or an error description.
fn hello(addr: SocketAddr) -> Result<f64, String> {
    hello_timed(addr).map(|(ms, _, _)| ms)
}

/// Sequential latency over `n` requests, beside host python3 over as many runs.
pub fn latency(server: &Server, n: usize) -> anyhow::Result<serde_json::Value> {
    let mut samples = Vec::with_capacity(n);
    let mut boots = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    for i in 0..n {
        let (ms, boot, source) =
            hello_timed(server.addr).map_err(|e| anyhow::anyhow!("request {i}: {e}"))?;
        samples.push(ms);
        boots.extend(boot);
        sources.push(source);
    }
    // The interpreter itself, not a version-manager shim in front of it.
    let exe = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    let python = String::from_utf8_lossy(&exe.stdout).trim().to_string();
    let mut host = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = Command::new(&python)
            .args(["-c", "print(\"hello\")"])
            .output()?;
        if out.stdout != b"hello\n" {
            bail!(
                "host python3 printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        host.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let p = |s: &[f64], q| percentile(s, q).map(r1);
    Ok(json!({
        "p50": p(&samples, 50.0), "p90": p(&samples, 90.0), "p99": p(&samples, 99.0),
        "host_python_p50": p(&host, 50.0), "requests": n,
        "boot_ms_p50": p(&boots, 50.0), "boot_ms_p90": p(&boots, 90.0),
        "vm_sources": count_sources(&sources), "samples": samples, "boot_samples": boots,
    }))
}

/// Sandboxes (`/v1/sandboxes`): `n` creations (restore + wake, each deleted again), then in one
/// live sandbox `n` execs of `true` as an argv and `n` through `/bin/bash -lc` (what `cmd`
/// runs), each a round trip through the server and the agent.
pub fn sandbox(server: &Server, n: usize) -> anyhow::Result<serde_json::Value> {
    let call = |method: &str,
                path: &str,
                body: Option<&str>|
     -> anyhow::Result<(f64, serde_json::Value)> {
        let t = Instant::now();
        let r = http::request(server.addr, method, path, body, REQUEST_TIMEOUT)?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !(200..300).contains(&r.status) {
            bail!("{method} {path}: HTTP {}: {}", r.status, r.body);
        }
        let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
        Ok((ms, v))
    };
    let mut create = Vec::with_capacity(n);
    let mut id = String::new();
    for i in 0..n {
        let (ms, v) = call("POST", "/v1/sandboxes", Some(r#"{"template": "python"}"#))?;
        create.push(ms);
        let this = v["id"].as_str().context("no sandbox id")?.to_string();
        if i + 1 < n {
            call("DELETE", &format!("/v1/sandboxes/{this}"), None)?;
        } else {
            id = this;
        }
    }
    let exec = |body: &str| -> anyhow::Result<Vec<f64>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let (ms, out) = call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(body))?;
            if out["exit_code"] != 0 {
                bail!("exec {body}: {out}");
            }
            v.push(ms);
        }
        Ok(v)
    };
    let argv = exec(r#"{"argv": ["true"]}"#)?;
    let bash = exec(r#"{"cmd": "true"}"#)?;
    call("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
    let p = |s: &[f64], q| percentile(s, q).map(r1);
    Ok(json!({
        "create_p50": p(&create, 50.0), "create_p90": p(&create, 90.0), "create_p99": p(&create, 99.0),
        "exec_true_argv_p50": p(&argv, 50.0), "exec_true_argv_p90": p(&argv, 90.0), "exec_true_argv_p99": p(&argv, 99.0),
        "exec_true_bash_p50": p(&bash, 50.0), "exec_true_bash_p90": p(&bash, 90.0), "exec_true_bash_p99": p(&bash, 99.0),
        "calls": n, "create_samples": create, "exec_argv_samples": argv, "exec_bash_samples": bash,
    }))
}

/// E2B's Python SDK (`e2b` from PyPI, in a venv under the bench directory) beside the native
/// API: `n` times create + run `echo hi` + kill, each trio timed; the same three calls on
/// `/v1/sandboxes` (create, exec of `cmd`, delete) first.
pub fn e2b(server: &Server, n: usize, venv: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let mut native = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = http::request(
            server.addr,
            "POST",
            "/v1/sandboxes",
            Some(r#"{"template": "python"}"#),
            REQUEST_TIMEOUT,
        )?;
        if r.status != 201 {
            bail!("create: HTTP {}: {}", r.status, r.body);
        }
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        let id = v["id"].as_str().context("no sandbox id")?.to_string();
        let r = http::request(
            server.addr,
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(r#"{"cmd": "echo hi"}"#),
            REQUEST_TIMEOUT,
        )?;
        if r.status != 200 || !r.body.contains("aGkK") && !r.body.contains("hi\\n") {
            bail!("exec: HTTP {}: {}", r.status, r.body);
        }
        let r = http::request(
            server.addr,
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            None,
            REQUEST_TIMEOUT,
        )?;
        if r.status != 204 {
            bail!("delete: HTTP {}: {}", r.status, r.body);
        }
        native.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let python = venv.join("bin/python");
    let have = Command::new(&python)
        .args(["-c", "import e2b"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()?
            .success()
            && Command::new(venv.join("bin/pip"))
                .args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "e2b==2.63.0",
                ])
                .status()?
                .success();
        if !ok {
            bail!("cannot install the e2b SDK into {}", venv.display());
        }
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bench/e2b_sdk.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}/e2b", server.addr))
        .arg(n.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "the E2B SDK bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sdk: Vec<f64> = v["samples"]
        .as_array()
        .context("no samples")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    let p = |s: &[f64], q| percentile(s, q).map(r1);
    let ratio = match (p(&sdk, 50.0), p(&native, 50.0)) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
        _ => None,
    };
    Ok(json!({
        "sdk_p50": p(&sdk, 50.0), "sdk_p90": p(&sdk, 90.0), "sdk_p99": p(&sdk, 99.0),
        "native_p50": p(&native, 50.0), "native_p90": p(&native, 90.0), "native_p99": p(&native, 99.0),
        "ratio_p50": ratio, "runs": n, "sdk_samples": sdk, "native_samples": native,
    }))
}

/// Sequential latency with a warm pool: before each (timed) request, waits (untimed) until the
/// pool holds a booted python VM again — the latency a client sees when requests arrive no faster
/// than the pool refills.
pub fn pooled_latency(server: &Server, n: usize) -> anyhow::Result<serde_json::Value> {
    let mut samples = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        loop {
            let r = http::request(server.addr, "GET", "/healthz", None, Duration::from_secs(5))?;
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
            if v["pool_ready"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("the warm pool did not refill within 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (ms, _, source) =
            hello_timed(server.addr).map_err(|e| anyhow::anyhow!("pooled request {i}: {e}"))?;
        samples.push(ms);
        sources.push(source);
    }
    let p = |q| percentile(&samples, q).map(r1);
    Ok(json!({
        "p50": p(50.0), "p90": p(90.0), "p99": p(99.0), "requests": n,
        "vm_sources": count_sources(&sources), "samples": samples,
    }))
}

/// Closed-loop load at each concurrency for `secs` seconds.
pub fn throughput(server: &Server, levels: &[usize], secs: u64) -> Vec<serde_json::Value> {
    levels
        .iter()
        .map(|&c| {
            let stop = Arc::new(AtomicBool::new(false));
            let lat = Arc::new(Mutex::new(Vec::new()));
            let errors = Arc::new(Mutex::new(Vec::<String>::new()));
            let t0 = Instant::now();
            let workers: Vec<_> = (0..c)
                .map(|_| {
                    let (stop, lat, errors, addr) =
                        (stop.clone(), lat.clone(), errors.clone(), server.addr);
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            match hello(addr) {
                                Ok(ms) => lat.lock().expect("not poisoned").push(ms),
                                Err(e) => errors.lock().expect("not poisoned").push(e),
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs(secs));
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                let _ = w.join();
            }
            let elapsed = t0.elapsed().as_secs_f64();
            let lat = lat.lock().expect("not poisoned").clone();
            let errors = errors.lock().expect("not poisoned").clone();
            if let Some(e) = errors.first() {
                eprintln!(
                    "bench: concurrency {c}: {} errors, first: {e}",
                    errors.len()
                );
            }
            json!({
                "concurrency": c,
                "rps": (lat.len() as f64 / elapsed * 100.0).round() / 100.0,
                "completed": lat.len(),
                "p99_ms": percentile(&lat, 99.0).map(r1),
                "errors": errors.len(),
            })
        })
        .collect()
}

/// Memory of `n` VMs running at once: `n` concurrent requests that each sleep `secs` seconds;
/// once every hypervisor process is up and has idled a moment, sums their PSS and RSS
/// (`/proc/PID/smaps_rollup`; hypervisors are found by their process name).
pub fn memory(server: &Server, n: usize, secs: u64) -> anyhow::Result<serde_json::Value> {
    let code = format!("import time; print('up', flush=True); time.sleep({secs})");
    memory_of(server, n, secs, "python", &code)
}

/// [`memory`] for `language` running `code` (which must sleep about `secs` seconds).
pub fn memory_of(
    server: &Server,
    n: usize,
    secs: u64,
    language: &str,
    code: &str,
) -> anyhow::Result<serde_json::Value> {
    let body =
        json!({"language": language, "code": code, "timeout_ms": (secs + 30) * 1000}).to_string();
    let addr = server.addr;
    let workers: Vec<_> = (0..n)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                http::request(addr, "POST", "/v1/executions", Some(&body), REQUEST_TIMEOUT)
                    .map(|r| r.status)
            })
        })
        .collect();
    // Sample for the middle of the sleep; keep the largest sums seen with all n running.
    let start = Instant::now();
    let mut best: Option<(u64, u64, usize)> = None;
    while start.elapsed() < Duration::from_secs(secs + 60) {
        let procs = hypervisors();
        if procs.len() >= n {
            let (pss, rss) = procs
                .iter()
                .fold((0, 0), |(p, r), (_, pp, rr)| (p + pp, r + rr));
            if best.is_none_or(|(bp, _, _)| pss > bp) {
                best = Some((pss, rss, procs.len()));
            }
        }
        if workers.iter().all(|w| w.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for w in workers {
        let status = w
            .join()
            .map_err(|_| anyhow::anyhow!("a memory request panicked"))??;
        if status != 200 {
            bail!("a memory request answered HTTP {status}");
        }
    }
    let (pss, rss, seen) = best.context("never saw every VM running at once")?;
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    Ok(json!({
        "vms": n, "processes_seen": seen,
        "pss_total_mib": mib(pss), "rss_total_mib": mib(rss),
        "pss_per_vm_mib": mib(pss / n as u64), "rss_per_vm_mib": mib(rss / n as u64),
    }))
}

/// Running hypervisor processes (QEMU or cloude-vmm): (pid, PSS KiB, RSS KiB).
fn hypervisors() -> Vec<(u32, u64, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            if !(comm.starts_with("qemu-system") || comm == "cloude-vmm") {
                return None;
            }
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            let field = |name: &str| {
                rollup.lines().find_map(|l| {
                    l.strip_prefix(name)?
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            };
            Some((pid, field("Pss:")?, field("Rss:")?))
        })
        .collect()
}

/// Interactive runs: one WebSocket session (`/v1/executions/ws`) with a Python program that
/// echoes each line; `n` lines, each timed from our send to its echo (stdin → program →
/// stdout → client), beside the whole one-shot request measured by `latency`.
pub fn interactive(server: &Server, n: usize) -> anyhow::Result<serde_json::Value> {
    use tungstenite::Message;
    let stream = std::net::TcpStream::connect(server.addr)?;
    let (mut ws, _) = tungstenite::client(format!("ws://{}/v1/executions/ws", server.addr), stream)
        .context("WebSocket handshake")?;
    stream_timeout(&ws)?;
    let code =
        "import sys\nfor line in sys.stdin:\n    sys.stdout.write(line)\n    sys.stdout.flush()\n";
    let start = json!({"language": "python", "code": code, "timeout_ms": 60000});
    let t = Instant::now();
    ws.send(Message::Text(start.to_string()))?;
    while read_json(&mut ws)?["type"] != "stage" {}
    let ready_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut rtt = Vec::with_capacity(n);
    for i in 0..n {
        let line = format!("line {i}\n");
        let t = Instant::now();
        ws.send(Message::Text(
            json!({"type": "stdin", "data": line}).to_string(),
        ))?;
        let mut got = String::new();
        while !got.ends_with('\n') {
            let m = read_json(&mut ws)?;
            if m["type"] == "output" {
                got.push_str(m["data"].as_str().unwrap_or_default());
            }
        }
        rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        if got != line {
            bail!("echoed {got:?} for {line:?}");
        }
    }
    ws.send(Message::Text(json!({"type": "close_stdin"}).to_string()))?;
    let p = |s: &[f64], q| percentile(s, q).map(r1);
    Ok(json!({
        "line_rtt_p50": p(&rtt, 50.0), "line_rtt_p90": p(&rtt, 90.0), "line_rtt_p99": p(&rtt, 99.0),
        "session_ready_ms": r1(ready_ms), "lines": n, "samples": rtt,
    }))
}

/// The next JSON text message of a WebSocket.
fn read_json(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
) -> anyhow::Result<serde_json::Value> {
    loop {
        match ws.read()? {
            tungstenite::Message::Text(t) => return Ok(serde_json::from_str(&t)?),
            tungstenite::Message::Close(f) => bail!("closed: {f:?}"),
            _ => continue,
        }
    }
}

fn stream_timeout(ws: &tungstenite::WebSocket<std::net::TcpStream>) -> anyhow::Result<()> {
    ws.get_ref().set_read_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(())
}
