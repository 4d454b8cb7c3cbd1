//! The `cloude-image` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::kernel::{self, Flavor};
use crate::progress::Progress;

#[derive(Parser, Debug)]
#[command(name = "cloude-image", version, about = "Builds Cloude's guest kernel and language images")]
struct Cli {
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the guest kernel if needed; print the path of its bzImage as the last line.
    Kernel {
        /// Build the KVM lab's kernel (guest config + KVM host) instead.
        #[arg(long)]
        lab: bool,
        /// Print the uncompressed ELF `vmlinux` instead of the bzImage.
        #[arg(long)]
        vmlinux: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let progress = Progress::new(cli.quiet);
    match run(cli.cmd, &progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloude-image: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd, progress: &Progress) -> anyhow::Result<()> {
    match cmd {
        Cmd::Kernel { lab, vmlinux } => {
            let flavor = if lab { Flavor::Lab } else { Flavor::Guest };
            let k = kernel::ensure_kernel(flavor, progress)?;
            let p = if vmlinux { k.vmlinux } else { k.bzimage };
            println!("{}", p.display());
        }
    }
    Ok(())
}
