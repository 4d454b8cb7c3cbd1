//! `cargo xtask`: project automation (tests, the KVM lab, the service, benchmarks).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod lab;

#[derive(Parser, Debug)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot the KVM lab (a nested test machine with a working /dev/kvm) and run a command in it.
    Lab(lab::LabArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Lab(args) => lab::run(args)?,
    };
    std::process::exit(code)
}
