//! The monitor: the commands an operator or a management tool sends to a running VM.
//!
//! ```text
//!  cli/run.rs (flags, start-up)
//!       |
//!  monitor ── hmp.rs       HMP text lines  ── serve.rs  (stdio, unix socket)
//!          ── qmp/         QMP JSON        ── qmp/server.rs (unix, tcp; greeting, negotiation)
//!          ── core.rs      the commands once: typed arguments, typed results and errors
//!          ── jobs.rs      snapshot-save/-load/-delete as QEMU jobs, with their events
//!          ── events.rs    STOP, RESUME, SHUTDOWN, JOB_STATUS_CHANGE, MIGRATION to QMP clients
//!       |
//!  snapshot, migrate, vmm
//! ```
//!
//! HMP keeps its text replies; QMP answers with QEMU 7.2's JSON shapes (formats/qmp.md).

pub mod hmp;
mod hmp_migrate;
pub mod savevm;
pub mod serve;
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
