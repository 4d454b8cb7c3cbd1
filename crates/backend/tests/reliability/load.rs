//! Load: 60 requests at concurrency 12 against 3 VMs at once and a queue of 4. Every answer is
//! the request's own output (a unique token in the code and in stdin) or an explicit 429/503
//! with Retry-After. Server memory is measured before and after.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::checks::{short, Checks};
use crate::leaks::{fd_count, rss_kib, LeakProbe};
use crate::raw;
use crate::support::Server;

pub const REQUESTS: usize = 60;
pub const CLIENTS: usize = 12;
/// Generous bound on server RSS growth across the run.
const RSS_GROWTH_BOUND_KIB: u64 = 48 * 1024;

pub fn warm_up(server: &Server, c: &mut Checks) {
    for i in 0..2 {
        let r = raw::post(
            server.addr,
            "/v1/executions",
            &serde_json::to_vec(&json!({"language": "bash", "code": format!("echo warm-{i}")}))
                .expect("json"),
            Duration::from_secs(180),
        );
        let ok = r
            .as_ref()
            .ok()
            .and_then(raw::RawResponse::json)
            .is_some_and(|v| v["stdout"] == format!("warm-{i}\n"));
        c.check("load: warm-up request", ok, format!("{r:?}"));
    }
}

#[derive(Default)]
pub struct Tally {
    pub own_output: usize,
    pub saturated_429: usize,
    pub saturated_503: usize,
    pub wrong: Vec<String>,
}

pub fn run(server: &Server, probe: &LeakProbe, c: &mut Checks) {
    let pid = server.pid();
    let rss_before = rss_kib(pid);
    let fds_before = fd_count(pid);
    let (t, took) = burst(server, REQUESTS, CLIENTS);
    c.load_requests += REQUESTS;
    c.check(
        "load: every answer is its own output or an explicit 429/503 with Retry-After",
        t.wrong.is_empty(),
        t.wrong.join("; "),
    );
    c.check(
        "load: some requests ran (own output)",
        t.own_output >= 3,
        format!("{} ran", t.own_output),
    );
    c.check(
        "load: saturation was signalled (12 clients > 3 VMs + 4 queued)",
        t.saturated_429 + t.saturated_503 >= 1,
        "no 429/503 at all",
    );
    c.note(format!(
        "load: {REQUESTS} requests, {CLIENTS} clients, 3 VMs + queue 4: {} own output, {} x 429, {} x 503, {} wrong, {:.0} s",
        t.own_output,
        t.saturated_429,
        t.saturated_503,
        t.wrong.len(),
        took.as_secs_f64()
    ));
    probe.check(server, "after load", c);
    let executed = t.own_output + memory_run(server, c);
    c.memory_run_requests += MEMORY_RUN;
    probe.check(server, "after memory run", c);
    let rss_after = rss_kib(pid);
    let fds_after = fd_count(pid);
    c.note(format!(
        "server RSS: {rss_before} KiB before, {rss_after} KiB after {} requests ({executed} executions ran); fds {fds_before} -> {fds_after}",
        REQUESTS + MEMORY_RUN
    ));
    c.check(
        "load: server memory stays flat",
        rss_after <= rss_before + RSS_GROWTH_BOUND_KIB,
        format!("{rss_before} KiB -> {rss_after} KiB"),
    );
}

/// `requests` requests from `clients` polite clients (each honours Retry-After); what came back.
pub fn burst(server: &Server, requests: usize, clients: usize) -> (Tally, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let nonce = std::process::id();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients {
            let (next, tally) = (next.clone(), tally.clone());
            let addr = server.addr;
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests {
                    return;
                }
                let code_tok = format!("code-{nonce}-{i}-{}", i * 7919 % 1000);
                let stdin_tok = format!("stdin-{nonce}-{i}");
                let body = json!({"language": "bash", "code": format!("echo {code_tok}; cat"), "stdin": stdin_tok, "timeout_ms": 30000});
                let r = raw::post(addr, "/v1/executions", &serde_json::to_vec(&body).expect("json"), Duration::from_secs(300));
                let mut pause = None;
                {
                    let mut t = tally.lock().expect("lock");
                    match &r {
                        Ok(r) if r.status == 200 => {
                            let v = r.json().unwrap_or(Value::Null);
                            if v["status"] == "ok" && v["stdout"] == format!("{code_tok}\n{stdin_tok}") {
                                t.own_output += 1;
                            } else {
                                t.wrong.push(format!("#{i}: {}", short(&v)));
                            }
                        }
                        Ok(r) if (r.status == 429 || r.status == 503) && r.header("retry-after").is_some() => {
                            if r.status == 429 {
                                t.saturated_429 += 1;
                            } else {
                                t.saturated_503 += 1;
                            }
                            let secs: u64 = r.header("retry-after").and_then(|s| s.parse().ok()).unwrap_or(1);
                            pause = Some(Duration::from_secs(secs.min(2)));
                        }
                        Ok(r) => t.wrong.push(format!("#{i}: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))),
                        Err(e) => t.wrong.push(format!("#{i}: {e}")),
                    }
                }
                // A polite client honours Retry-After.
                if let Some(p) = pause {
                    std::thread::sleep(p);
                }
            });
        }
    });
    let took = t.elapsed();
    let t = std::mem::take(&mut *tally.lock().expect("lock"));
    (t, took)
}

/// Requests of the memory run: within the VM limit, so that every one executes.
pub const MEMORY_RUN: usize = 24;

/// `MEMORY_RUN` requests, 3 at a time (no saturation): each must return its own output.
/// Returns how many did.
fn memory_run(server: &Server, c: &mut Checks) -> usize {
    let next = AtomicUsize::new(0);
    let good = AtomicUsize::new(0);
    let wrong = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= MEMORY_RUN {
                    return;
                }
                let tok = format!("mem-{}-{i}", std::process::id());
                let body = json!({"language": "bash", "code": format!("echo {tok}")});
                let r = raw::post(
                    server.addr,
                    "/v1/executions",
                    &serde_json::to_vec(&body).expect("json"),
                    Duration::from_secs(300),
                );
                let v = r
                    .as_ref()
                    .ok()
                    .and_then(raw::RawResponse::json)
                    .unwrap_or(Value::Null);
                if v["stdout"] == format!("{tok}\n") {
                    good.fetch_add(1, Ordering::SeqCst);
                } else {
                    wrong.lock().expect("lock").push(format!("#{i}: {r:?}"));
                }
            });
        }
    });
    let wrong = wrong.into_inner().expect("lock");
    c.check(
        &format!("memory run: {MEMORY_RUN} requests at 3 VMs, each its own output"),
        wrong.is_empty(),
        wrong.join("; "),
    );
    good.into_inner()
}
