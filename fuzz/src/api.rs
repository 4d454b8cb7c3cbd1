//! The backend's request decoding and validation (native `/v1` and Piston v2 bodies).
//!
//! Each input runs against two rule sets: the embedded defaults, and tight limits (with
//! networking allowed) so that small inputs reach every limit check. Invariants: a rejection is
//! always a 4xx; an accepted job respects every limit it was checked against, and the agent
//! accepts the run order built from it (no request the backend lets through fails in the guest).

use std::sync::OnceLock;

use base64::Engine as _;
use cloude_image::catalog::Catalog;
use cloude_protocol::Encoding;
use cloude_server::api::error::ApiError;
use cloude_server::config::Config;
use cloude_server::executor::Job;

/// What a request is validated against.
pub struct Rules {
    pub catalog: Catalog,
    pub config: Config,
}

/// Limits small enough for fuzz-sized inputs to cross them (networking needs the tcp transport).
const TIGHT: &str = r#"
[limits]
max_code_bytes = 64
max_stdin_bytes = 16
max_files = 3
max_args = 2
default_timeout_ms = 100
max_timeout_ms = 1000
default_compile_timeout_ms = 100
max_compile_timeout_ms = 1000
max_memory_mib = 64

[network]
allow = true

[vm]
transport = "tcp"
"#;

/// The embedded defaults and the tight rules.
pub fn rules() -> &'static [Rules] {
    static RULES: OnceLock<Vec<Rules>> = OnceLock::new();
    RULES.get_or_init(|| {
        let catalog = Catalog::default_catalog();
        vec![
            Rules {
                catalog: catalog.clone(),
                config: Config::embedded(),
            },
            Rules {
                catalog,
                config: Config::parse(TIGHT).expect("the tight fuzz limits are a valid config"),
            },
        ]
    })
}

/// `POST /v1/executions`.
pub fn run_v1(data: &[u8]) {
    for r in rules() {
        check(
            cloude_server::api::v1::decode_execution(data, &r.catalog, &r.config),
            &r.config,
        );
    }
}

/// `POST /api/v2/execute`.
pub fn run_piston(data: &[u8]) {
    for r in rules() {
        check(
            cloude_server::api::piston::decode_piston(data, &r.catalog, &r.config),
            &r.config,
        );
    }
}

/// The MCP tools' arguments (`tools/call` params), as each tool decodes and checks them before
/// it reaches a VM; an accepted `run_code` is a job within the limits.
pub fn run_mcp(data: &[u8]) {
    for r in rules() {
        if let Some(result) = cloude_server::api::mcp::fuzz_tool_call(data, &r.catalog, &r.config) {
            check(result, &r.config);
        }
    }
}

/// `POST /submissions` (Judge0), both with and without `base64_encoded`. Beyond the job's
/// limits: the stored form round-trips, and every rejection names a field and says why.
pub fn run_judge0(data: &[u8]) {
    for r in rules() {
        for base64 in [false, true] {
            match cloude_server::api::judge0::decode_judge0(data, base64, &r.catalog, &r.config) {
                Ok((req, job)) => {
                    check_job(&job, &r.config);
                    let stored = serde_json::to_string(&req).expect("a request serialises");
                    let back: cloude_server::judge0::Request =
                        serde_json::from_str(&stored).expect("the stored form reads back");
                    assert_eq!(back, req, "the stored form round-trips");
                }
                Err(e) => {
                    assert!(!e.is_empty(), "a rejection without an error");
                    assert!(
                        e.0.iter().all(|(f, m)| !f.is_empty() && !m.is_empty()),
                        "{e:?}"
                    );
                }
            }
        }
    }
}

/// `additional_files`: any bytes as a zip. Whatever is accepted is within every cap and has
/// safe, unique names.
pub fn run_judge0_zip(data: &[u8]) {
    let caps = cloude_server::judge0::files::Caps {
        max_entries: 4,
        max_members: 16,
        max_file_bytes: 4096,
        max_total_bytes: 8192,
        max_ratio: 20,
    };
    if let Ok(files) = cloude_server::judge0::files::unpack(data, &caps) {
        assert!(files.len() <= caps.max_entries, "{} files", files.len());
        let total: usize = files.iter().map(|(_, b)| b.len()).sum();
        assert!(total as u64 <= caps.max_total_bytes, "{total} bytes");
        let mut seen = std::collections::HashSet::new();
        for (name, bytes) in &files {
            assert!(bytes.len() as u64 <= caps.max_file_bytes);
            assert!(
                cloude_protocol::validate_file_name(name).is_ok(),
                "accepted name {name:?}"
            );
            assert!(seen.insert(name.clone()), "duplicate {name:?}");
        }
    }
}

fn check(result: Result<Job, ApiError>, config: &Config) {
    match result {
        Ok(job) => check_job(&job, config),
        Err(e) => {
            assert!(e.status.is_client_error(), "{} for {e:?}", e.status);
            assert!(!e.message.is_empty(), "an error without a message: {e:?}");
        }
    }
}

/// Asserts that an accepted job respects the limits of `config`.
pub fn check_job(job: &Job, config: &Config) {
    let l = &config.limits;
    assert!(!job.files.is_empty(), "a job without files");
    assert!(job.files.len() <= l.max_files, "{} files", job.files.len());
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    for f in &job.files {
        assert!(
            cloude_protocol::validate_file_name(&f.name).is_ok(),
            "accepted file name {:?}",
            f.name
        );
        assert!(seen.insert(f.name.as_str()), "duplicate file {:?}", f.name);
        total += match f.encoding {
            Encoding::Utf8 => f.content.len(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(&f.content)
                .expect("the backend writes valid base64")
                .len(),
        };
    }
    assert!(total <= l.max_code_bytes, "{total} bytes of code accepted");
    assert!(job.stdin.len() <= l.max_stdin_bytes, "stdin over the limit");
    assert!(job.args.len() <= l.max_args, "too many args");
    assert!((1..=l.max_timeout_ms).contains(&job.run_timeout_ms));
    assert!((1..=l.max_compile_timeout_ms).contains(&job.compile_timeout_ms));
    if let Some(m) = job.memory_mib {
        assert!((16..=l.max_memory_mib).contains(&m), "memory_mib {m}");
    }
    assert_ne!(
        job.pids_limit,
        Some(0),
        "the agent refuses a zero pids limit"
    );
    // The run order the executor sends.
    let order = cloude_server::executor::run_request(&job, l.output_limit_bytes);
    if let Err(e) = order.validate() {
        panic!("the backend accepted a job the agent rejects: {e}");
    }
}
