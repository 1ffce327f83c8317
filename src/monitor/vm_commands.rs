//! The human monitor: QEMU-HMP-style text commands against a running [`Vm`].
//!
//! Supported now: `info status`, `info registers`, `stop`, `cont` (alias `c`), `quit` (alias
//! `q`), `help`.
//! `savevm`/`loadvm`/`delvm`/`info snapshots` belong to the snapshot layer, above the VMM:
//! the HMP front end handles them ([`super::hmp::execute`]) before passing other lines here; called
//! directly, this module answers them, and `migrate`, with a clear "not available".

use crate::vmm::vcpu::VcpuState;
use crate::vmm::{Vm, VmStatus};

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
info registers -- show the vCPUs' main registers
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

/// [`status_line`] with the reason of a pause, as QEMU prints it (`paused (postmigrate)`).
pub fn status_line_with(status: &VmStatus, reason: Option<&str>) -> String {
    match (status, reason) {
        (VmStatus::Paused, Some(r)) => format!("VM status: paused ({r})"),
        _ => status_line(status),
    }
}

/// Runs one command line.
pub fn execute(vm: &Vm, line: &str) -> Outcome {
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        [] => String::new(),
        ["info", "status"] => status_line_with(&vm.status(), vm.pause_reason()),
        ["info", "registers"] => registers(vm),
        ["info", "snapshots"] => "info snapshots is not available here".to_string(),
        ["info", what] => format!("info: unknown item '{what}' (try: info status)"),
        ["stop"] => match vm.pause() {
            // As QEMU's vm_stop: the disks are flushed once the guest is paused (what it
            // wrote is then on storage; an NBD export can be restarted underneath, see
            // formats/nbd.md). The VM stays paused if that fails, as in QEMU.
            Ok(()) => match vm.flush_drives() {
                Ok(()) => String::new(),
                Err(e) => {
                    eprintln!("vmsnap: stop: flushing the drives failed: {e}");
                    String::new()
                }
            },
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
        [cmd, ..] if LATER.contains(cmd) => format!("{cmd} is not available here"),
        [cmd, ..] => format!("unknown command: '{cmd}'"),
    };
    Outcome::Continue(reply)
}

/// `info registers`: general-purpose registers of every vCPU, QEMU's layout (briefly stopping
/// a running VM to read them, as QEMU's cpu_synchronize_state does).
fn registers(vm: &Vm) -> String {
    let was_running = vm.status() == VmStatus::Running;
    if was_running {
        if let Err(e) = vm.pause() {
            return format!("cannot stop the vCPUs: {e}");
        }
    }
    let state = vm.save_state();
    if was_running {
        vm.resume();
    }
    match state {
        Ok(st) => st
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| format_registers(i, v))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("cannot read the registers: {e}"),
    }
}

/// Formats one vCPU's registers like QEMU's `info registers` (first lines).
pub fn format_registers(index: usize, v: &VcpuState) -> String {
    let r = &v.regs;
    let s = &v.sregs;
    format!(
        "CPU#{index}\n\
         RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n\
         RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
         R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n\
         R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
         RIP={:016x} RFL={:08x} CPL={}\n\
         CS ={:04x} SS ={:04x} CR0={:08x} CR3={:016x} CR4={:08x} EFER={:016x}",
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.rsp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rip,
        r.rflags,
        s.cs.selector & 3,
        s.cs.selector,
        s.ss.selector,
        s.cr0,
        s.cr3,
        s.cr4,
        s.efer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_match_qemu() {
        assert_eq!(status_line(&VmStatus::Running), "VM status: running");
        assert_eq!(status_line(&VmStatus::Paused), "VM status: paused");
        assert!(status_line(&VmStatus::Failed("x".into())).contains("internal-error"));
        assert_eq!(
            status_line_with(&VmStatus::Paused, Some("postmigrate")),
            "VM status: paused (postmigrate)"
        );
        assert_eq!(
            status_line_with(&VmStatus::Running, Some("postmigrate")),
            "VM status: running"
        );
    }
}
