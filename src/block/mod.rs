//! The block layer: image formats behind one driver trait.
//!
//! ```text
//!   BlockSet (bdrv_all_*: every writable disk of a VM, all or nothing)
//!        |
//!   dyn BlockDriver  ──  raw::Raw            guest I/O only
//!        |           └─  qcow2::Qcow2        guest I/O + SnapshotStore
//!        |
//!   storage::Storage  (File with pread/pwrite/fsync, MemStorage with fault injection)
//! ```
//!
//! Every driver serves guest I/O through [`BlockDriver`]. Drivers that keep internal snapshots
//! (only qcow2) also expose [`SnapshotStore`] through [`BlockDriver::snapshots`], mirroring
//! QEMU's `bdrv_can_snapshot()`. [`vmstate_io`] reads and writes a vmstate area as
//! `std::io::Read`/`Write`, which is all the migration stream codec sees of it.
#![deny(unsafe_code)]

pub mod absent;
pub mod blockset;
pub mod dirty;
pub mod lock;
pub mod qcow2;
pub mod raw;
pub mod storage;
pub mod vmstate_io;

use std::fmt;
use std::path::Path;

pub use blockset::{BlockSet, BlockSetError, Device};
pub use storage::{FileStorage, MemStorage, Storage};

/// Errors of the block layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the storage below, with the step that failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A qcow2 format or consistency error.
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
    /// A write was attempted on an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// Guest I/O beyond the end of the virtual disk.
    #[error("request [{offset:#x}, +{len:#x}) is beyond the end of the disk ({size:#x} bytes)")]
    OutOfRange {
        /// Request start.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// The driver does not keep internal snapshots.
    #[error("the {format} format does not support snapshots")]
    SnapshotsNotSupported {
        /// Format name.
        format: &'static str,
    },
    /// No snapshot with that id or name.
    #[error("Can't find snapshot '{0}'")]
    SnapshotNotFound(String),
    /// The image is locked by another process (QEMU or vmsnap).
    #[error("Failed to get \"{kind}\" lock on '{path}': is another process using the image?")]
    Locked {
        /// "write" or "shared".
        kind: &'static str,
        /// Image path.
        path: String,
    },
    /// The image format could not be recognised or is not the requested one.
    #[error("{0}")]
    Format(String),
}

impl Error {
    /// Wraps an `io::Error` with a description of the step that failed.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result type of the block layer.
pub type Result<T> = std::result::Result<T, Error>;

/// Image formats known to vmsnap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw image: the file is the disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The name QEMU uses (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::Format(format!("Unknown image format '{other}'"))),
        }
    }
}

/// One entry of an image's snapshot list, as `qemu-img snapshot -l` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (QEMU: decimal numbers, `max + 1`).
    pub id: String,
    /// User-given name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Wall-clock time of creation, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at creation, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count at creation; `None` when not recorded or -1 (no icount).
    pub icount: Option<u64>,
}

/// What the caller decides about a new snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotParams {
    /// Name (tag). Must be unique in the image.
    pub name: String,
    /// Size of the VM state already written to the vmstate area, 0 for disk-only.
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, `None` for "not recorded" (QEMU writes -1).
    pub icount: Option<u64>,
    /// Extra data of our own appended after the fields QEMU knows (kept by QEMU).
    pub extra_tail: Vec<u8>,
}

/// Guest I/O on a virtual disk. QEMU: `BlockDriver` read/write/flush callbacks.
pub trait BlockDriver: Send + fmt::Debug {
    /// The image format.
    fn format(&self) -> Format;
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Whether the image was opened read-only.
    fn is_read_only(&self) -> bool;
    /// Reads `buf.len()` bytes of guest data at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes guest data at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Discards `[offset, offset + len)`; afterwards the range reads as zeroes (or backing data).
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Writes all cached metadata and syncs the storage.
    fn flush(&mut self) -> Result<()>;
    /// The snapshot interface, if this format keeps internal snapshots.
    fn snapshots(&mut self) -> Option<&mut dyn SnapshotStore> {
        None
    }
    /// A handle on the image file that writes and syncs without this driver, for a writable
    /// image on a host file (see [`storage::DataHandle`]).
    fn data_handle(&self) -> Option<storage::DataHandle> {
        None
    }
}

/// Bytes [`SnapshotStore::vmstate_write_detached`] placed but left for the caller to write:
/// `buf[start..start + len]` goes to host offset `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetachedRun {
    /// Host offset of the run (within clusters allocated for it).
    pub host: u64,
    /// Start of the run's bytes in the buffer given.
    pub start: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Internal snapshots of one image. QEMU: `bdrv_snapshot_*` and `bdrv_{save,load}_vmstate`.
pub trait SnapshotStore {
    /// All snapshots, in table order.
    fn snapshot_list(&self) -> Vec<SnapshotInfo>;
    /// Creates a snapshot of the active layer; the VM state must already be in the vmstate area.
    fn snapshot_create(&mut self, params: &SnapshotParams) -> Result<SnapshotInfo>;
    /// Reverts the active layer to a snapshot (found by id first, then by name).
    fn snapshot_goto(&mut self, id_or_name: &str) -> Result<()>;
    /// Deletes a snapshot (found by id first, then by name).
    fn snapshot_delete(&mut self, id_or_name: &str) -> Result<()>;
    /// Holds back the discards of freed clusters until [`SnapshotStore::end_discards`], so
    /// that space one step frees and the next reuses (savevm over an existing tag: delete,
    /// then write the new state) is not punched out and allocated again.
    fn begin_discards(&mut self) {}
    /// Ends [`SnapshotStore::begin_discards`]: punches what was freed since and not reused
    /// (after a flush), or, with `punch` false (the steps failed), forgets it.
    fn end_discards(&mut self, punch: bool) -> Result<()> {
        let _ = punch;
        Ok(())
    }
    /// Prepares the vmstate area for about `len` bytes of VM state about to be written from
    /// position 0, so that the writes do not stop to grow metadata (qcow2: the active L1
    /// table, whose growth needs two flushes, each waiting for all the state written so far).
    /// A hint: writing more or less than `len` is fine.
    fn vmstate_reserve(&mut self, len: u64) -> Result<()> {
        let _ = len;
        Ok(())
    }
    /// Writes VM state into the active layer's vmstate area at `pos`.
    fn vmstate_write(&mut self, pos: u64, buf: &[u8]) -> Result<()>;
    /// [`SnapshotStore::vmstate_write`], except that the data of runs of fresh clusters is
    /// not written: the clusters are allocated and mapped (and checked against the metadata)
    /// and returned, for the caller to write through the driver's
    /// [`BlockDriver::data_handle`] without holding the driver. Until it has, the area holds
    /// whatever those clusters held; the caller writes every run before the state is used
    /// (a snapshot created, a flush relied on). The default writes everything itself.
    fn vmstate_write_detached(&mut self, pos: u64, buf: &[u8]) -> Result<Vec<DetachedRun>> {
        self.vmstate_write(pos, buf).map(|()| Vec::new())
    }
    /// Reads VM state from the active layer's vmstate area at `pos`.
    fn vmstate_read(&mut self, pos: u64, buf: &mut [u8]) -> Result<()>;
    /// Reads VM state of a snapshot through the snapshot's own L1 table, without goto.
    fn snapshot_vmstate_read(&mut self, id_or_name: &str, pos: u64, buf: &mut [u8]) -> Result<()>;
    /// Our own extra data stored after the fields QEMU knows, for a snapshot.
    fn snapshot_extra_tail(&self, id_or_name: &str) -> Result<Vec<u8>>;
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open without write access (and take only shared locks).
    pub read_only: bool,
    /// Force a format instead of probing.
    pub format: Option<Format>,
    /// Skip image locking (`-U`, `force-share`); only valid read-only.
    pub force_share: bool,
}

/// Probes the format of an image (a file or an NBD export): qcow2 if it starts with the
/// magic, raw otherwise.
pub fn probe_format(path: &Path) -> Result<Format> {
    probe(path).map(|(f, _)| f)
}

/// [`probe_format`], and the storage it read (kept open by [`open_image`] until the driver
/// has opened the image: on NBD the driver then shares its connection instead of making a
/// second one).
pub(crate) fn probe(path: &Path) -> Result<(Format, Box<dyn storage::Storage>)> {
    let s = storage::open(path, false)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    let len = s
        .len()
        .map_err(|e| Error::io(format!("Could not read '{}'", path.display()), e))?;
    let mut magic = [0u8; 4];
    s.read_at(0, &mut magic)
        .map_err(|e| Error::io(format!("Could not read '{}'", path.display()), e))?;
    let format = if len >= 4 && magic == qcow2::QCOW_MAGIC.to_be_bytes() {
        Format::Qcow2
    } else {
        Format::Raw
    };
    Ok((format, s))
}

/// Opens an image file with the requested or probed driver.
pub fn open_image(path: &Path, opts: OpenOptions) -> Result<Box<dyn BlockDriver>> {
    let (format, _probed) = match opts.format {
        Some(f) => (f, None),
        None => probe(path).map(|(f, s)| (f, Some(s)))?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::Raw::open(path, opts)?)),
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2::open(path, opts)?)),
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}
