//! The configuration record: everything `vmsnap restore` needs to rebuild the VM.

use serde::{Deserialize, Serialize};

/// One drive, in drive order (drive `i` is the guest's block device `i`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// Image path as the saving process opened it (absolute when it could be made so).
    pub file: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Opened read-only.
    pub readonly: bool,
    /// `capture=on`: the contents travel in the stream (`vmsnap-capture` sections).
    pub capture: bool,
    /// Virtual size in bytes; restore refuses an image of another size.
    pub size: u64,
    /// Whether the drive holds the checkpoint's disk-only snapshot (`save -c`).
    #[serde(default)]
    pub snapshot: bool,
}

/// The VM's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// The built-in guest (`counter`).
    pub guest: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The counter guest's RAM dirtying, MiB/s (0 = off). Informative: the setting lives in
    /// guest RAM and returns with it.
    #[serde(default)]
    pub dirty_rate: u64,
    /// The drives, in order.
    pub drives: Vec<DriveConfig>,
    /// Name of the disk-only snapshot `save -c` took on every snapshot-capable drive at the
    /// checkpoint's instant.
    #[serde(default)]
    pub disk_snapshot: Option<String>,
    /// When it was saved, seconds since the epoch.
    #[serde(default)]
    pub date_sec: u64,
    /// The guest clock at the save, nanoseconds.
    #[serde(default)]
    pub vm_clock_nsec: u64,
    /// Which program wrote it (`vmsnap X.Y.Z`).
    #[serde(default)]
    pub writer: String,
}

impl CheckpointConfig {
    /// The record's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
