//! The reliability suite's hostile programs (a bounded subset) and load, over the tcp transport:
//! `cloude-server` with `vm.transport = "tcp"` and its host-side rules runs in a network namespace
//! this test creates, and after every phase nothing may be left: no VM process or cgroup, no
//! runtime-dir entry, no fd, no temp file, and (tcp only) no tap and no nftables table.
//!
//! Needs root, `/dev/net/tun`, `ip` and `nft`; without them it says SKIPPED and why.

use cloude_testkit as support;

#[path = "reliability/checks.rs"]
mod checks;
#[allow(dead_code)]
#[path = "reliability/faults.rs"]
mod faults;
#[allow(dead_code)]
#[path = "reliability/leaks.rs"]
mod leaks;
#[allow(dead_code)]
#[path = "reliability/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "reliability/programs.rs"]
mod programs;
#[allow(dead_code)]
#[path = "reliability/raw.rs"]
mod raw;

use std::time::{Duration, Instant};

use checks::Checks;
use leaks::LeakProbe;
use support::netns::{sh, skip_reason, Netns};
use support::Server;

/// Kernel and images are normally cached.
const FIRST_START: Duration = Duration::from_secs(3600);
/// The hostile programs run here: a bounded subset of the suite's (CPU, processes, memory,
/// output, signals, and the root-run guest kernel panic, whose VM dies with its tap mid-run).
const HOSTILE: &[&str] = &[
    "infinite loop",
    "fork bomb",
    "allocating far beyond memory_mib = 64",
    "printing forever",
    "setsid and double-fork children outliving their parent",
    "signalling the agent (kill -9 1, kill -TERM -1)",
    "guest kernel panic (echo c > /proc/sysrq-trigger as root)",
];
/// The short load: requests, clients (3 VMs and a queue of 4 below).
const LOAD_REQUESTS: usize = 20;
const LOAD_CLIENTS: usize = 6;
/// How long taps and tables may take to go after a phase (killed VMs are reaped asynchronously).
const NET_SETTLE: Duration = Duration::from_secs(10);

/// The taps and this project's nftables tables left in the namespace, after waiting for them to
/// go (bounded).
fn net_leftovers(ns: &Netns) -> Vec<String> {
    let t = Instant::now();
    loop {
        let mut left: Vec<String> = ns.taps().into_iter().map(|t| format!("tap {t}")).collect();
        let tables =
            sh(&["ip", "netns", "exec", &ns.name, "nft", "list", "tables"]).unwrap_or_default();
        left.extend(
            tables
                .lines()
                .filter(|l| l.contains("cloude_"))
                .map(|l| l.trim().to_string()),
        );
        if left.is_empty() || t.elapsed() > NET_SETTLE {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn check_net(ns: &Netns, phase: &str, c: &mut Checks) {
    let left = net_leftovers(ns);
    c.leaks += left.len();
    c.check(
        &format!("{phase}: no tap or nftables table left"),
        left.is_empty(),
        format!("{left:?}"),
    );
}

#[test]
fn reliability_over_tcp() {
    if let Some(why) = skip_reason() {
        eprintln!("tcp_reliability: SKIPPED: {why}");
        return;
    }
    if sh(&["nft", "--version"]).is_err() {
        eprintln!("tcp_reliability: SKIPPED: no `nft` (the Debian package nftables)");
        return;
    }
    let started = Instant::now();
    let (_catalog_file, catalog) = support::test_catalog(programs::TEST_CATALOG_EXTRA);
    let tmp = tempfile::Builder::new()
        .prefix("cloude-tcp-reliability-")
        .tempdir()
        .expect("temp dir");
    std::env::set_var("TMPDIR", tmp.path());
    let ns = Netns::create().unwrap_or_else(|e| panic!("cannot create the test namespace: {e}"));
    let mut c = Checks::default();

    let config = "[vm]\ntransport = \"tcp\"\nprebuild = [\"bash\", \"python\", \"bash-root\"]\n\
                  [limits]\nmax_concurrent_vms = 3\nmax_queue = 4\nshutdown_grace_ms = 15000\n";
    let server = Server::start_in(
        Some(&ns.name),
        &format!("{}:0", ns.inner_ip),
        &["--hypervisor", "qemu", "--catalog", &catalog],
        Some(config),
        FIRST_START,
    )
    .unwrap_or_else(|e| panic!("tcp_reliability: {e}"));
    let h = server.get("/healthz").json();
    c.check(
        "tcp server with host rules on",
        h["host_rules"] == true,
        h.to_string(),
    );
    let probe = LeakProbe::new(&server, tmp.path());
    load::warm_up(&server, &mut c);
    let probe = probe.with_baseline(&server);

    let t = Instant::now();
    programs::run_named(&server, &mut c, HOSTILE);
    c.note(format!(
        "tcp: {} hostile programs in {:.0} s",
        HOSTILE.len() + 2,
        t.elapsed().as_secs_f64()
    ));
    probe.check(&server, "tcp: after hostile programs", &mut c);
    check_net(&ns, "tcp: after hostile programs", &mut c);

    let (tally, took) = load::burst(&server, LOAD_REQUESTS, LOAD_CLIENTS);
    c.load_requests += LOAD_REQUESTS;
    c.check(
        "tcp load: every answer is its own output or an explicit 429/503 with Retry-After",
        tally.wrong.is_empty(),
        tally.wrong.join("; "),
    );
    c.check(
        "tcp load: requests ran (own output)",
        tally.own_output >= 3,
        format!("{} ran", tally.own_output),
    );
    c.note(format!(
        "tcp load: {LOAD_REQUESTS} requests, {LOAD_CLIENTS} clients, 3 VMs + queue 4: {} own output, {} x 429, {} x 503, {} wrong, {:.0} s",
        tally.own_output,
        tally.saturated_429,
        tally.saturated_503,
        tally.wrong.len(),
        took.as_secs_f64()
    ));
    probe.check(&server, "tcp: after load", &mut c);
    check_net(&ns, "tcp: after load", &mut c);

    faults::sigterm_under_load(server, &probe, &mut c);
    check_net(&ns, "tcp: after SIGTERM under load", &mut c);

    let stray = leaks::stray_temp_files(tmp.path());
    c.check(
        "tcp: no temp files left in TMPDIR",
        stray.is_empty(),
        format!("{stray:?}"),
    );
    c.summary(started.elapsed());
    assert!(
        c.failures.is_empty(),
        "{} tcp reliability check(s) failed:\n  {}",
        c.failures.len(),
        c.failures.join("\n  ")
    );
}
