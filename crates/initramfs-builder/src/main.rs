#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cloude_image::cli::main()
}
