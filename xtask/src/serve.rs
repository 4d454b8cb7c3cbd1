//! `cargo xtask serve`: the README's "run the service" command.

use std::process::Command;

use crate::deps;

/// Arguments passed through to `cloude-server`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Arguments for `cloude-server` (e.g. `-- --listen 0.0.0.0:8787`).
    #[arg(last = true)]
    pub server_args: Vec<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<i32> {
    deps::ensure_apt_packages()?;
    deps::build_release()?;
    let status = Command::new(deps::release_dir().join("cloude-server"))
        .args(&args.server_args)
        .status()?;
    Ok(status.code().unwrap_or(1))
}
