//! The `vmsnap` command line.

pub mod run;

use clap::Parser;

/// Keep VM snapshots inside disk images, like QEMU's savevm/loadvm.
#[derive(Debug, Parser)]
#[command(name = "vmsnap", version, about)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Boot a built-in guest under KVM.
    Run(run::RunArgs),
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        None => 0,
        Some(Command::Run(args)) => match run::run_command(args) {
            Ok(code) => code,
            Err(e) => {
                // Our error messages already carry their causes.
                eprintln!("vmsnap: {e}");
                1
            }
        },
    }
}
