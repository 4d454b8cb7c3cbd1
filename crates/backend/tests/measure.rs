//! CPU time and peak memory of a program, measured in the guest (its cgroup's counters) and
//! reported in v1 (`cpu_ms`, `memory_kib`), checked against what the program did (real server,
//! real VMs under this host's driver).

use cloude_testkit as support;

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

    // A CPU limit of 1 s stops a 3 s busy loop (wall-clock timeout far away) as `cpu_limit`,
    // near 1 s of CPU; a program sleeping under the same limit is not stopped.
    let loop3 = "import time\nwhile time.process_time() < 3.0:\n    pass\nprint('finished')";
    let r = server.post(
        "/v1/executions",
        &json!({"language": "python", "code": loop3, "cpu_limit_ms": 1000, "timeout_ms": 30000}),
    );
    let v = r.json();
    eprintln!("measure: 3 s busy loop under a 1 s CPU limit: {v}");
    assert_eq!(v["status"], "cpu_limit", "{v}");
    assert_eq!(v["limits"]["cpu_limit_ms"], 1000, "{v}");
    let cpu = v["cpu_ms"].as_u64().expect("cpu_ms");
    assert!(
        (1000..1300).contains(&cpu),
        "stopped at {cpu} ms of CPU: {v}"
    );
    assert!(
        !v["stdout"].as_str().unwrap_or("").contains("finished"),
        "{v}"
    );
    let v = exec(
        &server,
        json!({"language": "bash", "code": "sleep 2; echo slept", "cpu_limit_ms": 1000}),
    );
    assert_eq!(v["stdout"], "slept\n", "{v}");
    let status = server.stop(Duration::from_secs(30));
    assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");
}

/// `tests` in v1: one compile, one run per case in the same fresh VM, verdicts per case and
/// overall, the top-level fields describing the first case that did not pass.
#[test]
fn test_cases_compile_once_and_answer_per_case() {
    let config = "[vm]\nprebuild = [\"c\", \"python\"]\n";
    let server = Server::start(&[], Some(config), Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("measure: {e}"));
    let c = "#include <stdio.h>\n#include <stdlib.h>\n\
             int main(void) { long x; if (scanf(\"%ld\", &x) != 1) return 2;\n\
             if (x < 0) abort();\n\
             FILE *f = fopen(\"seen.txt\", \"r\"); if (f) { puts(\"dirty\"); return 5; }\n\
             f = fopen(\"seen.txt\", \"w\"); fputs(\"x\", f); fclose(f);\n\
             if (x == 7) for (;;) {}\n\
             printf(\"%ld\\n\", x * 2); return 0; }\n";
    let t = std::time::Instant::now();
    let r = server.post(
        "/v1/executions",
        &json!({"language": "c", "code": c, "cpu_limit_ms": 1000, "tests": [
            {"stdin": "1", "expected_output": "2"},
            {"stdin": "5", "expected_output": "10  \n\n"},
            {"stdin": "3", "expected_output": "7"},
            {"stdin": "-1", "expected_output": "x"},
            {"stdin": "7"},
            {"stdin": "21"},
        ]}),
    );
    let v = r.json();
    eprintln!(
        "measure: 6 C test cases in {} ms: {v}",
        t.elapsed().as_millis()
    );
    assert_eq!(r.status, 200, "{v}");
    let tests = &v["tests"];
    let verdicts: Vec<&str> = tests["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["verdict"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        verdicts,
        [
            "passed",
            "passed",
            "wrong_answer",
            "runtime_error",
            "cpu_limit",
            "passed"
        ],
        "{v}"
    );
    assert_eq!(tests["cases"][3]["signal"], "SIGABRT", "{v}");
    assert_eq!(tests["cases"][5]["stdout"], "42\n", "{v}");
    assert_eq!(
        (tests["passed"].as_u64(), tests["total"].as_u64()),
        (Some(3), Some(6))
    );
    assert_eq!(tests["verdict"], "wrong_answer", "{v}");
    // The top level is the first case that did not pass (it ran to its end: status ok).
    assert_eq!(
        (v["status"].as_str(), v["stdout"].as_str()),
        (Some("ok"), Some("6\n")),
        "{v}"
    );
    assert_eq!(v["compile"]["exit_code"], 0, "{v}");

    // A compile error runs no case.
    let r = server.post(
        "/v1/executions",
        &json!({"language": "c", "code": "int main( {", "tests": [{"stdin": "1"}]}),
    );
    let v = r.json();
    assert_eq!(v["status"], "compile_error", "{v}");
    assert_eq!(v["tests"]["verdict"], "compile_error", "{v}");
    assert_eq!(v["tests"]["cases"], json!([]), "{v}");

    // Every case passing: the overall verdict, and the last case at the top level.
    let r = server.post(
        "/v1/executions",
        &json!({"language": "python", "code": "print(input()[::-1])", "tests": [
            {"stdin": "abc", "expected_output": "cba"}, {"stdin": "xy", "expected_output": "yx"}]}),
    );
    let v = r.json();
    assert_eq!(v["tests"]["verdict"], "passed", "{v}");
    assert_eq!(v["stdout"], "yx\n", "{v}");
    let status = server.stop(Duration::from_secs(30));
    assert!(matches!(&status, Ok(s) if s.success()), "{status:?}");
}
