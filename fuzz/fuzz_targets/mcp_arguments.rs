//! The MCP tools' arguments; see `cloude_fuzz::api::run_mcp`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::api::run_mcp(data));
