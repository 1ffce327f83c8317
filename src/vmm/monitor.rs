//! The human monitor: QEMU-HMP-style text commands against a running [`Vm`].
//!
//! Supported now: `info status`, `stop`, `cont` (alias `c`), `quit` (alias `q`), `help`.
//! `savevm`/`loadvm`/`delvm`/`info snapshots`/`migrate` arrive with the snapshot layer; they
//! are recognised and answered with a clear "not available yet" so scripts fail visibly.

use super::{Vm, VmStatus};

/// What the caller should do after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Print `reply` (may be empty) and read the next command.
    Continue(String),
    /// Print `reply` and stop the VM and the monitor.
    Quit(String),
}

/// Commands listed by `help`.
pub const HELP: &str = "\
info status -- show the current VM status
stop        -- stop all vCPUs
cont|c      -- resume all vCPUs
quit|q      -- quit the VMM
help        -- show this help
";

const LATER: &[&str] = &["savevm", "loadvm", "delvm", "migrate"];

/// The status line QEMU prints for `info status`.
pub fn status_line(status: &VmStatus) -> String {
    match status {
        VmStatus::Running => "VM status: running".to_string(),
        VmStatus::Paused => "VM status: paused".to_string(),
        VmStatus::Failed(why) => format!("VM status: internal-error ({why})"),
    }
}

/// Runs one command line.
pub fn execute(vm: &Vm, line: &str) -> Outcome {
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        [] => String::new(),
        ["info", "status"] => status_line(&vm.status()),
        ["info", "snapshots"] => "info snapshots is not available yet".to_string(),
        ["info", what] => format!("info: unknown item '{what}' (try: info status)"),
        ["stop"] => match vm.pause() {
            Ok(()) => String::new(),
            Err(e) => format!("stop failed: {e}"),
        },
        ["cont"] | ["c"] => {
            if let VmStatus::Failed(why) = vm.status() {
                format!("cannot continue: a vCPU failed: {why}")
            } else {
                vm.resume();
                String::new()
            }
        }
        ["quit"] | ["q"] => return Outcome::Quit(String::new()),
        ["help"] | ["?"] => HELP.trim_end().to_string(),
        [cmd, ..] if LATER.contains(cmd) => format!("{cmd} is not available yet"),
        [cmd, ..] => format!("unknown command: '{cmd}'"),
    };
    Outcome::Continue(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_match_qemu() {
        assert_eq!(status_line(&VmStatus::Running), "VM status: running");
        assert_eq!(status_line(&VmStatus::Paused), "VM status: paused");
        assert!(status_line(&VmStatus::Failed("x".into())).contains("internal-error"));
    }
}
