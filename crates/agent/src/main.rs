#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cloude_agent::cli::main()
}
