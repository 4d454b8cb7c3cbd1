//! Progress reporting for long steps: bars on a terminal, plain log lines otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Hands out progress bars; hidden ones when `quiet`.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress { quiet }
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        }
    }

    /// Logs `msg` as a plain line when progress bars cannot be drawn (stderr is not a
    /// terminal), so that CI logs still show progress.
    pub fn log_plain(&self, msg: impl std::fmt::Display) {
        use std::io::IsTerminal as _;
        if !self.quiet && !std::io::stderr().is_terminal() {
            eprintln!("cloude: {msg}");
        }
    }

    /// A spinner for a step of unknown length. Also logs the step when stderr is not a terminal.
    pub fn spinner(&self, msg: impl Into<String>) -> ProgressBar {
        let msg = msg.into();
        if !self.quiet {
            eprintln!("cloude: {msg} ...");
        }
        let b = ProgressBar::with_draw_target(None, self.target());
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .expect("static template is valid"),
        );
        b.set_message(msg);
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    }

    /// A bar with a known (estimated) length.
    pub fn bar(&self, len: u64, msg: impl Into<String>) -> ProgressBar {
        let msg = msg.into();
        if !self.quiet {
            eprintln!("cloude: {msg} ...");
        }
        let b = ProgressBar::with_draw_target(Some(len), self.target());
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/~{len} {msg} [{elapsed}]")
                .expect("static template is valid"),
        );
        b.set_message(msg);
        b
    }
}
