//! The agent's request decoding: any bytes -> RunRequest parse -> validate, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<cloude_protocol::RunRequest>(data) {
        let _ = req.validate();
        for f in &req.files {
            let _ = f.bytes();
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = cloude_protocol::validate_file_name(s);
        let _ = cloude_protocol::parse_ready_line(s);
    }
});
