//! Interactive runs: a program that reads its input while it runs.
//!
//! The host asks `GET /v1/run/interactive` with `Connection: upgrade` and
//! `Upgrade: `[`UPGRADE`]; the agent answers `101 Switching Protocols` and both sides then speak
//! NDJSON over the same byte stream. The host's first line is the [`crate::RunRequest`]
//! (without test cases), its later lines are [`Input`]s; the agent's lines are
//! [`crate::StreamEvent`]s (`started`, `output`, `ended` per stage), the last one `result` or
//! `error`, after which it closes its side. Standard input that arrives before the run stage
//! has started is kept for it (the compile stage reads none); it ends when the host sends
//! `close_stdin` or closes its side. With a `tty` the run stage's standard streams are a
//! pseudo-terminal: input goes through its line discipline (Ctrl-C, `\x03`, interrupts the
//! foreground program), output is one stream (`stdout`), `close_stdin` sends end-of-file
//! (`\x04`) and `resize` changes its size.

use serde::{Deserialize, Serialize};

use crate::Bytes;

/// The `Upgrade` token of an interactive run.
pub const UPGRADE: &str = "cloude-interactive/1";
/// Longest line the agent reads from the host (the first one, the run request, may be as long
/// as a request body: [`crate::MAX_REQUEST_BODY_BYTES`]).
pub const MAX_INPUT_LINE_BYTES: usize = 1 << 20;
/// Standard input bytes one interactive run may receive in all.
pub const MAX_INTERACTIVE_STDIN_BYTES: usize = crate::MAX_STDIN_BYTES;
/// Signals and resizes one interactive run may receive (each one kills, wakes or redraws
/// processes in the guest).
pub const MAX_SIGNALS: usize = 1024;

/// One line from the host during an interactive run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// Bytes for the program's standard input.
    Stdin { data: Bytes },
    /// End of the program's standard input.
    CloseStdin,
    /// A signal for the running stage's processes (its process group).
    Signal { signal: i32 },
    /// The terminal's new size (a run with a `tty`; its foreground programs get `SIGWINCH`).
    Resize { rows: u16, cols: u16 },
}

/// Signals a client may send (what Piston accepts, minus the ones the kernel never delivers
/// this way); the number on x86-64 Linux.
pub fn signal_allowed(signal: i32) -> bool {
    (1..=31).contains(&signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_round_trip() {
        let i = Input::Stdin {
            data: "hi\n".into(),
        };
        let j = serde_json::to_string(&i).expect("serialise");
        assert_eq!(j, r#"{"type":"stdin","data":"aGkK"}"#);
        assert_eq!(serde_json::from_str::<Input>(&j).expect("parse"), i);
        let c: Input = serde_json::from_str(r#"{"type":"close_stdin"}"#).expect("parse");
        assert_eq!(c, Input::CloseStdin);
        assert!(serde_json::from_str::<Input>(r#"{"type":"signal","signal":9,"x":1}"#).is_err());
    }

    #[test]
    fn only_real_signals() {
        assert!(signal_allowed(2) && signal_allowed(9) && signal_allowed(31));
        assert!(!signal_allowed(0) && !signal_allowed(32) && !signal_allowed(-9));
    }
}
