//! Checkpoints from the other forms of VM state: a migration stream file (`migrate file:…`
//! output, or a snapshot's state exported with `vmsnap vmstate export`) wrapped with a
//! configuration made from the stream and the drives named.
//!
//! The stream tells guest RAM (the RAM setup section's total) and the vCPUs (its `cpu`
//! sections); the drives are given (`--drive`, as `vmsnap run` takes them), their sizes
//! and formats read from the images.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::block::{self, OpenOptions};
use crate::interop::checkpoint::{
    CheckpointConfig, CheckpointError, CheckpointWriter, DriveConfig,
};
use crate::interop::validate::{validate_stream, ValidateError};
use crate::vmm::Guest;

use super::super::run::DriveSpec;

/// Errors making a checkpoint from a stream.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    /// The stream file could not be read.
    #[error("Could not read '{0}'")]
    Read(String, #[source] std::io::Error),
    /// The file is not a complete migration stream.
    #[error("'{0}' is not a complete migration stream")]
    Invalid(String, #[source] ValidateError),
    /// The stream has no RAM setup section to size the guest from.
    #[error("'{0}' has no RAM setup section: the guest's memory size is unknown")]
    NoRam(String),
    /// A drive could not be opened.
    #[error("drive '{0}'")]
    Drive(String, #[source] block::Error),
    /// The stream's drive sections do not match the drives given.
    #[error("the stream has {stream} drive sections, {given} --drive given")]
    Drives {
        /// `vmsnap-pvblock` sections.
        stream: usize,
        /// Drives given.
        given: usize,
    },
    /// Writing the checkpoint failed.
    #[error(transparent)]
    File(#[from] CheckpointError),
}

/// Guest RAM and vCPUs of a VM state stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamShape {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// `cpu` sections.
    pub vcpus: usize,
    /// `vmsnap-pvblock` sections.
    pub drives: usize,
}

/// The RAM setup's total (`be64 total | RAM_SAVE_FLAG_MEM_SIZE`) from a stream's first
/// bytes: header, optional CONFIGURATION section, then the `ram` START section.
fn ram_total(head: &[u8]) -> Option<u64> {
    let mut at = 8; // "QEVM" + version
    let get = |at: usize, n: usize| head.get(at..at + n);
    let be32 = |at: usize| get(at, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if *head.get(at)? == 0x07 {
        at += 5 + usize::try_from(be32(at + 1)?).ok()?;
    }
    if *head.get(at)? != 0x01 {
        return None;
    }
    let idlen = usize::from(*head.get(at + 5)?);
    if get(at + 6, idlen)? != b"ram" {
        return None;
    }
    at += 6 + idlen + 8;
    let mut v = [0u8; 8];
    v.copy_from_slice(get(at, 8)?);
    let v = u64::from_be_bytes(v);
    (v & 0x04 != 0).then_some(v & !0xfff)
}

/// The shape of the stream in `path` (a full validation pass).
///
/// # Errors
/// [`WrapError`].
pub fn stream_shape(path: &Path) -> Result<StreamShape, WrapError> {
    let name = path.display().to_string();
    let read = |e| WrapError::Read(name.clone(), e);
    let mut head = Vec::with_capacity(4096);
    File::open(path)
        .map_err(read)?
        .take(4096)
        .read_to_end(&mut head)
        .map_err(read)?;
    let f = File::open(path).map_err(read)?;
    let summary = validate_stream(BufReader::with_capacity(1 << 20, f))
        .map_err(|e| WrapError::Invalid(name.clone(), e))?;
    let memory = ram_total(&head).ok_or_else(|| WrapError::NoRam(name.clone()))?;
    let count = |p: &str| summary.sections.iter().filter(|s| s.starts_with(p)).count();
    Ok(StreamShape {
        memory,
        vcpus: count("cpu/"),
        drives: count("vmsnap-pvblock/"),
    })
}

/// Writes checkpoint `output` from the stream file `stream` and the VM's `drives`.
///
/// # Errors
/// [`WrapError`]; nothing is left under `output` on failure.
pub fn wrap_stream(
    stream: &Path,
    output: &Path,
    drives: &[DriveSpec],
    guest: Guest,
) -> Result<u64, WrapError> {
    let shape = stream_shape(stream)?;
    if shape.drives != drives.len() {
        return Err(WrapError::Drives {
            stream: shape.drives,
            given: drives.len(),
        });
    }
    let mut configs = Vec::with_capacity(drives.len());
    for d in drives {
        let name = d.file.display().to_string();
        let opts = OpenOptions {
            read_only: true,
            format: d.format,
            force_share: true,
        };
        let drv =
            block::open_image(&d.file, opts).map_err(|e| WrapError::Drive(name.clone(), e))?;
        configs.push(DriveConfig {
            file: std::fs::canonicalize(&d.file)
                .unwrap_or_else(|_| d.file.clone())
                .display()
                .to_string(),
            format: drv.format().name().to_string(),
            readonly: d.readonly,
            capture: d.capture,
            size: drv.size(),
            snapshot: false,
        });
    }
    let config = CheckpointConfig {
        guest: crate::monitor::checkpoint::guest_name(guest).to_string(),
        memory: shape.memory,
        vcpus: shape.vcpus,
        dirty_rate: 0,
        drives: configs,
        disk_snapshot: None,
        date_sec: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        vm_clock_nsec: 0,
        writer: concat!("vmsnap ", env!("CARGO_PKG_VERSION")).to_string(),
    };
    let name = stream.display().to_string();
    let mut w = CheckpointWriter::create(output, &config, 0)?;
    let mut f = File::open(stream).map_err(|e| WrapError::Read(name.clone(), e))?;
    std::io::copy(&mut f, &mut w.stream()).map_err(|e| WrapError::Read(name, e))?;
    Ok(w.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_total_is_read_after_the_configuration() {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.extend([0x07, 0, 0, 0, 2, b'p', b'c']);
        s.extend([
            0x01, 0, 0, 0, 1, 3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4,
        ]);
        s.extend((16u64 << 20 | 4).to_be_bytes());
        assert_eq!(ram_total(&s), Some(16 << 20));
        assert_eq!(ram_total(&s[..s.len() - 1]), None);
        assert_eq!(ram_total(b"QEVM\0\0\0\x03\x04"), None);
    }
}
