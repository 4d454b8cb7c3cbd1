//! The two line protocols `cloude-vmm` speaks on its host Unix sockets, stated once for the VMM
//! (which answers) and for the server, the tests and the bench (which ask).
//!
//! - **Hybrid vsock** (`--vsock-uds`): a host client connects, writes `CONNECT <port>\n` and, once
//!   the guest accepted the connection, reads `OK <host port>\n`; after that the socket is the
//!   byte stream to the guest's `<port>`. A refused or failed connection is closed without a word.
//! - **Snapshot control** (`--snapshot-control`): `SNAPSHOT <absolute dir>\n` is answered `OK\n`
//!   once `state` and `memory` are written there, or `ERR <reason>\n`.

use std::path::Path;

/// The hybrid-vsock request for guest port `port`, newline included.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The guest port of a `CONNECT <port>` line (newline removed; a trailing `\r` is allowed).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    s.strip_prefix("CONNECT ")?.parse().ok()
}

/// The VMM's answer once the guest accepted: `OK <host port>\n`.
pub fn connected_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// True when `line` is the answer [`connected_line`] writes (with or without its newline).
pub fn is_connected(line: &str) -> bool {
    line.strip_prefix("OK ")
        .map(|p| p.trim_end())
        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The snapshot command word.
pub const SNAPSHOT_COMMAND: &str = "SNAPSHOT";
/// The largest `state` file a snapshot may have: a 24-byte header plus a body of at most 8 MiB
/// (cloude-vmm refuses a larger body; the server refuses a larger file).
pub const SNAPSHOT_STATE_BODY_MAX_BYTES: u64 = 8 << 20;
pub const SNAPSHOT_STATE_FILE_MAX_BYTES: u64 = SNAPSHOT_STATE_BODY_MAX_BYTES + 24;

/// The order to snapshot into `dir`, newline included.
pub fn snapshot_line(dir: &Path) -> String {
    format!("{SNAPSHOT_COMMAND} {}\n", dir.display())
}

/// The control socket's answer to a snapshot that was written.
pub const CONTROL_OK: &str = "OK\n";

/// The control socket's answer to a refused or failed order (`reason` on one line).
pub fn control_error_line(reason: &str) -> String {
    format!("ERR {}\n", reason.replace(['\n', '\r'], " "))
}

/// True when the control socket's answer says the snapshot was written.
pub fn control_ok(answer: &str) -> bool {
    answer.trim_end() == CONTROL_OK.trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_round_trip() {
        let l = connect_line(1024);
        assert_eq!(l, "CONNECT 1024\n");
        assert_eq!(parse_connect(l.trim_end().as_bytes()), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 1024"), None);
    }

    #[test]
    fn answers_are_recognised_and_nothing_else() {
        assert!(is_connected(&connected_line(3)));
        assert!(is_connected("OK 3"));
        assert!(!is_connected("OK \n"));
        assert!(!is_connected("OK x\n"));
        assert!(!is_connected("ERR no\n"));
        assert!(control_ok(CONTROL_OK));
        assert!(control_ok("OK"));
        assert!(!control_ok("OK 3\n"));
        assert_eq!(control_error_line("a\nb"), "ERR a b\n");
        assert_eq!(snapshot_line(Path::new("/s")), "SNAPSHOT /s\n");
    }
}
