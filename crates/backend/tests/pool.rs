//! The warm pool end to end (real server, real QEMU VMs): requests for a pooled language take a
//! VM that was booted before they arrived, every request still gets a VM of its own (a distinct
//! guest boot id each time: never reused), requests that do not fit the pooled VMs boot one, and
//! shutdown leaves no VM behind.

use cloude_testkit as support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Server;

const FIRST_START: Duration = Duration::from_secs(3600);

fn exec(s: &Server, body: Value) -> (u16, Value) {
    let r = s.post("/v1/executions", &body);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!({ "raw": r.text() }));
    (r.status, v)
}

/// Waits up to 90 s for `pool_ready` in /healthz to reach `n`.
fn wait_pool(s: &Server, n: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(90) {
        if s.get("/healthz").json()["pool_ready"].as_u64() == Some(n) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Processes (other than the server) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()) && *p != me)
                .filter_map(|p| {
                    let c = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains(needle).then(|| format!("{p}: {c}"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn warm_pool_hands_out_fresh_vms() {
    let config = "[vm]\nprebuild = [\"bash\"]\n[pool]\nsize = 1\nlanguages = [\"bash\"]\n";
    let server = Server::start(&["--hypervisor", "qemu"], Some(config), FIRST_START)
        .unwrap_or_else(|e| panic!("pool: {e}"));
    let rt = server.runtime_dir().display().to_string();
    assert!(wait_pool(&server, 1), "the pool never filled");

    let code = "cat /proc/sys/kernel/random/boot_id";
    let mut boot_ids = Vec::new();
    let mut pooled_ms = Vec::new();
    for i in 0..2 {
        let (st, v) = exec(&server, json!({"language": "bash", "code": code}));
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["status"], "ok", "{v}");
        let boot = v["timings"]["boot_ms"].as_u64().unwrap_or(u64::MAX);
        eprintln!(
            "pool: request {i}: boot_ms {boot}, total_ms {}",
            v["timings"]["total_ms"]
        );
        assert!(boot < 500, "request {i} should have taken a booted VM: {v}");
        pooled_ms.push(boot);
        boot_ids.push(v["stdout"].as_str().unwrap_or("").trim().to_string());
        assert!(
            wait_pool(&server, 1),
            "the pool did not refill after request {i}"
        );
    }

    // Needs more memory than the pooled VMs have: boots its own, leaving the pool alone.
    let (st, v) = exec(
        &server,
        json!({"language": "bash", "code": code, "memory_mib": 400}),
    );
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(st, 200);
    let cold = v["timings"]["boot_ms"].as_u64().unwrap_or(0);
    eprintln!("pool: cold request: boot_ms {cold}");
    assert!(
        cold > pooled_ms[0].max(pooled_ms[1]),
        "a cold boot is slower: {v}"
    );
    boot_ids.push(v["stdout"].as_str().unwrap_or("").trim().to_string());

    // Never shared: three requests, three guest boots.
    let unique: std::collections::HashSet<_> = boot_ids.iter().collect();
    assert_eq!(
        unique.len(),
        3,
        "every request had its own VM: {boot_ids:?}"
    );
    assert!(boot_ids.iter().all(|b| b.len() == 36), "{boot_ids:?}");

    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("cloude_pool_takes_total{result=\"hit\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("cloude_pool_ready 1"), "{metrics}");

    // The pooled VM left idle is killed at shutdown; nothing survives.
    assert!(
        !processes_mentioning(&rt).is_empty(),
        "the idle pooled VM runs"
    );
    let status = server.stop(Duration::from_secs(30));
    assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");
    let t = Instant::now();
    while !processes_mentioning(&rt).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(processes_mentioning(&rt), Vec::<String>::new(), "VMs left");
}
