//! CPU time and peak memory of a program, measured in the guest (its cgroup's counters) and
//! reported in v1 (`cpu_ms`, `memory_kib`), checked against what the program did (real server,
//! real VMs under this host's driver).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::Server;

fn exec(s: &Server, body: Value) -> Value {
    let r = s.post("/v1/executions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "ok", "{v}");
    v
}

#[test]
fn cpu_time_and_peak_memory_match_what_the_program_did() {
    let config = "[vm]\nprebuild = [\"python\", \"bash\"]\n";
    let server = Server::start(&[], Some(config), Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("measure: {e}"));

    // A busy loop until the process has used 1 s of CPU (by its own clock): the reported CPU
    // time is within 20 % of what the program measured itself (interpreter start-up included).
    let busy =
        "import time\nwhile time.process_time() < 1.0:\n    pass\nprint(time.process_time())";
    let v = exec(&server, json!({"language": "python", "code": busy}));
    let own: f64 = v["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("seconds");
    let cpu = v["cpu_ms"].as_f64().expect("cpu_ms") / 1000.0;
    eprintln!("measure: busy loop: reported {cpu} s of CPU, the program measured {own} s");
    assert!(
        (cpu - own).abs() <= 0.2 * own,
        "CPU time {cpu} s vs the program's own {own} s"
    );

    // Sleeping uses next to no CPU (what it does use is bash starting, 131 ms under TCG here;
    // the bound leaves room for a loaded emulating host, and stays far below the second slept).
    let v = exec(&server, json!({"language": "bash", "code": "sleep 1"}));
    let cpu = v["cpu_ms"].as_u64().expect("cpu_ms");
    eprintln!("measure: sleep 1: {cpu} ms of CPU");
    assert!(cpu < 400, "sleep 1 used {cpu} ms of CPU");

    // 100 MiB allocated and touched page by page, beside the same interpreter doing nothing:
    // the difference of the peaks is within 10 % of 100 MiB.
    let touch =
        "b = bytearray(100 << 20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\nprint(len(b))";
    let big = exec(&server, json!({"language": "python", "code": touch}));
    let idle = exec(&server, json!({"language": "python", "code": "print(0)"}));
    let (big, idle) = (
        big["memory_kib"].as_f64().expect("memory_kib"),
        idle["memory_kib"].as_f64().expect("memory_kib"),
    );
    let delta_mib = (big - idle) / 1024.0;
    eprintln!("measure: peak {big} KiB with 100 MiB touched, {idle} KiB idle: +{delta_mib:.1} MiB");
    assert!(
        (delta_mib - 100.0).abs() <= 10.0,
        "100 MiB touched raised the peak by {delta_mib:.1} MiB"
    );
    let status = server.stop(Duration::from_secs(30));
    assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");
}
