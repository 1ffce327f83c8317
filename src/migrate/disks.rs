//! Shared storage across a migration: both sides open the same images. The side that does
//! not run the guest keeps them "inactive": opened without locks (destination before the
//! stream is loaded) or closed (source after handing over). Activating opens them again
//! with the usual QEMU-compatible locks, so at any time at most one side holds the write
//! locks.

use std::path::PathBuf;

use crate::block::{self, BlockDriver, Device, Format, OpenOptions};
use crate::vmm::{drive_name, Vm};

/// Errors handing the disks over.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Flushing before the handover failed.
    #[error("flushing the drives: {0}")]
    Flush(#[source] block::Error),
    /// Reopening an image failed (for example, the other side still holds its lock).
    #[error("reopening '{path}': {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: block::Error,
    },
}

/// How one drive was opened, to open it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveOpen {
    /// Image path.
    pub path: PathBuf,
    /// Forced format (probed when absent).
    pub format: Option<Format>,
    /// Read-only drive.
    pub read_only: bool,
    /// A migration that carries this drive (`migrate -b`) may replace an existing
    /// non-empty image at `path` (`--drive …,overwrite=on`).
    pub overwrite: bool,
}

impl DriveOpen {
    /// Opens the image with locks (active).
    pub fn open_active(&self) -> Result<Box<dyn BlockDriver>, DiskError> {
        self.open(OpenOptions {
            read_only: self.read_only,
            format: self.format,
            force_share: false,
        })
    }

    /// Opens the image read-only without locks (inactive: the source still runs on it).
    pub fn open_inactive(&self) -> Result<Box<dyn BlockDriver>, DiskError> {
        self.open(OpenOptions {
            read_only: true,
            format: self.format,
            force_share: true,
        })
    }

    fn open(&self, opts: OpenOptions) -> Result<Box<dyn BlockDriver>, DiskError> {
        block::open_image(&self.path, opts).map_err(|source| DiskError::Open {
            path: self.path.clone(),
            source,
        })
    }
}

/// Flushes every drive and closes it, releasing its locks; guest requests fail until
/// [`activate`] (the guest is stopped meanwhile).
pub fn inactivate(vm: &Vm) -> Result<(), DiskError> {
    vm.flush_drives().map_err(DiskError::Flush)?;
    vm.with_block_set(|set| set.devices.clear());
    Ok(())
}

/// Opens every drive again with its locks and attaches it to its device. All or nothing:
/// on error, no drive is attached.
pub fn activate(vm: &Vm, drives: &[DriveOpen]) -> Result<(), DiskError> {
    let mut opened = Vec::with_capacity(drives.len());
    for (i, d) in drives.iter().enumerate() {
        opened.push(Device {
            name: drive_name(i),
            driver: d.open_active()?,
        });
    }
    vm.with_block_set(|set| set.devices = opened);
    Ok(())
}
