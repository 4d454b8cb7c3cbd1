use clap::Parser;

fn main() {
    let spec = cloude_jail::Spec::parse();
    std::process::exit(cloude_jail::run(&spec));
}
