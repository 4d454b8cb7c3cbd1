//! Reliability: hostile programs, hostile requests, faults and load against a real
//! `cloude-server` with real VMs (the QEMU fallback here), with leak checks after every phase.
//!
//! Two server start-ups: server A (hostile requests, hostile programs, faults), server B (load,
//! memory, SIGTERM under load). Ends with a summary whose figures go into the README.

use cloude_testkit as support;

#[path = "reliability/checks.rs"]
mod checks;
#[path = "reliability/faults.rs"]
mod faults;
#[path = "reliability/leaks.rs"]
mod leaks;
#[path = "reliability/load.rs"]
mod load;
#[path = "reliability/programs.rs"]
mod programs;
#[path = "reliability/raw.rs"]
mod raw;
#[path = "reliability/requests.rs"]
mod requests;

use std::time::{Duration, Instant};

use checks::Checks;
use leaks::LeakProbe;
use support::Server;

/// Kernel and images are normally cached; building them all from scratch takes far longer.
const FIRST_START: Duration = Duration::from_secs(3600);

#[test]
fn reliability_real_vms() {
    let started = Instant::now();
    // The default catalogue plus a root-run test image (for the guest kernel panic), written
    // outside the TMPDIR whose leftovers are checked.
    let (_catalog_file, catalog) = support::test_catalog(programs::TEST_CATALOG_EXTRA);
    // A private temp dir for the test and everything it starts (the server and its QEMUs
    // inherit TMPDIR), so that stray temp files can be found.
    let tmp = tempfile::Builder::new()
        .prefix("cloude-reliability-")
        .tempdir()
        .expect("temp dir");
    std::env::set_var("TMPDIR", tmp.path());
    let mut c = Checks::default();

    // Server A: hostile requests (no VMs), hostile programs, faults.
    let config_a = format!(
        "[limits]\nmax_concurrent_vms = 3\nmax_queue = 32\n[vm]\nconsole_bytes = {}\n",
        faults::CONSOLE_CAP
    );
    let a = Server::start(
        &["--hypervisor", "qemu", "--catalog", &catalog],
        Some(&config_a),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("reliability: {e}"));
    let probe = LeakProbe::new(&a, tmp.path());
    let (st, v) = programs::exec(
        &a,
        &serde_json::json!({"language": "bash", "code": "echo warm"}),
    );
    c.check(
        "warm-up request",
        st == 200 && v["stdout"] == "warm\n",
        checks::short(&v),
    );
    let probe = probe.with_baseline(&a);
    c.note(format!(
        "server A baseline: {} fds, RSS {} KiB",
        probe.fd_baseline,
        leaks::rss_kib(a.pid())
    ));

    // The slow clients dribble in the background while the other phases are served.
    let slow = requests::start_slowloris(a.addr);
    requests::run(&a, &mut c);
    programs::run(&a, &mut c);
    requests::finish_slowloris(slow, &a, &mut c);
    probe.check(&a, "after hostile requests and programs", &mut c);

    faults::hypervisor_kill(&a, &mut c);
    faults::client_disconnect(&a, &mut c);
    faults::console_flood(&a, &mut c);
    probe.check(&a, "after faults", &mut c);
    let health = a.get("/healthz");
    c.check(
        "server A healthy at the end",
        health.status == 200 && health.json()["status"] == "ok",
        health.text(),
    );
    faults::sigterm_idle_exit(a, &probe, &mut c);

    // Server B: load with a small VM limit and queue, memory, SIGTERM under load.
    let config_b = "[limits]\nmax_concurrent_vms = 3\nmax_queue = 4\nshutdown_grace_ms = 15000\n";
    let b = Server::start(&["--hypervisor", "qemu"], Some(config_b), FIRST_START)
        .unwrap_or_else(|e| panic!("reliability: {e}"));
    let probe_b = LeakProbe::new(&b, tmp.path());
    load::warm_up(&b, &mut c);
    let probe_b = probe_b.with_baseline(&b);
    load::run(&b, &probe_b, &mut c);
    faults::sigterm_under_load(b, &probe_b, &mut c);

    let stray = leaks::stray_temp_files(tmp.path());
    c.check(
        "no temp files left in TMPDIR",
        stray.is_empty(),
        format!("{stray:?}"),
    );
    if !stray.is_empty() {
        c.leaks += stray.len();
    }

    c.summary(started.elapsed());
    assert!(
        c.failures.is_empty(),
        "{} reliability check(s) failed:\n  {}",
        c.failures.len(),
        c.failures.join("\n  ")
    );
}
