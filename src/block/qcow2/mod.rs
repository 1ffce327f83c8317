//! The qcow2 driver (QEMU copy-on-write, versions 2 and 3) with internal snapshots.
//!
//! Format facts are written up in `formats/qcow2.md`.
#![deny(unsafe_code)]

use std::path::Path;

use super::storage::Storage;
use super::{
    BlockDriver, Format, OpenOptions, Result, SnapshotInfo, SnapshotParams, SnapshotStore,
};

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Errors of the qcow2 driver.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Not implemented yet.
    #[error("not implemented: {0}")]
    Unsupported(String),
}

/// qcow2 `compat` level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// Version 2 header (`compat=0.10`).
    V2,
    /// Version 3 header (`compat=1.1`).
    #[default]
    V3,
}

/// Options of `vmsnap create -f qcow2 -o ...` (the names of `qemu-img create -o`).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size, a power of two in 512..=2 MiB.
    pub cluster_size: u32,
    /// Refcount width in bits, a power of two in 1..=64.
    pub refcount_bits: u32,
    /// Header version.
    pub compat: Compat,
    /// Extended L2 entries (subclusters); needs compat 1.1.
    pub extended_l2: bool,
    /// Lazy refcounts; needs compat 1.1.
    pub lazy_refcounts: bool,
    /// Backing file name stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format stored in a header extension.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V3,
            extended_l2: false,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Leaked clusters only (`-r leaks`).
    Leaks,
    /// Leaks and corruptions (`-r all`).
    All,
}

/// Result of a consistency check, with `qemu-img check`'s numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Human-readable findings in QEMU's wording, one per line.
    pub messages: Vec<String>,
    /// Corruptions found (and not fixed).
    pub corruptions: u64,
    /// Leaked clusters found (and not fixed).
    pub leaks: u64,
    /// Errors that stopped the check from completing.
    pub check_errors: u64,
    /// Corruptions fixed by repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by repair.
    pub leaks_fixed: u64,
    /// Clusters of guest data allocated in the active layer.
    pub allocated_clusters: u64,
    /// Virtual size in clusters.
    pub total_clusters: u64,
    /// Allocated clusters that are not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active layer.
    pub compressed_clusters: u64,
    /// Offset of the end of the last used cluster.
    pub image_end_offset: u64,
}

/// Header facts shown by `vmsnap info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// "0.10" or "1.1".
    pub compat: &'static str,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Marked corrupt.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Dirty (lazy refcounts not up to date).
    pub dirty: bool,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Backing file, if any.
    pub backing_file: Option<String>,
}

/// An open qcow2 image.
#[derive(Debug)]
#[must_use = "a qcow2 image must be flushed before it is dropped"]
pub struct Qcow2 {
    _storage: Box<dyn Storage>,
}

impl Qcow2 {
    /// Creates a new image file.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        let _ = (path, opts);
        Err(Qcow2Error::Unsupported("create".into()).into())
    }

    /// Formats `storage` as a new empty image.
    pub fn create_on(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
        let _ = (storage, opts);
        Err(Qcow2Error::Unsupported("create".into()).into())
    }

    /// Opens an image file (taking QEMU-compatible locks unless `force_share`).
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let _ = (path, opts);
        Err(Qcow2Error::Unsupported("open".into()).into())
    }

    /// Opens an image on any storage.
    pub fn open_storage(storage: Box<dyn Storage>, read_only: bool) -> Result<Self> {
        let _ = (storage, read_only);
        Err(Qcow2Error::Unsupported("open".into()).into())
    }

    /// Header facts for `info`.
    pub fn info(&self) -> ImageInfo {
        unimplemented!()
    }

    /// Checks (and optionally repairs) the image's metadata, like `qemu-img check`.
    pub fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport> {
        let _ = repair;
        Err(Qcow2Error::Unsupported("check".into()).into())
    }
}

impl BlockDriver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        0
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Qcow2Error::Unsupported("read".into()).into())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Qcow2Error::Unsupported("write".into()).into())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Err(Qcow2Error::Unsupported("write".into()).into())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Err(Qcow2Error::Unsupported("discard".into()).into())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn snapshots(&mut self) -> Option<&mut dyn SnapshotStore> {
        Some(self)
    }
}

impl SnapshotStore for Qcow2 {
    fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
    fn snapshot_create(&mut self, _params: &SnapshotParams) -> Result<SnapshotInfo> {
        Err(Qcow2Error::Unsupported("snapshot".into()).into())
    }
    fn snapshot_goto(&mut self, _id_or_name: &str) -> Result<()> {
        Err(Qcow2Error::Unsupported("snapshot".into()).into())
    }
    fn snapshot_delete(&mut self, _id_or_name: &str) -> Result<()> {
        Err(Qcow2Error::Unsupported("snapshot".into()).into())
    }
    fn vmstate_write(&mut self, _pos: u64, _buf: &[u8]) -> Result<()> {
        Err(Qcow2Error::Unsupported("vmstate".into()).into())
    }
    fn vmstate_read(&mut self, _pos: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Qcow2Error::Unsupported("vmstate".into()).into())
    }
    fn snapshot_vmstate_read(&mut self, _id: &str, _pos: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Qcow2Error::Unsupported("vmstate".into()).into())
    }
    fn snapshot_extra_tail(&self, _id: &str) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}
