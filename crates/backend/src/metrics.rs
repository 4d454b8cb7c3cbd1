//! Prometheus text exposition, hand-rolled: a few counters, gauges and histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

#[derive(Default)]
struct Inner {
    /// (endpoint, status) -> count
    executions: BTreeMap<(String, String), u64>,
    /// HTTP responses by status code.
    http: BTreeMap<u16, u64>,
    /// phase -> histogram
    latency: BTreeMap<&'static str, Histogram>,
    vms_started: u64,
    vm_failures: u64,
    pool_hits: u64,
    pool_misses: u64,
    /// Snapshot events by kind (`made`, `failed`, `restored`, `restore_failed`, `refused`).
    snapshots: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Live values read at scrape time.
pub struct Gauges {
    pub vms_running: usize,
    /// Booted VMs waiting in the warm pool.
    pub pool_ready: usize,
    pub queue_length: usize,
    pub max_vms: usize,
    /// Sandboxes alive (paused ones included), and of those the paused ones.
    pub sandboxes: usize,
    pub sandboxes_paused: usize,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("metrics lock is never poisoned"))
    }

    pub fn execution(&self, endpoint: &str, status: &str) {
        self.with(|m| {
            *m.executions
                .entry((endpoint.into(), status.into()))
                .or_default() += 1
        });
    }

    pub fn http_response(&self, code: u16) {
        self.with(|m| *m.http.entry(code).or_default() += 1);
    }

    pub fn observe(&self, phase: &'static str, d: Duration) {
        self.with(|m| m.latency.entry(phase).or_default().observe(d.as_secs_f64()));
    }

    pub fn vm_started(&self) {
        self.with(|m| m.vms_started += 1);
    }

    pub fn vm_failed(&self) {
        self.with(|m| m.vm_failures += 1);
    }

    pub fn pool_hit(&self) {
        self.with(|m| m.pool_hits += 1);
    }

    pub fn pool_miss(&self) {
        self.with(|m| m.pool_misses += 1);
    }

    fn snapshot_event(&self, kind: &'static str) {
        self.with(|m| *m.snapshots.entry(kind).or_default() += 1);
    }

    /// A snapshot was made and published.
    pub fn snapshot_made(&self) {
        self.snapshot_event("made");
    }

    /// Making a snapshot failed.
    pub fn snapshot_failed(&self) {
        self.snapshot_event("failed");
    }

    /// A cached snapshot was refused (corrupt, truncated, mismatched) and removed.
    pub fn snapshot_refused(&self) {
        self.snapshot_event("refused");
    }

    /// A VM was restored from a snapshot.
    pub fn snapshot_restored(&self) {
        self.snapshot_event("restored");
    }

    /// A restore failed (the request booted cold).
    pub fn snapshot_restore_failed(&self) {
        self.snapshot_event("restore_failed");
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut o = String::new();
        self.with(|m| {
            let _ = writeln!(
                o,
                "# HELP cloude_executions_total Executions by endpoint and result status."
            );
            let _ = writeln!(o, "# TYPE cloude_executions_total counter");
            for ((e, s), n) in &m.executions {
                let _ = writeln!(
                    o,
                    "cloude_executions_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
            let _ = writeln!(
                o,
                "# HELP cloude_http_responses_total HTTP responses by status code."
            );
            let _ = writeln!(o, "# TYPE cloude_http_responses_total counter");
            for (c, n) in &m.http {
                let _ = writeln!(o, "cloude_http_responses_total{{code=\"{c}\"}} {n}");
            }
            let _ = writeln!(
                o,
                "# HELP cloude_execution_phase_seconds Latency of execution phases."
            );
            let _ = writeln!(o, "# TYPE cloude_execution_phase_seconds histogram");
            for (phase, h) in &m.latency {
                for (i, b) in BUCKETS.iter().enumerate() {
                    let c = h.counts.get(i).copied().unwrap_or(0);
                    let _ = writeln!(
                        o,
                        "cloude_execution_phase_seconds_bucket{{phase=\"{phase}\",le=\"{b}\"}} {c}"
                    );
                }
                let _ = writeln!(
                    o,
                    "cloude_execution_phase_seconds_bucket{{phase=\"{phase}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    o,
                    "cloude_execution_phase_seconds_sum{{phase=\"{phase}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    o,
                    "cloude_execution_phase_seconds_count{{phase=\"{phase}\"}} {}",
                    h.count
                );
            }
            let _ = writeln!(o, "# HELP cloude_vms_started_total VMs booted.");
            let _ = writeln!(o, "# TYPE cloude_vms_started_total counter");
            let _ = writeln!(o, "cloude_vms_started_total {}", m.vms_started);
            let _ = writeln!(
                o,
                "# HELP cloude_vm_failures_total VMs that failed to boot or crashed."
            );
            let _ = writeln!(o, "# TYPE cloude_vm_failures_total counter");
            let _ = writeln!(o, "cloude_vm_failures_total {}", m.vm_failures);
            let _ = writeln!(
                o,
                "# HELP cloude_pool_takes_total Requests of pooled languages, by whether a warm VM was ready."
            );
            let _ = writeln!(o, "# TYPE cloude_pool_takes_total counter");
            let _ = writeln!(o, "cloude_pool_takes_total{{result=\"hit\"}} {}", m.pool_hits);
            let _ = writeln!(o, "cloude_pool_takes_total{{result=\"miss\"}} {}", m.pool_misses);
            let _ = writeln!(
                o,
                "# HELP cloude_snapshot_events_total Snapshots made, failed, refused; restores and failed restores."
            );
            let _ = writeln!(o, "# TYPE cloude_snapshot_events_total counter");
            for kind in ["made", "failed", "refused", "restored", "restore_failed"] {
                let n = m.snapshots.get(kind).copied().unwrap_or(0);
                let _ = writeln!(o, "cloude_snapshot_events_total{{event=\"{kind}\"}} {n}");
            }
        });
        let _ = writeln!(
            o,
            "# HELP cloude_pool_ready Booted VMs waiting in the warm pool."
        );
        let _ = writeln!(o, "# TYPE cloude_pool_ready gauge");
        let _ = writeln!(o, "cloude_pool_ready {}", g.pool_ready);
        let _ = writeln!(o, "# HELP cloude_vms_running VMs running now.");
        let _ = writeln!(o, "# TYPE cloude_vms_running gauge");
        let _ = writeln!(o, "cloude_vms_running {}", g.vms_running);
        let _ = writeln!(o, "# HELP cloude_queue_length Requests waiting for a VM.");
        let _ = writeln!(o, "# TYPE cloude_queue_length gauge");
        let _ = writeln!(o, "cloude_queue_length {}", g.queue_length);
        let _ = writeln!(o, "# HELP cloude_vms_max Most VMs allowed at once.");
        let _ = writeln!(o, "# TYPE cloude_vms_max gauge");
        let _ = writeln!(o, "cloude_vms_max {}", g.max_vms);
        let _ = writeln!(
            o,
            "# HELP cloude_sandboxes Sandboxes alive, by state (a paused one still holds its VM)."
        );
        let _ = writeln!(o, "# TYPE cloude_sandboxes gauge");
        let _ = writeln!(
            o,
            "cloude_sandboxes{{state=\"running\"}} {}",
            g.sandboxes.saturating_sub(g.sandboxes_paused)
        );
        let _ = writeln!(
            o,
            "cloude_sandboxes{{state=\"paused\"}} {}",
            g.sandboxes_paused
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.execution("v1", "ok");
        m.execution("v1", "ok");
        m.observe("total", Duration::from_millis(300));
        let t = m.render(&Gauges {
            vms_running: 2,
            pool_ready: 0,
            queue_length: 1,
            max_vms: 4,
            sandboxes: 3,
            sandboxes_paused: 1,
        });
        assert!(
            t.contains("cloude_executions_total{endpoint=\"v1\",status=\"ok\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("cloude_execution_phase_seconds_bucket{phase=\"total\",le=\"0.25\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("cloude_execution_phase_seconds_bucket{phase=\"total\",le=\"0.5\"} 1"),
            "{t}"
        );
        assert!(t.contains("cloude_vms_running 2"));
        assert!(t.contains("cloude_queue_length 1"));
        assert!(t.contains("cloude_sandboxes{state=\"running\"} 2"), "{t}");
        assert!(t.contains("cloude_sandboxes{state=\"paused\"} 1"), "{t}");
    }
}
