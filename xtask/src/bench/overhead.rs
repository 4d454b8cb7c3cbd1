//! VMM overhead on this machine's own `/dev/kvm` (no Linux boot needed): resident memory of a
//! `cloude-vmm` process minus the guest memory it has touched, and CPU time from process start
//! to the first KVM_RUN (reported by the VMM itself when `CLOUDE_VMM_STATS=1`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::stats::percentile;

const GUEST_MIB: u64 = 128;

/// Parses `/proc/PID/smaps`: (total Rss KiB, Rss KiB of the mapping of exactly `size_kib`).
pub fn rss_split(smaps: &str, size_kib: u64) -> (u64, u64) {
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            in_guest = kib(v) == size_kib;
        } else if let Some(v) = l.strip_prefix("Rss:") {
            let k = kib(v);
            total += k;
            if in_guest {
                guest += k;
            }
        }
    }
    (total, guest)
}

fn kib(v: &str) -> u64 {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

/// Samples per variant: single start-ups vary a lot on a shared machine (page faults, host
/// compaction), so the medians are what is reported.
const RUNS: usize = 11;

/// Medians over [`RUNS`] start-ups, with huge-page advice (the default) and without.
pub fn measure(vmm: &Path, kernel: &Path) -> anyhow::Result<Value> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing");
    }
    let mut out = json!({ "guest_mib": GUEST_MIB, "runs": RUNS });
    for (key, extra) in [
        ("huge_pages", None),
        ("no_huge_pages", Some("--no-huge-pages")),
    ] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            samples.push(measure_once(vmm, kernel, extra)?);
        }
        let values =
            |k: &str| -> Vec<f64> { samples.iter().filter_map(|s| s[k].as_f64()).collect() };
        let med = |k: &str| percentile(&values(k), 50.0).map(r2);
        out[key] = json!({
            "first_run_cpu_ms_p50": med("first_run_cpu_ms"),
            "first_run_wall_ms_p50": med("first_run_wall_ms"),
            "rss_overhead_mib_p50": med("rss_overhead_mib"),
            "guest_touched_mib_p50": med("guest_touched_mib"),
            "first_run_cpu_ms_samples": values("first_run_cpu_ms"),
        });
    }
    out["rss_overhead_mib"] = out["huge_pages"]["rss_overhead_mib_p50"].clone();
    out["first_run_cpu_ms"] = out["huge_pages"]["first_run_cpu_ms_p50"].clone();
    Ok(out)
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One start-up: RSS split after the guest has run a little, and the VMM's own first-run report.
fn measure_once(vmm: &Path, kernel: &Path, extra: Option<&str>) -> anyhow::Result<Value> {
    let dir = tempfile_dir()?;
    let initrd = dir.join("empty.cpio");
    // A valid, empty newc archive (just the trailer): the kernel only has to find it.
    std::fs::write(&initrd, newc_trailer())?;
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory-mib", &GUEST_MIB.to_string(), "--vcpus", "1"])
        .args(extra)
        .env("CLOUDE_VMM_STATS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start cloude-vmm")?;
    let pid = child.id();
    let err = child.stderr.take().context("stderr is piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(v) = parse_first_run(&l) {
                let _ = tx.send(v);
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).ok();
    // Let the guest run a little so the VMM reaches its steady state.
    std::thread::sleep(Duration::from_millis(1500));
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if smaps.is_empty() {
        bail!("cloude-vmm exited before it could be measured");
    }
    let (total, guest) = rss_split(&smaps, GUEST_MIB * 1024);
    let stats = first.unwrap_or(Value::Null);
    Ok(json!({
        "rss_total_mib": r2(total as f64 / 1024.0),
        "guest_touched_mib": r2(guest as f64 / 1024.0),
        "rss_overhead_mib": r2((total - guest) as f64 / 1024.0),
        "first_run_cpu_ms": stats["first_run_cpu_ms"].clone(),
        "first_run_wall_ms": stats["first_run_wall_ms"].clone(),
    }))
}

/// Parses the VMM's `CLOUDE_VMM_STATS=1` line: "cloude-vmm: first KVM_RUN after W ms wall,
/// C ms CPU; VMM RSS excluding guest memory R KiB".
pub fn parse_first_run(line: &str) -> Option<Value> {
    let rest = line.strip_prefix("cloude-vmm: first KVM_RUN after ")?;
    let (wall, rest) = rest.split_once(" ms wall, ")?;
    let (cpu, rest) = rest.split_once(" ms CPU; VMM RSS excluding guest memory ")?;
    let rss = rest.strip_suffix(" KiB")?;
    Some(json!({
        "first_run_wall_ms": wall.trim().parse::<f64>().ok()?,
        "first_run_cpu_ms": cpu.trim().parse::<f64>().ok()?,
        "first_run_rss_excluding_guest_kib": rss.trim().parse::<u64>().ok()?,
    }))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("cloude-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A newc archive holding only the `TRAILER!!!` entry, padded to 512 bytes.
fn newc_trailer() -> Vec<u8> {
    let name = b"TRAILER!!!\0";
    let mut h = format!("070701{}", "00000000".repeat(11));
    h.push_str(&format!("{:08X}", name.len()));
    h.push_str("00000000");
    let mut v = h.into_bytes();
    v.extend_from_slice(name);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v.resize(512, 0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split() {
        let s = "00400000-00500000 r-xp\nSize: 1024 kB\nRss: 800 kB\n\
                 7f00-8f00 rw-p\nSize: 131072 kB\nRss: 20000 kB\n\
                 9f00-9f10 rw-p\nSize: 64 kB\nRss: 64 kB\n";
        assert_eq!(rss_split(s, 131072), (20864, 20000));
    }

    #[test]
    fn first_run_line() {
        let v = parse_first_run(
            "cloude-vmm: first KVM_RUN after 8.13 ms wall, 3.18 ms CPU; VMM RSS excluding guest memory 1928 KiB",
        )
        .expect("parses");
        assert_eq!(v["first_run_cpu_ms"], 3.18);
        assert_eq!(v["first_run_rss_excluding_guest_kib"], 1928);
        assert!(parse_first_run("cloude-vmm: something else").is_none());
    }

    #[test]
    fn trailer_is_newc() {
        let t = newc_trailer();
        assert!(t.starts_with(b"070701"));
        assert_eq!(&t[110..120], b"TRAILER!!!");
        assert_eq!(t.len(), 512);
    }
}
