//! Checkpoint files, Xen `xl save`/`xl restore` style: the monitor's `save [-c] FILE`
//! (this file) and `vmsnap restore FILE` ([`crate::cli::checkpoint::restore`]). The file format is
//! [`crate::interop::checkpoint`] (`formats/checkpoint.md`).
//!
//! ```text
//!  save FILE:    stop → flush → capture the state → write .FILE.vmsnap-tmp (config, the
//!                migration stream savevm writes, integrity record) → fsync → rename → the
//!                run process exits 0 (disks flushed and closed)
//!  save -c FILE: the same, plus a disk-only snapshot of every included drive taken while the
//!                guest is stopped (before the rename), named in the file → resume
//!  any failure:  the temporary file (and a -c snapshot) removed, the guest resumed if it ran
//! ```

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::block::{BlockSet, SnapshotParams};
use crate::interop::checkpoint::{
    CheckpointConfig, CheckpointError, CheckpointWriter, DriveConfig, FLAG_DISK_SNAPSHOT,
};
use crate::migrate::DriveOpen;
use crate::snapshot::progress::Counting;
use crate::snapshot::state_io::{self, StateIoError};
use crate::snapshot::{capture, disks, ProgressFn, SnapshotError};
use crate::vmm::{Guest, Vm, VmError, VmStatus};

use super::{Cx, Outcome};

/// Errors of the monitor's `save`.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The command line is incomplete.
    #[error("Parameter 'filename' is missing")]
    Usage,
    /// A migration runs or the drives belong to a migration destination.
    #[error("{0}")]
    Busy(String),
    /// Stopping, capturing or resuming the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A drive step failed (flush, capture, `-c` snapshot).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Writing the VM state failed.
    #[error("Error while writing VM state: {0}")]
    State(#[source] StateIoError),
    /// Writing the file failed.
    #[error(transparent)]
    File(#[from] CheckpointError),
}

/// `save [-c] FILE`: the monitor's reply, and whether the run process ends (a plain save).
pub fn save_command(cx: Cx<'_>, rest: &str) -> Outcome {
    let rest = rest.trim();
    let (keep_running, file) = match rest.strip_prefix("-c") {
        Some(f) if f.is_empty() || f.starts_with(char::is_whitespace) => (true, f.trim()),
        _ => (false, rest),
    };
    let mut result = Err(SaveError::Usage);
    if !file.is_empty() {
        let _ = super::hmp::timed("save", |p| {
            result = save(cx, Path::new(file), keep_running, p);
            Ok(())
        });
    }
    match result {
        Ok(len) if keep_running => Outcome::Continue(format!(
            "checkpoint '{file}' saved ({len} bytes); the guest {}",
            if cx.vm.status() == VmStatus::Running {
                "runs on"
            } else {
                "stays paused"
            }
        )),
        Ok(len) => Outcome::Quit(format!(
            "checkpoint '{file}' saved ({len} bytes); the VM is closed"
        )),
        Err(e) => Outcome::Continue(format!("Error: {e}")),
    }
}

/// Saves the VM into `file`; with `keep_running` (`-c`) the guest runs on after it. On
/// failure the guest runs again if it ran, and no file carries the name. Returns the file's
/// length.
///
/// # Errors
/// [`SaveError`].
pub fn save(
    cx: Cx<'_>,
    file: &Path,
    keep_running: bool,
    progress: ProgressFn<'_>,
) -> Result<u64, SaveError> {
    if cx.mig.is_active() {
        return Err(SaveError::Busy(super::savevm::MIGRATION_ACTIVE.to_string()));
    }
    if cx.mig.drives_inactive() {
        return Err(SaveError::Busy(
            crate::migrate::CommandError::Inactive.to_string(),
        ));
    }
    // A lazy loadvm still filling RAM finishes first.
    crate::snapshot::lazy::settle(cx.vm)?;
    let was_running = match cx.vm.status() {
        VmStatus::Failed(why) => return Err(SnapshotError::Failed(why).into()),
        VmStatus::Running => true,
        VmStatus::Paused => false,
    };
    cx.vm.pause()?;
    let r = save_stopped(cx.vm, cx.mig.drives(), file, keep_running, progress);
    if was_running && (keep_running || r.is_err()) {
        cx.vm.resume();
    }
    r
}

/// The steps once the vCPUs are parked.
fn save_stopped(
    vm: &Vm,
    opened: &[DriveOpen],
    file: &Path,
    keep_running: bool,
    progress: ProgressFn<'_>,
) -> Result<u64, SaveError> {
    vm.flush_drives().map_err(SnapshotError::Flush)?;
    let state = vm.save_state()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let tag = keep_running.then(|| {
        let digits = crate::snapshot::default_name(now.as_secs()).replace("vm-", "");
        format!("checkpoint-{digits}-{:09}", now.subsec_nanos())
    });
    let captured = vm.captured_drives();
    let ram = vm.ram();
    vm.with_block_set(|set| {
        let inc = match tag {
            Some(_) => disks::included(set, &captured)?,
            None => Vec::new(),
        };
        let contents = capture::read_all(set, &captured).map_err(SnapshotError::from)?;
        let mut config = CheckpointConfig {
            guest: guest_name(Guest::default()).to_string(),
            memory: ram.len() as u64,
            vcpus: vm.vcpu_count(),
            dirty_rate: dirty_rate(ram),
            drives: drive_configs(set, opened, &captured, &inc),
            disk_snapshot: tag.clone(),
            date_sec: now.as_secs(),
            vm_clock_nsec: state.arch.clock.clock,
            writer: concat!("vmsnap ", env!("CARGO_PKG_VERSION")).to_string(),
        };
        config.drives.truncate(set.devices.len());
        let flags = if tag.is_some() { FLAG_DISK_SNAPSHOT } else { 0 };
        let mut w = CheckpointWriter::create(file, &config, flags)?;
        {
            let mut sink = Counting::new(w.stream(), ram.len() as u64, progress);
            state_io::write_state_with(&state, ram, &contents, &mut sink)
                .map_err(SaveError::State)?;
        }
        if let Some(tag) = &tag {
            let params = SnapshotParams {
                name: tag.clone(),
                vm_state_size: 0,
                date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                date_nsec: now.subsec_nanos(),
                vm_clock_nsec: state.arch.clock.clock,
                ..SnapshotParams::default()
            };
            disks::create(set, &inc, &params)?;
        }
        w.finish().map_err(|e| {
            if let Some(tag) = &tag {
                // The file is gone: so must be the snapshot it would have named.
                let _ = disks::delete(set, &inc, tag);
            }
            SaveError::File(e)
        })
    })
}

/// The configuration record's name of a built-in guest.
pub fn guest_name(guest: Guest) -> &'static str {
    match guest {
        Guest::Counter => "counter",
    }
}

/// The counter guest's dirtying rate in MiB/s, from its parameter word in RAM.
fn dirty_rate(ram: &[u8]) -> u64 {
    use crate::vmm::guest::counter::{DIRTY_PER_TICK_ADDR, TICKS_PER_SEC};
    let at = usize::try_from(DIRTY_PER_TICK_ADDR).unwrap_or(usize::MAX);
    let Some(word) = ram.get(at..at.saturating_add(8)) else {
        return 0;
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(word);
    let pages_per_tick = u64::from_le_bytes(b);
    pages_per_tick
        .saturating_mul(TICKS_PER_SEC)
        .saturating_mul(4096)
        >> 20
}

/// The drives as the configuration records them, in order.
fn drive_configs(
    set: &BlockSet,
    opened: &[DriveOpen],
    captured: &[usize],
    inc: &[usize],
) -> Vec<DriveConfig> {
    set.devices
        .iter()
        .zip(opened)
        .enumerate()
        .map(|(i, (d, o))| DriveConfig {
            file: std::fs::canonicalize(&o.path)
                .unwrap_or_else(|_| o.path.clone())
                .display()
                .to_string(),
            format: d.driver.format().name().to_string(),
            readonly: o.read_only,
            capture: captured.contains(&i),
            size: d.driver.size(),
            snapshot: inc.contains(&i),
        })
        .collect()
}
