use clap::Parser;

fn main() {
    let cli = vmsnap::cli::Cli::parse();
    std::process::exit(vmsnap::cli::run(cli));
}
