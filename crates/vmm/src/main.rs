fn main() {
    let started = std::time::Instant::now();
    std::process::exit(cloude_vmm::main_with_args(started));
}
