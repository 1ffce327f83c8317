//! The `vmsnap` command line.

use clap::Parser;

/// Keep VM snapshots inside disk images, like QEMU's savevm/loadvm.
#[derive(Debug, Parser)]
#[command(name = "vmsnap", version, about)]
pub struct Cli {}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let _ = cli;
    0
}
