fn main() -> std::process::ExitCode {
    cloude_server::cli::main()
}
