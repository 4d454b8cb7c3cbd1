//! `cloude`: a thin client for cloude-server.
#![forbid(unsafe_code)]

mod interactive;
mod mcp;
mod run;
mod sandbox;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Default server when neither --server nor CLOUDE_SERVER is given.
const DEFAULT_SERVER: &str = "http://127.0.0.1:8787";

/// Run code in a fresh micro-VM on a cloude-server.
#[derive(Debug, Parser)]
#[command(name = "cloude", version)]
struct Cli {
    /// Server URL.
    #[arg(long, global = true, env = "CLOUDE_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Print the server's raw JSON response instead of the program's output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a file (language from its extension) or inline code (-c).
    Run(run::RunArgs),
    /// List the languages the server offers.
    Languages,
    /// Sandboxes: VMs that keep their files and processes across calls.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Serve the Model Context Protocol over stdio (what an AI agent launches), carried to the
    /// server's /mcp.
    Mcp,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = cloude_api::client::Client::new(&cli.server);
    let result = match cli.command {
        Command::Run(args) => run::run(&client, args, cli.json),
        Command::Languages => run::languages(&client, cli.json),
        Command::Mcp => mcp::run(&cli.server),
        Command::Sandbox(cmd) => sandbox::run(&client, cmd, cli.json),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cloude: {e}");
            ExitCode::from(run::EXIT_CLIENT_ERROR)
        }
    }
}
