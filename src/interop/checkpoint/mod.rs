//! Checkpoint files (Xen `xl save` style): one self-contained file with the VM's whole
//! configuration, its state as a QEMU migration stream, and an integrity record.
//!
//! ```text
//!  0        header (32 bytes, big-endian): magic "VMSNAPCK", version, flags,
//!           config_len, reserved, stream_len
//!  32       configuration record: JSON, config_len bytes (at most MAX_CONFIG_LEN)
//!  32+c     VM state: a QEMU migration stream, stream_len bytes, exactly what savevm
//!           writes into a snapshot's vmstate area
//!  32+c+s   integrity record (24 bytes): magic "VMSNAPIR", covered_len (= 32+c+s),
//!           CRC32 of every byte before the record, reserved
//! ```
//!
//! The full specification and version policy are in `formats/checkpoint.md`. This module
//! knows bytes and files only: the save and restore steps live in `cli/checkpoint/`.
//!
//! Version policy ([`VERSION`]): bumped for any change an older reader would misread; a
//! reader refuses a newer version and any flag it does not know. Additive fields of the JSON
//! configuration do not bump it (readers ignore unknown keys).

mod config;
mod header;
mod read;
mod write;

pub use config::{CheckpointConfig, DriveConfig};
pub use header::{Header, Trailer, FLAG_DISK_SNAPSHOT, HEADER_LEN, TRAILER_LEN};
pub use read::{is_checkpoint, Checkpoint, CheckpointInfo, StreamWindow};
pub use write::{temp_path, CheckpointWriter};

/// First 8 bytes of a checkpoint file.
pub const MAGIC: [u8; 8] = *b"VMSNAPCK";
/// First 8 bytes of the integrity record.
pub const TRAILER_MAGIC: [u8; 8] = *b"VMSNAPIR";
/// Format version written, and the newest read.
pub const VERSION: u32 = 1;
/// Largest configuration record accepted (a config is a few hundred bytes).
pub const MAX_CONFIG_LEN: u32 = 1 << 20;

/// Versions this build reads.
pub fn supported_versions() -> std::ops::RangeInclusive<u32> {
    1..=VERSION
}

/// Errors reading or writing a checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened, read, written or renamed.
    #[error("checkpoint '{path}': {what}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The first bytes are not a checkpoint's.
    #[error("'{0}' is not a vmsnap checkpoint (wrong magic)")]
    Magic(String),
    /// A newer (or unknown) format version.
    #[error(
        "checkpoint '{path}' has format version {version}; this vmsnap reads versions {min} to \
         {max}"
    )]
    Version {
        /// The file.
        path: String,
        /// Its version.
        version: u32,
        /// Oldest supported.
        min: u32,
        /// Newest supported.
        max: u32,
    },
    /// Flags this reader does not know.
    #[error("checkpoint '{path}' uses unknown flags {flags:#x}")]
    Flags {
        /// The file.
        path: String,
        /// The unknown bits.
        flags: u32,
    },
    /// A length field is out of bounds.
    #[error("checkpoint '{path}': {what} {value:#x} exceeds the limit {limit:#x}")]
    TooLarge {
        /// The file.
        path: String,
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The file is shorter (or longer) than its header says.
    #[error(
        "checkpoint '{path}' is truncated or damaged: the header describes {expected:#x} bytes, \
         the file has {actual:#x}"
    )]
    Length {
        /// The file.
        path: String,
        /// Length from the header.
        expected: u64,
        /// Real length.
        actual: u64,
    },
    /// The integrity record is missing or malformed.
    #[error("checkpoint '{path}' has no valid integrity record at {offset:#x}")]
    Trailer {
        /// The file.
        path: String,
        /// Where it should be.
        offset: u64,
    },
    /// The bytes do not match the integrity record.
    #[error(
        "checkpoint '{path}' is damaged: CRC32 is {actual:#010x}, the record says {stored:#010x}"
    )]
    Damaged {
        /// The file.
        path: String,
        /// Computed CRC32.
        actual: u32,
        /// Stored CRC32.
        stored: u32,
    },
    /// The configuration record is not valid JSON of the expected shape.
    #[error("checkpoint '{path}': bad configuration record: {source}")]
    Config {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, CheckpointError>;

#[cfg(test)]
mod tests;
