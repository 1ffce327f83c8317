//! QEMU's `bdrv_all_*` semantics over the disks of one VM.

use super::BlockDriver;

/// One disk of a VM.
#[derive(Debug)]
pub struct Device {
    /// Device name (QEMU: the drive id, e.g. `drive0`).
    pub name: String,
    /// The open image.
    pub driver: Box<dyn BlockDriver>,
}

/// The disks of one VM, in creation order.
#[derive(Debug, Default)]
pub struct BlockSet {
    /// The devices.
    pub devices: Vec<Device>,
}

/// Errors of all-devices operations.
#[derive(Debug, thiserror::Error)]
pub enum BlockSetError {
    /// A writable device cannot take snapshots (QEMU's exact message).
    #[error("Device '{0}' is writable but does not support snapshots")]
    NotSnapshotCapable(String),
}
