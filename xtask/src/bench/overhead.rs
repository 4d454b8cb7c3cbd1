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

/// A uid for the jailed start-ups (the top of the server's default range).
const BENCH_UID: u32 = 2_099_999;

/// Medians over [`RUNS`] start-ups: with huge-page advice (the default), without, and jailed as
/// the server runs it (a cgroup made and removed per start-up, the `cloude-jail` step, seccomp).
pub fn measure(vmm: &Path, kernel: &Path, jail: &Path) -> anyhow::Result<Value> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing");
    }
    let mut out = json!({ "guest_mib": GUEST_MIB, "runs": RUNS });
    for (key, extra, jailed) in [
        ("huge_pages", None, false),
        ("no_huge_pages", Some("--no-huge-pages"), false),
        ("jailed", None, true),
    ] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            samples.push(measure_once(vmm, kernel, extra, jailed.then_some(jail))?);
        }
        let values =
            |k: &str| -> Vec<f64> { samples.iter().filter_map(|s| s[k].as_f64()).collect() };
        let med = |k: &str| percentile(&values(k), 50.0).map(r2);
        out[key] = json!({
            "first_run_cpu_ms_p50": med("first_run_cpu_ms"),
            "first_run_wall_ms_p50": med("first_run_wall_ms"),
            "rss_overhead_mib_p50": med("rss_overhead_mib"),
            "guest_touched_mib_p50": med("guest_touched_mib"),
            "spawn_to_first_run_ms_p50": med("spawn_to_first_run_ms"),
            "first_run_cpu_ms_samples": values("first_run_cpu_ms"),
            "spawn_to_first_run_ms_samples": values("spawn_to_first_run_ms"),
        });
    }
    let p50 = |k: &str, f: &str| out[k][f].as_f64();
    if let (Some(a), Some(b)) = (
        p50("jailed", "spawn_to_first_run_ms_p50"),
        p50("huge_pages", "spawn_to_first_run_ms_p50"),
    ) {
        out["jail_added_spawn_to_first_run_ms"] = json!(r2(a - b));
    }
    out["rss_overhead_mib"] = out["huge_pages"]["rss_overhead_mib_p50"].clone();
    out["first_run_cpu_ms"] = out["huge_pages"]["first_run_cpu_ms_p50"].clone();
    Ok(out)
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One start-up: RSS split after the guest has run a little, the VMM's own first-run report,
/// and the wall time from our spawn to that report (which includes the jail step when jailed).
fn measure_once(
    vmm: &Path,
    kernel: &Path,
    extra: Option<&str>,
    jail: Option<&Path>,
) -> anyhow::Result<Value> {
    let dir = tempfile_dir()?;
    let initrd = dir.join("empty.cpio");
    // A valid, empty newc archive (just the trailer): the kernel only has to find it.
    std::fs::write(&initrd, newc_trailer())?;
    let vm_args = |k: &Path, i: &Path| -> Vec<String> {
        let mut a = vec![
            "--kernel".to_string(),
            k.display().to_string(),
            "--initrd".into(),
            i.display().to_string(),
            "--memory-mib".into(),
            GUEST_MIB.to_string(),
            "--vcpus".into(),
            "1".into(),
        ];
        a.extend(extra.map(str::to_string));
        a
    };
    let started = std::time::Instant::now();
    let (mut cmd, group) = match jail {
        None => {
            let mut c = Command::new(vmm);
            c.args(vm_args(kernel, &initrd))
                .env("CLOUDE_VMM_STATS", "1");
            (c, None)
        }
        Some(jailer) => {
            // As the server does it: a cgroup with limits, then the jail step.
            let h = cloude_jail::cgroup::Hierarchy::detect(Path::new(
                cloude_jail::cgroup::CGROUP_MOUNT,
            ))?;
            let cgs =
                cloude_jail::cgroup::Cgroups::new(h, &format!("bench-{}", std::process::id()))?;
            let g = cgs.create(
                "vm",
                cloude_jail::cgroup::Limits {
                    memory_bytes: (GUEST_MIB + 64) << 20,
                    pids: 16,
                    cpu_millis: 1500,
                },
            )?;
            let root = dir.join("root");
            std::fs::create_dir_all(&root)?;
            let mut s = cloude_jail::Spec::new(BENCH_UID, BENCH_UID, root);
            s.cgroup_procs = g.procs_files();
            s.bind_ro(kernel, "/kernel")
                .bind_ro(&initrd, "/initrd")
                .device("/dev/kvm", "/dev/kvm");
            s.env = vec!["CLOUDE_VMM_STATS=1".into()];
            s.exec = Some(vmm.to_path_buf());
            s.args = vm_args(Path::new("/kernel"), Path::new("/initrd"));
            let mut c = Command::new(jailer);
            c.args(s.to_args());
            (c, Some((cgs, g)))
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start cloude-vmm")?;
    let err = child.stderr.take().context("stderr is piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(v) = parse_first_run(&l) {
                let _ = tx.send((v, started.elapsed()));
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).ok();
    // Let the guest run a little so the VMM reaches its steady state.
    std::thread::sleep(Duration::from_millis(1500));
    // Jailed, the VMM is the jailer's child.
    let pid = match jail {
        None => Some(child.id()),
        Some(_) => child_of(child.id()),
    };
    let smaps = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/smaps")).ok())
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    if let Some((cgs, mut g)) = group {
        let _ = g.remove(Duration::from_secs(5));
        cgs.remove();
    }
    let _ = std::fs::remove_dir_all(&dir);
    if smaps.is_empty() {
        bail!("cloude-vmm exited before it could be measured");
    }
    let (total, guest) = rss_split(&smaps, GUEST_MIB * 1024);
    let (stats, spawn_to_first) = match first {
        Some((v, d)) => (v, Some(r2(d.as_secs_f64() * 1000.0))),
        None => (Value::Null, None),
    };
    Ok(json!({
        "rss_total_mib": r2(total as f64 / 1024.0),
        "guest_touched_mib": r2(guest as f64 / 1024.0),
        "rss_overhead_mib": r2((total - guest) as f64 / 1024.0),
        "first_run_cpu_ms": stats["first_run_cpu_ms"].clone(),
        "first_run_wall_ms": stats["first_run_wall_ms"].clone(),
        "spawn_to_first_run_ms": spawn_to_first,
    }))
}

/// The first child of `pid` (from `/proc/*/stat`).
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let p: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == pid).then_some(p)
    })
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
    cloude_image::image::cpio::Writer::new(Vec::new())
        .finish(512)
        .expect("writing to memory cannot fail")
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
