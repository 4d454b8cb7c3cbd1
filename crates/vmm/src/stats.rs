//! Start-up measurements printed when `CLOUDE_VMM_STATS=1`: CPU time until the first KVM_RUN and
//! the VMM's resident memory excluding guest memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Kinds of VM exit counted for the boot-cost report (a machine-independent measure).
#[derive(Clone, Copy, Debug)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Intr,
    Other,
}

const EXIT_NAMES: [&str; 7] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "intr",
    "other",
];

/// VM exits by kind, over all vCPUs (relaxed counters: a few ns against an exit's microseconds).
static EXITS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

/// Counts one exit.
pub fn count_exit(kind: ExitKind) {
    EXITS[kind as usize].fetch_add(1, Ordering::Relaxed);
}

/// The counts as one JSON line: `{"vm_exits":{"io_in":N,...,"total":N}}`.
pub fn exits_json() -> String {
    let mut total = 0;
    let mut parts = Vec::new();
    for (name, c) in EXIT_NAMES.iter().zip(EXITS.iter()) {
        let n = c.load(Ordering::Relaxed);
        total += n;
        parts.push(format!("\"{name}\":{n}"));
    }
    format!("{{\"vm_exits\":{{{},\"total\":{total}}}}}", parts.join(","))
}

/// Environment variable that turns the report on.
pub const STATS_ENV: &str = "CLOUDE_VMM_STATS";

/// True when the report is wanted.
pub fn enabled() -> bool {
    std::env::var_os(STATS_ENV).is_some_and(|v| v == "1")
}

/// CPU time (user + system) of this process so far, in microseconds.
pub fn cpu_time_us() -> u64 {
    // SAFETY: getrusage only writes the zero-initialised struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Resident KiB of all mappings except those starting at the given guest-memory host addresses.
pub fn rss_excluding_kib(guest_starts: &[u64]) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0u64;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _)) = first.split_once('-') {
            if let Ok(s) = u64::from_str_radix(start, 16) {
                skip = guest_starts.contains(&s);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            if !skip {
                total += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    Some(total)
}

/// Prints the first-KVM_RUN report.
pub fn report_first_run(started: Instant, guest_starts: &[u64]) {
    let wall = started.elapsed();
    let cpu = cpu_time_us();
    let rss = rss_excluding_kib(guest_starts).unwrap_or(0);
    eprintln!(
        "cloude-vmm: first KVM_RUN after {:.2} ms wall, {:.2} ms CPU; VMM RSS excluding guest memory {} KiB",
        wall.as_secs_f64() * 1e3,
        cpu as f64 / 1e3,
        rss
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_counts_are_json() {
        count_exit(ExitKind::IoOut);
        count_exit(ExitKind::IoOut);
        let j = exits_json();
        assert!(j.starts_with("{\"vm_exits\":{\"io_in\":"), "{j}");
        assert!(j.ends_with("}}"), "{j}");
        let io_out: u64 = j
            .split("\"io_out\":")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .expect("io_out count");
        assert!(io_out >= 2, "{j}");
    }

    #[test]
    fn rss_is_positive_and_cpu_advances() {
        assert!(rss_excluding_kib(&[]).expect("smaps") > 0);
        let a = cpu_time_us();
        // Burn CPU until the process clock moves (it may be tick-granular), for at most 5 s of
        // wall time; `black_box` in the loop keeps the optimiser from folding the work away.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        while cpu_time_us() == a && Instant::now() < deadline {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_add(i * i));
            }
        }
        assert!(
            cpu_time_us() > a,
            "CPU time did not advance within 5 s of busy work"
        );
    }
}
