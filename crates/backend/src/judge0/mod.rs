//! Judge0 CE 1.13.1 compatibility: submissions, their verdicts, their durable queue and the
//! workers that run them. The HTTP side is `api/judge0.rs`.

pub mod callback;
pub mod files;
pub mod request;
pub mod verdict;
pub mod worker;

use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::store::{Store, StoreConfig};

pub use request::Request;
pub use verdict::Outcome;

/// The Judge0 version clients see in `GET /about` (clients pick their language-id tables by it).
pub const JUDGE0_VERSION: &str = "1.13.1";

/// Judge0's status ids and descriptions.
pub const STATUSES: [(i32, &str); 14] = [
    (1, "In Queue"),
    (2, "Processing"),
    (3, "Accepted"),
    (4, "Wrong Answer"),
    (5, "Time Limit Exceeded"),
    (6, "Compilation Error"),
    (7, "Runtime Error (SIGSEGV)"),
    (8, "Runtime Error (SIGXFSZ)"),
    (9, "Runtime Error (SIGFPE)"),
    (10, "Runtime Error (SIGABRT)"),
    (11, "Runtime Error (NZEC)"),
    (12, "Runtime Error (Other)"),
    (13, "Internal Error"),
    (14, "Exec Format Error"),
];

/// A status as a metrics label: `accepted`, `runtime_error_sigsegv`, ...
pub fn status_label(id: i32) -> String {
    status_description(id)
        .to_ascii_lowercase()
        .replace(['(', ')'], "")
        .replace(' ', "_")
}

pub fn status_description(id: i32) -> &'static str {
    STATUSES
        .iter()
        .find(|(i, _)| *i == id)
        .map_or("Unknown", |(_, d)| d)
}

/// `[judge0]` in the server configuration: Judge0's own settings (same names and units as
/// Judge0's `judge0.conf` / `GET /config_info`), plus the caps Cloude adds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Judge0Config {
    /// Serve the Judge0 routes at all.
    pub enabled: bool,
    /// Accepted API keys (any of them); empty: no authentication.
    pub auth_tokens: Vec<String>,
    /// Header (or query parameter) carrying the key.
    pub auth_header: String,
    pub enable_wait_result: bool,
    pub enable_batched_submissions: bool,
    pub max_submission_batch_size: usize,
    /// Submissions In Queue (in the store, over all servers) beyond which new ones get 503.
    pub max_queue_size: usize,
    /// Largest request body, bytes (a batch included).
    pub max_body_bytes: usize,
    pub enable_compiler_options: bool,
    pub enable_command_line_arguments: bool,
    /// seconds
    pub cpu_time_limit: f64,
    pub max_cpu_time_limit: f64,
    pub cpu_extra_time: f64,
    pub max_cpu_extra_time: f64,
    pub wall_time_limit: f64,
    pub max_wall_time_limit: f64,
    /// KB
    pub memory_limit: u64,
    pub max_memory_limit: u64,
    /// KB (accepted and checked; not enforced separately from the memory limit)
    pub stack_limit: u64,
    pub max_stack_limit: u64,
    /// Tasks at once (the agent's pids cgroup limit, compile stage included).
    pub max_processes_and_or_threads: u64,
    pub max_max_processes_and_or_threads: u64,
    /// KB (accepted and checked; output is capped by `limits.output_limit_bytes`)
    pub max_file_size: u64,
    pub max_max_file_size: u64,
    pub number_of_runs: u64,
    pub max_number_of_runs: u64,
    pub redirect_stderr_to_stdout: bool,
    pub enable_additional_files: bool,
    /// KB: total size of `additional_files` once unpacked.
    pub max_extract_size: u64,
    /// Entries in the `additional_files` zip.
    pub max_additional_files: usize,
    /// Largest uncompressed/compressed ratio of a zip entry (zip bombs).
    pub max_compression_ratio: u64,
    /// Hosts (`host` or `host:port`) `callback_url` may name; empty: callbacks are refused.
    pub callback_hosts: Vec<String>,
    pub callbacks_max_tries: u32,
    /// seconds
    pub callbacks_timeout: f64,
}

/// Most callback attempts a configuration may ask for.
pub const MAX_CALLBACK_TRIES: u32 = 10;
/// Longest `callback_url`.
pub const MAX_CALLBACK_URL_BYTES: usize = 2048;
/// Longest `compiler_options` and `command_line_arguments` (Judge0's limit).
pub const MAX_OPTIONS_CHARS: usize = 512;
/// Most tokens in `GET /submissions/batch`... bounded by `max_submission_batch_size`; this caps
/// that setting.
pub const MAX_BATCH_SIZE: usize = 100;

impl Judge0Config {
    /// Checks the settings among themselves; [`Judge0Config::clamped`] then fits them within
    /// `[limits]`.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            self.cpu_time_limit,
            self.max_cpu_time_limit,
            self.cpu_extra_time,
            self.max_cpu_extra_time,
            self.wall_time_limit,
            self.max_wall_time_limit,
            self.callbacks_timeout,
        ];
        if finite.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("judge0 time settings must be non-negative numbers".into());
        }
        if self.cpu_time_limit > self.max_cpu_time_limit
            || self.cpu_extra_time > self.max_cpu_extra_time
            || self.wall_time_limit > self.max_wall_time_limit
            || self.memory_limit > self.max_memory_limit
            || self.stack_limit > self.max_stack_limit
            || self.max_processes_and_or_threads > self.max_max_processes_and_or_threads
            || self.max_file_size > self.max_max_file_size
            || self.number_of_runs > self.max_number_of_runs
        {
            return Err("every judge0 default must be at most its max_ setting".into());
        }
        if self.wall_time_limit < 1.0 {
            return Err("judge0.wall_time_limit must be at least 1 (as in Judge0)".into());
        }
        // What the agent accepts as the run's rlimits.
        if self.max_stack_limit > cloude_protocol::MAX_STACK_LIMIT_KIB
            || self.max_max_file_size > cloude_protocol::MAX_FILE_SIZE_LIMIT_KIB
        {
            return Err(format!(
                "judge0.max_stack_limit must be at most {} KB and judge0.max_max_file_size at most {} KB",
                cloude_protocol::MAX_STACK_LIMIT_KIB,
                cloude_protocol::MAX_FILE_SIZE_LIMIT_KIB
            ));
        }
        if self.memory_limit < 2048 {
            return Err("judge0.memory_limit must be at least 2048 KB (as in Judge0)".into());
        }
        if self.number_of_runs == 0 || self.max_number_of_runs > 20 {
            return Err(
                "judge0.number_of_runs must be at least 1, max_number_of_runs at most 20".into(),
            );
        }
        if self.max_submission_batch_size == 0 || self.max_submission_batch_size > MAX_BATCH_SIZE {
            return Err(format!(
                "judge0.max_submission_batch_size must be between 1 and {MAX_BATCH_SIZE}"
            ));
        }
        if self.max_queue_size == 0 {
            return Err("judge0.max_queue_size must be at least 1".into());
        }
        if self.max_body_bytes < 64 * 1024 || self.max_body_bytes > 256 * 1024 * 1024 {
            return Err("judge0.max_body_bytes must be between 64 KiB and 256 MiB".into());
        }
        if self.max_additional_files == 0 {
            return Err("judge0.max_additional_files must be at least 1".into());
        }
        if self.max_compression_ratio == 0 {
            return Err("judge0.max_compression_ratio must be at least 1".into());
        }
        if self.callbacks_max_tries == 0 || self.callbacks_max_tries > MAX_CALLBACK_TRIES {
            return Err(format!(
                "judge0.callbacks_max_tries must be between 1 and {MAX_CALLBACK_TRIES}"
            ));
        }
        if self.callbacks_timeout < 0.1 || self.callbacks_timeout > 60.0 {
            return Err("judge0.callbacks_timeout must be between 0.1 and 60 seconds".into());
        }
        if self.auth_header.is_empty()
            || !self
                .auth_header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("judge0.auth_header must be a header name".into());
        }
        if self.auth_tokens.iter().any(|t| t.trim().is_empty()) {
            return Err("judge0.auth_tokens must not contain empty keys".into());
        }
        Ok(())
    }
}

impl Judge0Config {
    /// The settings within the server's `[limits]`, which every job is checked against anyway:
    /// the wall-clock and memory maxima at most `max_timeout_ms` and `max_memory_mib`, the zip's
    /// files at most `max_files - 1` (the source is one), and each default at most its maximum.
    /// `GET /config_info` shows these values.
    pub fn clamped(mut self, limits: &crate::config::Limits) -> Judge0Config {
        self.max_wall_time_limit = self
            .max_wall_time_limit
            .min(limits.max_timeout_ms as f64 / 1000.0);
        self.wall_time_limit = self.wall_time_limit.min(self.max_wall_time_limit);
        self.max_memory_limit = self
            .max_memory_limit
            .min(limits.max_memory_mib.saturating_mul(1024));
        self.memory_limit = self.memory_limit.min(self.max_memory_limit);
        self.max_additional_files = self
            .max_additional_files
            .min(limits.max_files.saturating_sub(1));
        self
    }
}

/// The Judge0 side of a running server: its settings, its store, its workers' signals.
pub struct Judge0 {
    pub config: Judge0Config,
    pub store_config: StoreConfig,
    pub store: Store,
    /// This server's name in the store's `owner` column (unique per process start).
    pub owner: String,
    /// Wakes the dispatcher when this server queued something.
    pub wake: Notify,
    /// Set at shutdown: no new claims; interrupted runs go back to the queue.
    pub closing: AtomicBool,
    /// `callback_hosts` with their addresses resolved at start (callbacks go only there).
    pub callback_pins: callback::Pins,
}

impl Judge0 {
    pub fn new(config: Judge0Config, store_config: StoreConfig, store: Store) -> Judge0 {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "host".into());
        let callback_pins = callback::Pins::resolve(&config.callback_hosts);
        Judge0 {
            callback_pins,
            config,
            store_config,
            store,
            owner: format!("{host}/{}/{}", std::process::id(), &new_token()[..8]),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
        }
    }
}

/// A random (version 4) UUID, as Judge0's tokens are.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn fill_random(buf: &mut [u8]) {
    use std::io::Read as _;
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .is_ok();
    if !ok {
        // No /dev/urandom (never on a normal Linux host): tokens from time, pid and a counter
        // are still unique, but guessable; say so.
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        tracing::warn!("/dev/urandom is unreadable: Judge0 tokens are not random");
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = format!(
            "{:?}{}{n}",
            std::time::SystemTime::now(),
            std::process::id()
        );
        for (i, b) in buf.iter_mut().enumerate() {
            *b = seed
                .bytes()
                .fold(i as u8, |a, c| a.wrapping_mul(31).wrapping_add(c));
        }
    }
}

/// Whether `s` looks like a token we issue (a UUID): anything else is not looked up.
pub fn plausible_token(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        })
}

/// Milliseconds since the epoch as Judge0's timestamps: `2024-05-01T10:00:00.123Z`.
pub fn timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A decimal the way Judge0 (Rails' BigDecimal) prints it: `"0.002"`, `"5.0"`.
pub fn decimal(v: f64) -> String {
    let s = format!("{:.3}", (v * 1000.0).round() / 1000.0);
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

/// Base64 the way Judge0 (Ruby's `Base64.encode64`) sends it: lines of 60 characters, each
/// ending in a newline.
pub fn encode64(b: &[u8]) -> String {
    use base64::Engine as _;
    let flat = base64::engine::general_purpose::STANDARD.encode(b);
    let mut out = String::with_capacity(flat.len() + flat.len() / 60 + 1);
    for chunk in flat.as_bytes().chunks(60) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Base64 as clients send it: padding optional, line breaks and spaces ignored.
pub fn decode64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(&clean)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&clean))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_uuid_v4() {
        let t = new_token();
        assert!(plausible_token(&t), "{t}");
        assert_eq!(&t[14..15], "4");
        assert!(matches!(&t[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(new_token(), t);
        assert!(!plausible_token("../../etc/passwd"));
        assert!(!plausible_token("d85cd024-1548-4165-96c7-7bc88673f19"));
    }

    #[test]
    fn status_labels() {
        assert_eq!(status_label(3), "accepted");
        assert_eq!(status_label(7), "runtime_error_sigsegv");
        assert_eq!(status_label(5), "time_limit_exceeded");
    }

    #[test]
    fn formats() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(decimal(5.0), "5.0");
        assert_eq!(decimal(0.002), "0.002");
        assert_eq!(decimal(0.1204), "0.12");
        assert_eq!(encode64(b"hello, Judge0\n"), "aGVsbG8sIEp1ZGdlMAo=\n");
        let long = encode64(&[0u8; 60]);
        assert_eq!(long.lines().map(str::len).collect::<Vec<_>>(), vec![60, 20]);
        assert_eq!(
            decode64("aGVsbG8s\nIEp1ZGdlMAo=\n").as_deref(),
            Some(&b"hello, Judge0\n"[..])
        );
        assert_eq!(decode64("aGk").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode64("!!"), None);
    }

    #[test]
    fn config_is_checked_then_fitted_to_the_limits() {
        let c = crate::config::Config::embedded();
        c.judge0.validate().expect("valid");
        let mut bad = c.judge0.clone();
        bad.callbacks_max_tries = MAX_CALLBACK_TRIES + 1;
        assert!(bad.validate().is_err());
        let mut bad = c.judge0.clone();
        bad.cpu_time_limit = bad.max_cpu_time_limit + 1.0;
        assert!(bad.validate().is_err());
        let mut bad = c.judge0.clone();
        bad.wall_time_limit = f64::NAN;
        assert!(bad.validate().is_err());
        // Tight [limits] do not make the default [judge0] invalid: it is fitted within them.
        let tight = crate::config::Config::parse(
            "[limits]\nmax_timeout_ms = 1500\ndefault_timeout_ms = 1000\nmax_memory_mib = 64\nmax_files = 3\n",
        )
        .expect("valid");
        let j = &tight.judge0;
        assert_eq!((j.max_wall_time_limit, j.wall_time_limit), (1.5, 1.5));
        assert_eq!((j.max_memory_limit, j.memory_limit), (65536, 65536));
        assert_eq!(j.max_additional_files, 2);
    }
}
