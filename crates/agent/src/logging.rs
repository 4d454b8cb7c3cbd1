//! Log set-up: stderr (the console as PID 1), `RUST_LOG` filter, `info` by default.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `guest` drops timestamps (the console has the kernel's).
pub fn init(guest: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let _ = if guest {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}
