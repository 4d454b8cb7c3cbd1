//! Pass/fail bookkeeping and the figures of the final summary.

use std::time::Duration;

use serde_json::Value;

#[derive(Default)]
pub struct Checks {
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub passed: usize,
    /// Hostile programs run in real VMs.
    pub hostile_programs: usize,
    /// Malformed or abusive HTTP requests sent.
    pub bad_requests: usize,
    /// Faults injected (hypervisor kills, disconnects, SIGTERMs, slow clients).
    pub faults: usize,
    /// Requests sent by the load phase.
    pub load_requests: usize,
    /// Requests of the memory run (within the VM limit, between the two RSS readings).
    pub memory_run_requests: usize,
    /// Leaked processes, sockets, directories, fds or temp files found.
    pub leaks: usize,
}

impl Checks {
    pub fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            eprintln!("reliability: ok   {name}");
        } else {
            eprintln!("reliability: FAIL {name}: {detail}");
            self.failures.push(format!("{name}: {detail}"));
        }
    }

    pub fn note(&mut self, line: String) {
        eprintln!("reliability: note {line}");
        self.notes.push(line);
    }

    pub fn summary(&self, took: Duration) {
        eprintln!("\n==== reliability summary ====");
        for n in &self.notes {
            eprintln!("  {n}");
        }
        eprintln!("  hostile programs tried:  {}", self.hostile_programs);
        eprintln!("  bad requests tried:      {}", self.bad_requests);
        eprintln!("  faults injected:         {}", self.faults);
        eprintln!("  requests under load:     {}", self.load_requests);
        eprintln!("  memory-run requests:     {}", self.memory_run_requests);
        eprintln!("  leaks found:             {}", self.leaks);
        eprintln!(
            "  checks: {} passed, {} failed; {:.0} s",
            self.passed,
            self.failures.len(),
            took.as_secs_f64()
        );
        eprintln!("=============================");
    }
}

/// A response body, shortened for messages.
pub fn short(v: &Value) -> String {
    v.to_string().chars().take(500).collect()
}
