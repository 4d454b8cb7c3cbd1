//! Harnesses behind the cargo-fuzz targets in `fuzz_targets/`, kept in a library so that plain
//! `cargo test` (stable, no sanitizer) can replay saved inputs from `regressions/<target>/`.
//!
//! Each harness takes arbitrary bytes and panics only when an invariant of the code under test
//! breaks: that panic is the crash libFuzzer reports.
#![forbid(unsafe_code)]

pub mod api;
pub mod cpio;
pub mod oci;

/// Every fuzz target, by name (the file names in `fuzz_targets/`).
pub const TARGETS: &[&str] = &[
    "agent_protocol",
    "api_request",
    "cpio_reader",
    "e2b_messages",
    "interactive_messages",
    "judge0_request",
    "judge0_zip",
    "mcp_arguments",
    "oci_layers",
    "piston_request",
    "vmm_snapshot_state",
    "vmm_virtio_blk",
    "vmm_virtqueue_vsock",
];

/// Runs target `name` on `data`; `false` when there is no such target.
pub fn run_target(name: &str, data: &[u8]) -> bool {
    match name {
        "agent_protocol" => agent_protocol(data),
        "api_request" => api::run_v1(data),
        "cpio_reader" => cpio::run(data),
        "e2b_messages" => e2b_messages(data),
        "interactive_messages" => interactive_messages(data),
        "judge0_request" => api::run_judge0(data),
        "judge0_zip" => api::run_judge0_zip(data),
        "mcp_arguments" => api::run_mcp(data),
        "oci_layers" => oci::run(data),
        "piston_request" => api::run_piston(data),
        "vmm_snapshot_state" => cloude_vmm::snapshot::fuzz_decode(data),
        "vmm_virtio_blk" => {
            cloude_vmm::devices::virtio::fuzzing::block_requests(data);
        }
        "vmm_virtqueue_vsock" => cloude_vmm::devices::virtio::fuzzing::parse_rings(data),
        _ => return false,
    }
    true
}

/// The E2B face: Connect envelopes (walked, round-tripped, a stream request's one message),
/// envd `Start` messages turned into sandbox processes, paths resolved in a home; the agent's
/// sandbox-process and file-operation requests.
pub fn e2b_messages(data: &[u8]) {
    cloude_server::api::e2b::fuzz_messages(data);
    if let Ok(p) = serde_json::from_slice::<cloude_protocol::sandbox::ProcStart>(data) {
        let _ = p.validate();
    }
    if let Ok(op) = serde_json::from_slice::<cloude_protocol::sandbox::FileOp>(data) {
        let _ = op.validate();
    }
}

/// Interactive runs: a hostile agent's event stream read by the host (bounded, never a panic),
/// the agent's reading of the host's input lines, and both WebSocket faces' client messages.
pub fn interactive_messages(data: &[u8]) {
    cloude_server::agent::fuzz_event_lines(data);
    if let Ok(i) = serde_json::from_slice::<cloude_protocol::interactive::Input>(data) {
        let line = serde_json::to_vec(&i).expect("an input serialises");
        let back: cloude_protocol::interactive::Input =
            serde_json::from_slice(&line).expect("an input reads back");
        assert_eq!(back, i);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        cloude_server::api::piston::connect::fuzz_client_message(text);
        if let Ok(cloude_api::WsInput::Signal { signal }) =
            serde_json::from_str::<cloude_api::WsInput>(text)
        {
            let _ = signal.number();
        }
    }
}

/// The agent's request decoding: any bytes -> `RunRequest` -> validate, never a panic.
pub fn agent_protocol(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<cloude_protocol::RunRequest>(data) {
        let _ = req.validate();
        for f in &req.files {
            let _ = f.bytes();
        }
    }
    if let Ok(req) = serde_json::from_slice::<cloude_protocol::sandbox::ExecRequest>(data) {
        let _ = req.validate();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = cloude_protocol::validate_file_name(s);
        let _ = cloude_protocol::parse_ready_line(s);
        // Sandbox paths, the tcp transport's agent token and AUTH line.
        let _ = cloude_protocol::sandbox::validate_sandbox_path(s);
        if let Some(t) = cloude_protocol::agent_token_of(s) {
            assert!(cloude_protocol::agent_auth_ok(
                cloude_protocol::agent_auth_line(&t).trim_end(),
                &t
            ));
        }
        let _ = cloude_protocol::agent_auth_ok(s, &"ab".repeat(32));
    }
}
