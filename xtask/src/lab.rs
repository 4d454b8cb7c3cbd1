//! The KVM lab (placeholder; see issue "KVM lab").

/// Arguments of `cargo xtask lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    /// The command to run inside the lab.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs the lab; returns the command's exit code.
pub fn run(_args: LabArgs) -> anyhow::Result<i32> {
    anyhow::bail!("the KVM lab is not built yet")
}
