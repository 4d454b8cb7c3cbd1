//! `cargo xtask bench`: start-up, latency, throughput and overhead, side by side with peers.
//! Writes `target/bench/results.json` and prints a Markdown table.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::{json, Value};

use crate::deps;

pub mod boot;
pub mod e2e;
mod formats;
pub mod http;
mod overhead;
mod stats;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A smoke run: few samples, short throughput windows.
    #[arg(long)]
    pub quick: bool,
    /// Skip the boot comparison (it needs the KVM lab on hosts without VT-x/AMD-V).
    #[arg(long)]
    pub no_boot: bool,
    /// Skip the end-to-end and throughput parts.
    #[arg(long)]
    pub no_e2e: bool,
    /// Only the block-roots-vs-initramfs comparison (keeps the other parts of the previous
    /// results).
    #[arg(long)]
    pub formats_only: bool,
    /// Skip the block-roots-vs-initramfs comparison.
    #[arg(long)]
    pub no_formats: bool,
    /// Seconds per concurrency level in the throughput part (default 60, 10 with --quick).
    #[arg(long)]
    pub window_secs: Option<u64>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    deps::ensure_apt_packages()?;
    deps::build_release()?;
    let bin = deps::release_dir();
    let kernel =
        deps::last_line(Command::new(bin.join("cloude-image")).args(["kernel", "--vmlinux"]))?;
    let python = deps::last_line(Command::new(bin.join("cloude-image")).args(["build", "python"]))?;
    let (boot_runs, requests, window, levels): (usize, usize, u64, &[usize]) = if args.quick {
        (3, 10, 10, &[1, 2, 4])
    } else {
        (10, 50, 60, &[1, 2, 4, 8, 16])
    };
    let window = args.window_secs.unwrap_or(window);
    let path = deps::root().join("target/bench/results.json");
    // A partial run (--no-boot / --no-e2e) keeps the other parts of the previous results.
    let mut results = if args.no_boot || args.no_e2e || args.no_formats || args.formats_only {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}))
    } else {
        json!({})
    };
    results["machine"] = machine();
    results["commit"] = json!(commit());
    results["quick"] = json!(args.quick);
    if args.formats_only {
        results["formats"] = formats::measure(&bin.join("cloude-server"), requests.min(20));
        return finish(&path, &results);
    }

    // 4. VMM overhead on this machine's own /dev/kvm.
    match overhead::measure(
        &bin.join("cloude-vmm"),
        Path::new(&kernel),
        &bin.join("cloude-jail"),
    ) {
        Ok(v) => {
            results["vmm_overhead_rss_mib"] = v["rss_overhead_mib"].clone();
            results["vmm_start_to_first_run_cpu_ms"] = v["first_run_cpu_ms"].clone();
            results["vmm_overhead"] = v;
        }
        Err(e) => eprintln!("bench: VMM overhead not measured: {e:#}"),
    }

    // 1. Boot to ready.
    if !args.no_boot {
        match boot_to_ready(&kernel, &python, boot_runs) {
            Ok(v) => {
                results["boot_exits"] = v["boot_exits"].clone();
                results["boot_to_ready_ms"] = v;
            }
            Err(e) => eprintln!("bench: boot comparison failed: {e:#}"),
        }
    }

    // 2 and 3. Through the server, side by side: VMs from snapshots (the default), cold boots,
    // and the warm pool with and without snapshots.
    if !args.no_e2e {
        const COLD: &str = "[snapshot]\nenabled = false\n";
        let server_bin = bin.join("cloude-server");
        let server = e2e::start_server(&server_bin, 4)?;
        results["hypervisor"] = json!(server.hypervisor);
        results["e2e_hello_python_ms"] = e2e::latency(&server, requests)?;
        // Sandboxes beside one-shot executions: a creation against a request's restore to
        // ready (`boot_ms_p50` above), an exec against a whole request.
        results["sandbox_ms"] = e2e::sandbox(&server, requests)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        // Interactive: one line's round trip through a running program, beside a whole
        // one-shot request (`e2e_hello_python_ms`).
        results["interactive_ms"] = e2e::interactive(&server, requests)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        // E2B's SDK against the native API: create + `echo hi` + kill.
        let venv = path.parent().map_or_else(
            || Path::new("target/bench").join("e2b-venv"),
            |d| d.join("e2b-venv"),
        );
        results["e2b_ms"] = e2e::e2b(&server, requests.max(20), &venv)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        results["throughput"] = json!(e2e::throughput(&server, levels, window));
        results["memory_snapshot"] =
            e2e::memory(&server, 4, 8).unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        drop(server);
        let cold = e2e::start_server_with(&server_bin, 4, COLD)?;
        results["e2e_hello_python_cold_ms"] = e2e::latency(&cold, requests)?;
        results["memory_cold"] =
            e2e::memory(&cold, 4, 8).unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        drop(cold);
        let (s, c) = (
            &results["e2e_hello_python_ms"],
            &results["e2e_hello_python_cold_ms"],
        );
        let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => json!((a / b * 1000.0).round() / 1000.0),
            _ => Value::Null,
        };
        results["snapshot_cost"] = json!({
            "restore_to_ready_p50_ms": s["boot_ms_p50"], "boot_to_ready_p50_ms": c["boot_ms_p50"],
            "ready_ratio": ratio(&s["boot_ms_p50"], &c["boot_ms_p50"]),
            "e2e_p50_snapshot_ms": s["p50"], "e2e_p50_cold_ms": c["p50"],
            "e2e_ratio": ratio(&s["p50"], &c["p50"]),
            "pss_per_vm_snapshot_mib": results["memory_snapshot"]["pss_per_vm_mib"],
            "pss_per_vm_cold_mib": results["memory_cold"]["pss_per_vm_mib"],
            "pss_ratio": ratio(&results["memory_snapshot"]["pss_per_vm_mib"], &results["memory_cold"]["pss_per_vm_mib"]),
        });
        // The jail's cost, side by side: the same requests with the jail turned off.
        let unjailed = e2e::start_server_with(&server_bin, 4, "[jail]\nenabled = false\n")?;
        results["e2e_hello_python_unjailed_ms"] = e2e::latency(&unjailed, requests)?;
        drop(unjailed);
        let j = &results["e2e_hello_python_ms"];
        let u = &results["e2e_hello_python_unjailed_ms"];
        if let (Some(a), Some(b)) = (j["p50"].as_f64(), u["p50"].as_f64()) {
            results["jail_cost"] = json!({
                "e2e_p50_jailed_ms": a, "e2e_p50_unjailed_ms": b,
                "e2e_p50_ratio": (a / b * 1000.0).round() / 1000.0,
                "boot_p50_jailed_ms": j["boot_ms_p50"], "boot_p50_unjailed_ms": u["boot_ms_p50"],
            });
        }
        const POOL: &str = "[pool]\nsize = 1\nlanguages = [\"python\"]\n";
        let pooled = e2e::start_server_with(&server_bin, 4, POOL)?;
        results["e2e_hello_python_pooled_ms"] = e2e::pooled_latency(&pooled, requests)?;
        drop(pooled);
        let pooled_cold = e2e::start_server_with(&server_bin, 4, &format!("{POOL}{COLD}"))?;
        results["e2e_hello_python_pooled_cold_ms"] = e2e::pooled_latency(&pooled_cold, requests)?;
        drop(pooled_cold);
    }

    // 5. Block roots against initramfs images (cold boots, three languages).
    if !args.no_formats {
        results["formats"] = formats::measure(&bin.join("cloude-server"), requests.min(20));
    }
    finish(&path, &results)
}

fn finish(path: &Path, results: &Value) -> anyhow::Result<i32> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(results)?)?;
    println!("{}", table(results));
    if results.get("formats").is_some() {
        println!(
            "\nBlock roots vs initramfs (cold boots):\n\n{}",
            formats::table(&results["formats"])
        );
    }
    eprintln!("bench: wrote {}", path.display());
    Ok(0)
}

/// Runs the boot comparison where /dev/kvm boots Linux: directly on VT-x/AMD-V hosts, else in
/// the KVM lab.
fn boot_to_ready(kernel: &str, initrd: &str, runs: usize) -> anyhow::Result<Value> {
    // The release binary (not current_exe: a rebuild may have replaced the running one).
    let me = deps::release_dir().join("xtask");
    let vmm = deps::release_dir().join("cloude-vmm");
    let inner = |c: &mut Command| {
        c.arg("bench-boot")
            .args(["--kernel", kernel, "--initrd", initrd, "--runs"])
            .arg(runs.to_string())
            .arg("--vmm")
            .arg(&vmm);
    };
    let (mut cmd, place) = if hardware_kvm() {
        let mut c = Command::new(&me);
        inner(&mut c);
        (c, "host (hardware KVM)")
    } else {
        let mut c = Command::new(&me);
        c.args([
            "lab",
            "--no-build",
            "--memory-mib",
            "3072",
            "--timeout",
            "900",
        ])
        .args(["--copy", initrd, "--copy"])
        .arg(&me)
        .arg("--")
        .arg(&me);
        inner(&mut c);
        (c, "KVM lab (nested KVM under QEMU TCG)")
    };
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run the boot benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the boot benchmark printed no result ({})", out.status))?;
    let mut v: Value = serde_json::from_str(line)?;
    v["where"] = json!(place);
    Ok(v)
}

fn hardware_kvm() -> bool {
    cloude_image::kernel::HostKvm::gather()
        .linux_capable()
        .is_some()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let host = cloude_image::kernel::HostKvm::gather();
    let kvm = if host.linux_capable().is_some() {
        "hardware"
    } else if host.is_pvm() {
        "kvm_pvm (cannot boot Linux)"
    } else {
        "none"
    };
    json!({"cpu": model, "cores": cores, "kvm": kvm})
}

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(deps::root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn table(r: &Value) -> String {
    let f = |v: &Value| match v {
        Value::Null => "—".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let b = &r["boot_to_ready_ms"];
    let e = &r["e2e_hello_python_ms"];
    let mut s = String::new();
    s.push_str(&format!(
        "Machine: {} ({} cores, KVM: {}), commit {}, hypervisor for the API: {}\n\n",
        f(&r["machine"]["cpu"]),
        f(&r["machine"]["cores"]),
        f(&r["machine"]["kvm"]),
        f(&r["commit"]),
        f(&r["hypervisor"]),
    ));
    s.push_str("| measure | Cloude | peer | ratio |\n|---|---|---|---|\n");
    s.push_str(&format!(
        "| boot to ready, p50 ms ({}) | {} | QEMU microvm {} | {} |\n",
        f(&b["where"]),
        f(&b["cloude_p50"]),
        f(&b["qemu_microvm_p50"]),
        f(&b["ratio"])
    ));
    let cr = &b["cloude_restore"];
    s.push_str(&format!(
        "| cloude-vmm: restore to agent answer vs boot to ready marker, p50 ms ({}) | {} | boot {} | {} |\n",
        f(&b["where"]),
        f(&cr["restore_to_ready_p50"]),
        f(&b["cloude_p50"]),
        match (cr["restore_to_ready_p50"].as_f64(), b["cloude_p50"].as_f64()) {
            (Some(r), Some(c)) if c > 0.0 => format!("{:.3}", r / c),
            _ => "—".into(),
        }
    ));
    s.push_str(&format!(
        "| hello.py end to end (VMs from snapshots), p50 / p90 / p99 ms | {} / {} / {} | host python3 {} | {} |\n",
        f(&e["p50"]),
        f(&e["p90"]),
        f(&e["p99"]),
        f(&e["host_python_p50"]),
        match (e["p50"].as_f64(), e["host_python_p50"].as_f64()) {
            (Some(a), Some(h)) if h > 0.0 => format!("{:.1}×", a / h),
            _ => "—".into(),
        }
    ));
    let c = &r["e2e_hello_python_cold_ms"];
    s.push_str(&format!(
        "| hello.py end to end, every VM booted cold, p50 / p90 / p99 ms | {} / {} / {} | host python3 {} | {} |\n",
        f(&c["p50"]),
        f(&c["p90"]),
        f(&c["p99"]),
        f(&e["host_python_p50"]),
        match (c["p50"].as_f64(), e["host_python_p50"].as_f64()) {
            (Some(a), Some(h)) if h > 0.0 => format!("{:.1}×", a / h),
            _ => "—".into(),
        }
    ));
    let sc = &r["snapshot_cost"];
    s.push_str(&format!(
        "| snapshots: restore to ready vs boot to ready, p50 ms ({}) | {} | cold boot {} | {} |\n",
        f(&r["hypervisor"]),
        f(&sc["restore_to_ready_p50_ms"]),
        f(&sc["boot_to_ready_p50_ms"]),
        f(&sc["ready_ratio"])
    ));
    s.push_str(&format!(
        "| snapshots: hello.py e2e p50 ms, restored vs cold | {} | cold {} | {} |\n",
        f(&sc["e2e_p50_snapshot_ms"]),
        f(&sc["e2e_p50_cold_ms"]),
        f(&sc["e2e_ratio"])
    ));
    s.push_str(&format!(
        "| snapshots: PSS per VM, 4 VMs at once, MiB, restored vs cold | {} | cold {} | {} |\n",
        f(&sc["pss_per_vm_snapshot_mib"]),
        f(&sc["pss_per_vm_cold_mib"]),
        f(&sc["pss_ratio"])
    ));
    let pc = &r["e2e_hello_python_pooled_cold_ms"];
    s.push_str(&format!(
        "| hello.py with a warm pool of cold-booted VMs, p50 / p90 / p99 ms | {} / {} / {} | host python3 {} | |\n",
        f(&pc["p50"]),
        f(&pc["p90"]),
        f(&pc["p99"]),
        f(&e["host_python_p50"]),
    ));
    let w = &r["e2e_hello_python_pooled_ms"];
    s.push_str(&format!(
        "| hello.py with a warm pool of restored VMs, p50 / p90 / p99 ms | {} / {} / {} | host python3 {} | {} |\n",
        f(&w["p50"]),
        f(&w["p90"]),
        f(&w["p99"]),
        f(&e["host_python_p50"]),
        match (w["p50"].as_f64(), e["host_python_p50"].as_f64()) {
            (Some(a), Some(h)) if h > 0.0 => format!("{:.1}×", a / h),
            _ => "—".into(),
        }
    ));
    s.push_str(&format!(
        "| VMM RSS overhead (1 vCPU, 128 MiB), MiB, p50 | {} | Firecracker bound 5 | |\n",
        f(&r["vmm_overhead_rss_mib"])
    ));
    s.push_str(&format!(
        "| VMM CPU from start to first KVM_RUN, ms, p50 (without huge pages) | {} ({}) | Firecracker bound 8 | |\n",
        f(&r["vmm_start_to_first_run_cpu_ms"]),
        f(&r["vmm_overhead"]["no_huge_pages"]["first_run_cpu_ms_p50"])
    ));
    let o = &r["vmm_overhead"];
    s.push_str(&format!(
        "| jail: spawn to first KVM_RUN, ms, p50, jailed vs not | {} | unjailed {} | +{} ms |\n",
        f(&o["jailed"]["spawn_to_first_run_ms_p50"]),
        f(&o["huge_pages"]["spawn_to_first_run_ms_p50"]),
        f(&o["jail_added_spawn_to_first_run_ms"])
    ));
    s.push_str(&format!(
        "| jail: VMM CPU to first KVM_RUN (seccomp included), ms, p50 | {} | unjailed {} | |\n",
        f(&o["jailed"]["first_run_cpu_ms_p50"]),
        f(&o["huge_pages"]["first_run_cpu_ms_p50"])
    ));
    let j = &r["jail_cost"];
    s.push_str(&format!(
        "| jail: hello.py e2e p50 ms (boot p50), jailed vs not | {} ({}) | unjailed {} ({}) | {} |\n",
        f(&j["e2e_p50_jailed_ms"]),
        f(&j["boot_p50_jailed_ms"]),
        f(&j["e2e_p50_unjailed_ms"]),
        f(&j["boot_p50_unjailed_ms"]),
        f(&j["e2e_p50_ratio"])
    ));
    if let Some(t) = r["throughput"].as_array() {
        s.push_str("\n| concurrency | req/s | p99 ms | errors |\n|---|---|---|---|\n");
        for row in t {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                f(&row["concurrency"]),
                f(&row["rps"]),
                f(&row["p99_ms"]),
                f(&row["errors"])
            ));
        }
    }
    s
}
