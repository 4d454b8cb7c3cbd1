//! Interactive runs: a hostile agent's event stream as the host reads it, the host's input
//! lines, and the WebSocket faces' client messages; see `cloude_fuzz::interactive_messages`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloude_fuzz::interactive_messages(data));
