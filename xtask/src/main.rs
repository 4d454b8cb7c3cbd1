//! `cargo xtask`: project automation (tests, the KVM lab, the service, benchmarks).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod bench;
mod deps;
mod fuzz;
mod lab;
mod languages;
mod serve;
mod test;

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
    /// Run every test: unit, integration, end-to-end with real VMs, and the VMM's Linux boot
    /// tests inside the KVM lab. Installs what it needs on a fresh machine.
    Test(test::TestArgs),
    /// Build everything and run `cloude-server` (which builds the kernel and images on first run).
    Serve(serve::ServeArgs),
    /// Measure boot-to-ready, end-to-end latency, throughput and VMM overhead against peers.
    Bench(bench::BenchArgs),
    /// Build the cargo-fuzz targets and run each for a bounded time.
    Fuzz(fuzz::FuzzArgs),
    /// Build every language's image and run its conformance programs through a real server.
    Languages(languages::LanguagesArgs),
    /// (internal) The boot comparison itself, run where /dev/kvm boots Linux.
    #[command(hide = true)]
    BenchBoot(bench::boot::BootArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Lab(args) => lab::run(args)?,
        Cmd::Test(args) => test::run(args)?,
        Cmd::Serve(args) => serve::run(args)?,
        Cmd::Bench(args) => bench::run(args)?,
        Cmd::Fuzz(args) => fuzz::run(args)?,
        Cmd::Languages(args) => languages::run(args)?,
        Cmd::BenchBoot(args) => bench::boot::run(args)?,
    };
    std::process::exit(code)
}
