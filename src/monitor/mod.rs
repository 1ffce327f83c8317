//! The monitor: the commands an operator or a management tool sends to a running VM.
//!
//! ```text
//!  cli/run.rs (flags, start-up)
//!       |
//!  monitor ── hmp.rs       HMP text lines  ── serve.rs  (stdio, unix socket)
//!          ── qmp/         QMP JSON over unix/tcp; its commands run the HMP core and the
//!                          snapshot/migrate layers, with QEMU 7.2's shapes and errors
//!          ── jobs.rs, snapshot_jobs.rs   snapshot-save/-load/-delete as QEMU jobs
//!          ── events.rs    STOP, RESUME, SHUTDOWN, JOB_STATUS_CHANGE, MIGRATION to QMP clients
//!          ── fds.rs       descriptors passed by name (getfd/closefd)
//!       |
//!  snapshot, migrate, vmm
//! ```
//!
//! HMP keeps its text replies; QMP answers with QEMU 7.2's JSON shapes (formats/qmp.md).

pub mod checkpoint;
mod dirty_rate_cmds;
pub mod events;
pub mod fd_recv;
pub mod hmp;
mod hmp_migrate;
pub mod incoming;
pub mod jobs;
pub mod qmp;
pub mod savevm;
pub mod serve;
pub mod snapshot_jobs;
pub mod vm_commands;

use crate::migrate::Migrator;
use crate::snapshot;
use crate::vmm::Vm;

pub use vm_commands::Outcome;

/// What the monitor acts on: the VM and its migration state.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// Its migration state.
    pub mig: &'a Migrator,
    /// The drives' node names (`--drive …,node-name=`), in order; empty ones are
    /// `drive<i>`.
    pub nodes: &'a [String],
}

/// Node name of drive `i`: its `node-name`, else `drive<i>` (the device name).
pub fn node_name(nodes: &[String], i: usize) -> String {
    match nodes.get(i) {
        Some(n) if !n.is_empty() => n.clone(),
        _ => crate::vmm::drive_name(i),
    }
}

/// Stops the vCPUs and flushes every drive, as QEMU does before exiting (drives handed
/// over to a migration destination are not touched).
pub fn stop_and_flush(cx: Cx<'_>) -> Result<(), crate::block::Error> {
    // A VM whose vCPUs already failed still gets its disks flushed.
    let _ = cx.vm.pause();
    if cx.mig.drives_inactive() {
        return Ok(());
    }
    cx.vm.flush_drives()
}

/// Errors of a monitor's channel.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Reading, writing or listening failed.
    #[error("monitor {what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// [`MonitorError::Io`] for a step, as a `map_err` argument.
fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> MonitorError {
    move |source| MonitorError::Io { what, source }
}

/// The drives' paths for a lazy loadvm's own open of the VM-state image.
pub fn drive_paths<'a>(
    drives: impl Iterator<Item = (&'a std::path::PathBuf, Option<crate::block::Format>)>,
) -> Vec<snapshot::lazy::DrivePath> {
    drives
        .map(|(path, format)| snapshot::lazy::DrivePath {
            path: path.clone(),
            format,
        })
        .collect()
}
