//! `vmsnap`: thin entry point; the subcommands live in `vmsnap::cli`.

use clap::Parser;

fn main() {
    let cli = vmsnap::cli::Cli::parse();
    match vmsnap::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vmsnap: error: {}", vmsnap::cli::error_chain(&e));
            std::process::exit(1);
        }
    }
}
