//! The qcow2 driver (QEMU copy-on-write, versions 2 and 3) with internal snapshots.
//!
//! ```text
//!  header ─┬─ L1 table (active) ── L2 tables ── data clusters
//!          ├─ refcount table ── refcount blocks (one count per host cluster)
//!          └─ snapshot table ── entry ── L1 table (snapshot) ── shared L2 / data clusters
//! ```
//!
//! Format facts are written up in `formats/qcow2.md`. The files of this module each hold one
//! concept: [`layout`] (geometry), [`header`], [`entry`] (L1/L2 entries), [`cache`]
//! (write-through metadata cache), `refcount` (counts and allocation), `io` (guest reads and
//! writes with copy-on-write), [`snapshot`] (table and create/goto/delete), [`check`].
//!
//! Metadata is written through: every change reaches storage in the order the code performs
//! it, data before the L2 entry that points to it, refcount increments before the reference
//! and decrements after it is gone, so a crash leaks clusters but never leaves a count below
//! the number of references.
#![deny(unsafe_code)]

pub mod cache;
pub mod check;
pub mod copy;
mod discard;
pub mod entry;
pub mod header;
mod io;
pub mod layout;
mod overlap;
mod preflight;
mod refbatch;
mod refcount;
mod room;
pub mod snapshot;
mod snaptable;
mod tally;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use byteorder::{BigEndian, ByteOrder};

use super::storage::{self, Storage};
use super::{
    lock, BlockDriver, DetachedRun, Error, Format, OpenOptions, Result, SnapshotInfo,
    SnapshotParams, SnapshotStore,
};
use cache::MetaCache;
pub use check::{CheckReport, Repair};
pub use header::QCOW_MAGIC;
use header::{
    Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
};
use layout::{Layout, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use snapshot::Snapshot;

/// Errors of the qcow2 driver.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The header is malformed.
    #[error("{0}")]
    InvalidHeader(String),
    /// The image uses a feature vmsnap does not implement.
    #[error("{0}")]
    UnsupportedFeature(String),
    /// A metadata table lies outside the file, is misaligned or too large.
    #[error("{what} {reason} (offset {offset:#x})")]
    InvalidTable {
        /// Which table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Metadata found inconsistent while serving a request.
    #[error("qcow2 metadata is corrupt: {0}")]
    Corrupt(String),
    /// The image carries the corrupt bit and cannot be opened for writing.
    #[error("qcow2: Image is corrupt; cannot be opened read/write (run 'vmsnap check -r all')")]
    MarkedCorrupt,
    /// A write would have gone over metadata (QEMU `qcow2_pre_write_overlap_check`).
    #[error(
        "Preventing invalid write on metadata (overlaps with {what}): {len} bytes at host offset \
         {offset:#x} would hit the cluster at {cluster:#x}; nothing was written there, the \
         image is damaged (run 'vmsnap check -r all')"
    )]
    MetadataOverlap {
        /// QEMU's name of the structure hit ("refcount block", "active L1 table", ...).
        what: &'static str,
        /// Host offset of the refused write.
        offset: u64,
        /// Its length.
        len: u64,
        /// The first metadata cluster it would have hit.
        cluster: u64,
    },
    /// A snapshot operation found the tables it would change inconsistent and changed nothing.
    #[error("{0}; nothing was changed (run 'vmsnap check' for details, 'vmsnap check -r all' to repair)")]
    Refused(String),
    /// A refcount would overflow the refcount width.
    #[error("refcount of cluster {cluster:#x} would exceed the {bits}-bit refcount width")]
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// Refcount width.
        bits: u32,
    },
    /// The refcount width cannot count the second reference a snapshot adds.
    #[error(
        "cannot create a snapshot: refcount_bits={0} cannot count the references a snapshot \
         shares (need at least 2 bits)"
    )]
    RefcountTooNarrow(u32),
    /// A snapshot with that name exists.
    #[error("Snapshot '{0}' already exists")]
    SnapshotExists(String),
    /// A snapshot table limit of QEMU would be exceeded.
    #[error("{0}")]
    SnapshotLimit(String),
    /// goto of a snapshot taken with another disk size.
    #[error("qcow2: Loading snapshots with different disk size is not supported (snapshot {snapshot} has {snap_size}, disk {disk_size})")]
    DiskSizeMismatch {
        /// Snapshot id.
        snapshot: String,
        /// Its recorded disk size.
        snap_size: u64,
        /// Current size.
        disk_size: u64,
    },
    /// New clusters would end past the end of fixed-size storage (an NBD export).
    #[error(
        "export full: {len:#x} bytes of new clusters from {offset:#x} do not fit in the \
         storage's fixed size of {size} bytes"
    )]
    ExportFull {
        /// Host offset of the first new cluster.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The storage's size.
        size: u64,
    },
    /// VM state about to be saved cannot fit in what is left of fixed-size storage.
    #[error(
        "export full: {len} bytes of VM state do not fit in the {room} bytes left of the \
         storage's fixed size of {size} bytes"
    )]
    VmStateNoRoom {
        /// VM state size announced.
        len: u64,
        /// Free bytes below the storage's end.
        room: u64,
        /// The storage's size.
        size: u64,
    },
    /// A compressed cluster could not be decompressed.
    #[error("could not decompress cluster at host offset {offset:#x}: {reason}")]
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// The backing file could not be opened.
    #[error("Could not open backing file '{path}': {source}")]
    Backing {
        /// Backing file path.
        path: String,
        /// Cause.
        #[source]
        source: Box<Error>,
    },
}

fn corrupt(msg: String) -> Error {
    Error::Qcow2(Qcow2Error::Corrupt(msg))
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
    /// Backing file format, if recorded.
    pub backing_format: Option<String>,
}

/// An open qcow2 image.
#[derive(Debug)]
#[must_use = "a qcow2 image must be flushed before it is dropped"]
pub struct Qcow2 {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) header: Header,
    pub(crate) layout: Layout,
    pub(crate) read_only: bool,
    /// Active L1 table (raw entries, host order).
    pub(crate) l1: Vec<u64>,
    /// Refcount table (raw entries).
    pub(crate) reftable: Vec<u64>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) backing: Option<Box<dyn BlockDriver>>,
    pub(crate) l2_cache: MetaCache,
    pub(crate) rb_cache: MetaCache,
    /// Changed metadata a snapshot walk may hold before writing it.
    pub(crate) walk_batch_limit: usize,
    /// Refcount blocks changed in memory while a batch is open (see `refbatch`).
    pub(crate) rb_dirty: Option<refbatch::DirtyBlocks>,
    /// Data runs written now are handed to [`Storage::start_writeback`] (VM state writes).
    pub(crate) writeback_runs: bool,
    /// Bytes of such runs written since the last writeback kick.
    pub(crate) unsent: u64,
    /// While [`SnapshotStore::vmstate_write_detached`] runs: the fresh-cluster runs whose
    /// data is left to the caller.
    pub(crate) detached: Option<Vec<DetachedRun>>,
    /// Clusters freed while a [`Qcow2::discarding`] operation runs.
    pub(crate) discards: Option<discard::Discards>,
    /// First host cluster index that may be free.
    pub(crate) free_hint: u64,
    /// Where the search for the next multi-cluster run starts.
    pub(crate) run_hint: u64,
    /// One past the highest cluster index known to be in use (file end, or later allocations).
    pub(crate) end_cluster: u64,
    /// Something may have been written since the last successful flush. Starts true, so the
    /// first flush asked for always reaches storage.
    pub(crate) unflushed: AtomicBool,
    /// Last decompressed cluster (host offset of its descriptor, bytes).
    pub(crate) decompressed: Option<(u64, Vec<u8>)>,
    /// The last snapshot L1 table read for its VM state, keyed by (offset, entries), so that
    /// a long state read in many pieces reads the table once. Dropped when the snapshot
    /// table or a snapshot's L1 table is written.
    pub(crate) snap_l1: Option<(u64, u32, Vec<u64>)>,
    /// Metadata clusters by category, for the overlap check before every write.
    pub(crate) overlap: std::sync::Mutex<overlap::OverlapState>,
    /// Unknown autoclear bits are set on storage and not yet cleared: the first write that
    /// has passed its checks clears them first (see [`Qcow2::swrite_meta`]).
    autoclear_pending: AtomicBool,
    path: Option<PathBuf>,
}

impl Qcow2 {
    /// Creates a new image file (like `qemu-img create -f qcow2`).
    ///
    /// # Errors
    /// Invalid options, or I/O errors.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        let storage = storage::create(path)
            .map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
        Self::create_on(storage, opts)
    }

    /// Formats `storage` as a new empty image.
    ///
    /// Layout as QEMU makes it: header in cluster 0, refcount table in cluster 1, the first
    /// refcount block in cluster 2, then the L1 table.
    ///
    /// # Errors
    /// Invalid options, or I/O errors.
    pub fn create_on(storage: Box<dyn Storage>, opts: &CreateOptions) -> Result<()> {
        let cs = u64::from(opts.cluster_size);
        if !opts.cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::Format(format!(
                "Cluster size must be a power of two between 512 and 2048k (got {})",
                opts.cluster_size
            )));
        }
        if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
            return Err(Error::Format(format!(
                "Refcount width must be a power of two and may not exceed 64 bits (got {})",
                opts.refcount_bits
            )));
        }
        let v3 = opts.compat == Compat::V3;
        if !v3 && opts.refcount_bits != 16 {
            return Err(Error::Format(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        if !v3 && (opts.extended_l2 || opts.lazy_refcounts) {
            return Err(Error::Format(
                "Extended L2 entries and lazy refcounts are only supported with compatibility \
                 level 1.1 and above (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        if opts.extended_l2 && cs < 16384 {
            return Err(Error::Format(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            ));
        }
        if opts.size > (1u64 << 62) || opts.size % 512 != 0 && opts.size > (1 << 40) {
            return Err(Error::Format(format!("Image size too big: {}", opts.size)));
        }
        let cluster_bits = opts.cluster_size.trailing_zeros();
        let layout = Layout {
            cluster_bits,
            extended_l2: opts.extended_l2,
            refcount_order: opts.refcount_bits.trailing_zeros(),
        };
        let l1_entries = layout.size_to_l1(opts.size);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::Format(format!(
                "Image size too big for cluster size {}: needs an L1 table of {} entries",
                cs, l1_entries
            )));
        }
        let mut extensions = Vec::new();
        if let Some(fmt) = &opts.backing_format {
            extensions.push(header::Extension {
                kind: header::EXT_BACKING_FORMAT,
                data: fmt.as_bytes().to_vec(),
            });
        }
        if v3 {
            extensions.push(header::default_feature_table());
        }
        let header_length = if v3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        };
        let ext_len: usize = extensions
            .iter()
            .map(|e| 8 + e.data.len().div_ceil(8) * 8)
            .sum();
        let name_off = header_length as usize + ext_len + 8;
        let (backing_file_offset, backing_file_size) = match &opts.backing_file {
            Some(n) => {
                if name_off + n.len() > cs as usize || n.len() > 1023 {
                    return Err(Error::Format(format!("Backing file name too long: '{n}'")));
                }
                (name_off as u64, n.len() as u32)
            }
            None => (0, 0),
        };
        let l1_clusters = layout.clusters_for(l1_entries * 8).max(1);
        let mut h = Header {
            version: if v3 { 3 } else { 2 },
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size: opts.size,
            crypt_method: 0,
            l1_size: l1_entries as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if opts.extended_l2 { INCOMPAT_EXTL2 } else { 0 },
            compatible_features: if opts.lazy_refcounts {
                header::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: layout.refcount_order,
            header_length,
            compression_type: 0,
            extensions,
            backing_file: opts.backing_file.clone(),
        };
        // The first refcount block covers clusters 0..refblock_entries; if the L1 table does
        // not fit there, let the allocator place it after the fact.
        let first_fits = 3 + l1_clusters <= layout.refblock_entries();
        if !first_fits {
            h.l1_table_offset = 0;
            h.l1_size = 0;
        }
        let io = |e| Error::io("Could not write the new image", e);
        storage.set_len(0).map_err(io)?;
        storage.write_at(0, &h.to_bytes(cs as usize)).map_err(io)?;
        let mut reftable = vec![0u8; cs as usize];
        BigEndian::write_u64(&mut reftable, 2 * cs);
        storage.write_at(cs, &reftable).map_err(io)?;
        let mut block = vec![0u8; cs as usize];
        let used = if first_fits { 3 + l1_clusters } else { 3 };
        for i in 0..used {
            refcount::set_in_block(&mut block, i as usize, layout.refcount_order, 1);
        }
        storage.write_at(2 * cs, &block).map_err(io)?;
        if first_fits {
            let l1_bytes = (l1_entries * 8) as usize;
            storage
                .write_at(3 * cs, &vec![0u8; l1_bytes.max(8)])
                .map_err(io)?;
            storage.set_len(3 * cs + l1_bytes as u64).map_err(io)?;
        } else {
            storage.set_len(3 * cs).map_err(io)?;
        }
        storage.flush().map_err(io)?;
        if !first_fits {
            // Grow the (empty) L1 table to its full size through the normal path.
            let mut img = Self::open_inner(storage, false, true)?;
            img.grow_l1(l1_entries, true)?;
            img.flush()?;
        }
        Ok(())
    }

    /// Opens an image file (taking QEMU-compatible locks unless `force_share`).
    ///
    /// # Errors
    /// I/O errors, lock conflicts, or any header or table validation error.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let storage = storage::open(path, !opts.read_only)
            .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
        if !opts.force_share {
            if let Some(f) = storage.file() {
                lock::lock_image(f, &path.display().to_string(), !opts.read_only)?;
            }
        }
        let mut img = Self::open_inner(storage, opts.read_only, false)?;
        img.path = Some(path.to_path_buf());
        img.open_backing()?;
        Ok(img)
    }

    /// Opens an image on any storage (no backing file is opened).
    ///
    /// # Errors
    /// Any header or table validation error.
    pub fn open_storage(storage: Box<dyn Storage>, read_only: bool) -> Result<Self> {
        Self::open_inner(storage, read_only, false)
    }

    fn open_inner(storage: Box<dyn Storage>, read_only: bool, creating: bool) -> Result<Self> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("Could not get the image size", e))?;
        let buf = read_first_cluster(&*storage, file_len)
            .map_err(|e| Error::io("Could not read qcow2 header", e))?;
        let header = Header::parse(&buf)?;
        let layout = header.layout();
        let cs = layout.cluster_size();
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::UnsupportedFeature(
                "images with an external data file are not supported".into(),
            )
            .into());
        }
        if header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(
                Qcow2Error::InvalidHeader("data-file-raw requires a data file".into()).into(),
            );
        }
        if !read_only && header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt.into());
        }
        // Refcount table.
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        validate_table_at(
            "Refcount table",
            header.refcount_table_offset,
            rt_bytes,
            MAX_REFTABLE_BYTES.max(cs),
            cs,
            file_len,
            read_only,
        )?;
        if header.refcount_table_clusters == 0 {
            return Err(Qcow2Error::InvalidTable {
                what: "Refcount table",
                offset: header.refcount_table_offset,
                reason: "is empty".into(),
            }
            .into());
        }
        let reftable = read_table(&*storage, header.refcount_table_offset, rt_bytes / 8)?;
        // Active L1 table.
        if u64::from(header.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::InvalidTable {
                what: "Active L1 table",
                offset: header.l1_table_offset,
                reason: format!("too large ({} entries)", header.l1_size),
            }
            .into());
        }
        if !creating && u64::from(header.l1_size) < layout.size_to_l1(header.size) {
            return Err(Qcow2Error::InvalidHeader(format!(
                "L1 table is too small: {} entries for a {}-byte disk",
                header.l1_size, header.size
            ))
            .into());
        }
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_size > 0 {
            validate_table_at(
                "Active L1 table",
                header.l1_table_offset,
                l1_bytes,
                MAX_L1_BYTES,
                cs,
                file_len,
                read_only,
            )?;
        }
        let l1 = read_table(&*storage, header.l1_table_offset, u64::from(header.l1_size))?;
        let snapshots = snapshot::read_table(&*storage, &header, file_len)?;
        // L2 cache covering the whole disk (as qemu-img's), refcount cache a quarter of it.
        let l2_clusters = MetaCache::l2_capacity(layout.size_to_l1(header.size), cs);
        let rb_clusters = (l2_clusters / 4).max(4);
        let img = Qcow2 {
            storage,
            layout,
            read_only,
            l1,
            reftable,
            snapshots,
            backing: None,
            l2_cache: MetaCache::new(l2_clusters),
            rb_cache: MetaCache::new(rb_clusters),
            rb_dirty: None,
            walk_batch_limit: snapshot::WALK_BATCH_BYTES,
            unflushed: AtomicBool::new(true),
            writeback_runs: false,
            unsent: 0,
            detached: None,
            discards: None,
            free_hint: 0,
            run_hint: 0,
            end_cluster: file_len.div_ceil(cs),
            decompressed: None,
            snap_l1: None,
            overlap: overlap::new_state(),
            autoclear_pending: AtomicBool::new(
                !read_only && header.version >= 3 && header.autoclear_features != 0,
            ),
            path: None,
            header,
        };
        Ok(img)
    }

    fn open_backing(&mut self) -> Result<()> {
        let Some(name) = self.header.backing_file.clone() else {
            return Ok(());
        };
        let base = self
            .path
            .as_ref()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let p = if Path::new(&name).is_absolute() {
            PathBuf::from(&name)
        } else {
            base.join(&name)
        };
        let format = match self.header.backing_format() {
            Some(f) => Some(f.parse()?),
            None => None,
        };
        let opts = OpenOptions {
            read_only: true,
            format,
            force_share: true,
        };
        let b = super::open_image(&p, opts).map_err(|e| Qcow2Error::Backing {
            path: p.display().to_string(),
            source: Box::new(e),
        })?;
        self.backing = Some(b);
        Ok(())
    }

    /// Header facts for `info`.
    pub fn info(&self) -> ImageInfo {
        let h = &self.header;
        ImageInfo {
            virtual_size: h.size,
            cluster_size: self.layout.cluster_size(),
            compat: if h.version >= 3 { "1.1" } else { "0.10" },
            refcount_bits: self.layout.refcount_bits(),
            lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
            extended_l2: self.layout.extended_l2,
            dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
            compression_type: if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            },
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format(),
        }
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image geometry.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Guest offset of the VM state area.
    pub fn vm_state_offset(&self) -> u64 {
        self.layout.vm_state_offset(self.header.size)
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            self.not_refused()
        }
    }

    pub(crate) fn sread(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_at(offset, buf)
            .map_err(|e| Error::io(format!("read at host offset {offset:#x}"), e))
    }

    /// Writes guest data: it may overlap no metadata.
    pub(crate) fn swrite(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.swrite_meta(overlap::ol::DATA, offset, buf)
    }

    /// Writes to storage after checking that the write touches no metadata other than the
    /// categories in `ign` (the structure being written).
    ///
    /// Nothing is written on open: unknown autoclear bits are cleared here, before the first
    /// write that has passed its checks, so that a refused operation leaves the file's bytes
    /// as they were.
    pub(crate) fn swrite_meta(&self, ign: u8, offset: u64, buf: &[u8]) -> Result<()> {
        self.swrite_meta_as(ign, ign, offset, buf)
    }

    /// [`Qcow2::swrite_meta`] for a write that may touch the categories in `ign` but is a
    /// write of the structure `kind` (one category) for its kill points.
    pub(crate) fn swrite_meta_as(&self, ign: u8, kind: u8, offset: u64, buf: &[u8]) -> Result<()> {
        self.overlap_check(ign, offset, buf.len() as u64)?;
        if self.autoclear_pending.load(Ordering::Relaxed) {
            self.clear_autoclear()?;
        }
        let (before, after) = kill_phases(kind);
        crate::killpoint::at(before);
        self.unflushed.store(true, Ordering::Relaxed);
        self.storage
            .write_at(offset, buf)
            .map_err(|e| Error::io(format!("write at host offset {offset:#x}"), e))?;
        crate::killpoint::at(after);
        Ok(())
    }

    /// Flushes storage, unless nothing was written since the last successful flush (a
    /// second fdatasync in a row costs a disk round trip and makes nothing more durable).
    pub(crate) fn sflush(&self) -> Result<()> {
        if !self.unflushed.load(Ordering::Relaxed) {
            return Ok(());
        }
        crate::killpoint::at("qcow2:flush");
        self.storage.flush().map_err(|e| Error::io("flush", e))?;
        self.unflushed.store(false, Ordering::Relaxed);
        crate::killpoint::at("qcow2:flushed");
        Ok(())
    }

    /// Clears autoclear feature bits we do not maintain, synced, before the first write (QEMU
    /// clears the bits it does not know on a writable open; vmsnap maintains none, e.g. no
    /// persistent bitmaps, and defers it to the first write so that refusals change nothing).
    fn clear_autoclear(&self) -> Result<()> {
        self.overlap_check(overlap::ol::MAIN_HEADER, header::OFF_AUTOCLEAR, 8)?;
        crate::killpoint::at("qcow2:write:autoclear");
        self.storage
            .write_at(header::OFF_AUTOCLEAR, &[0u8; 8])
            .and_then(|()| self.storage.flush())
            .map_err(|e| Error::io("clear the autoclear feature bits", e))?;
        self.autoclear_pending.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Repairs a dirty (lazy-refcounts) image: rebuilds refcounts and clears the dirty bit.
    pub(crate) fn repair_if_dirty(&mut self) -> Result<()> {
        if self.header.incompatible_features & INCOMPAT_DIRTY == 0 {
            return Ok(());
        }
        self.writable()?;
        self.preflight_dirty_repair()?;
        self.check(Some(Repair::All))?;
        let bits = self.header.incompatible_features & !INCOMPAT_DIRTY;
        let mut b = [0u8; 8];
        BigEndian::write_u64(&mut b, bits);
        self.sflush()?;
        self.swrite_meta(overlap::ol::MAIN_HEADER, header::OFF_INCOMPAT, &b)?;
        self.sflush()?;
        self.header.incompatible_features = bits;
        Ok(())
    }

    /// Writes `l1_size` and `l1_table_offset` in one 12-byte header write.
    pub(crate) fn commit_l1_header(&mut self, size: u32, offset: u64) -> Result<()> {
        let mut b = [0u8; 12];
        BigEndian::write_u32(&mut b[0..4], size);
        BigEndian::write_u64(&mut b[4..12], offset);
        self.swrite_meta(overlap::ol::MAIN_HEADER, header::OFF_L1, &b)?;
        self.sflush()?;
        self.header.l1_size = size;
        self.header.l1_table_offset = offset;
        self.tables_changed();
        Ok(())
    }

    /// Writes one active L1 entry through to storage.
    pub(crate) fn write_l1_entry(&mut self, index: usize, value: u64) -> Result<()> {
        let off = self.header.l1_table_offset + index as u64 * 8;
        self.overlap_check(overlap::ol::ACTIVE_L1, off, 8)?;
        self.l1[index] = value;
        self.tables_changed();
        let mut b = [0u8; 8];
        BigEndian::write_u64(&mut b, value);
        self.swrite_meta(overlap::ol::ACTIVE_L1, off, &b)
    }

    /// Entries of the active L1 table once [`Qcow2::grow_l1`] has grown it to at least
    /// `min_size` (by half its size at a time unless `exact`, as QEMU grows it).
    pub(crate) fn l1_grown_size(&self, min_size: u64, exact: bool) -> u64 {
        let cur = self.l1.len() as u64;
        if min_size <= cur {
            return cur;
        }
        let mut new_size = if exact { min_size } else { cur.max(1) };
        while new_size < min_size {
            new_size = (new_size * 3).div_ceil(2);
        }
        new_size
    }

    /// Grows the active L1 table to at least `min_size` entries (QEMU `qcow2_grow_l1_table`):
    /// new table in fresh clusters, flush, one header write, then free the old table.
    pub(crate) fn grow_l1(&mut self, min_size: u64, exact: bool) -> Result<()> {
        let cur = self.l1.len() as u64;
        if min_size <= cur {
            return Ok(());
        }
        let new_size = self.l1_grown_size(min_size, exact);
        if new_size * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::InvalidTable {
                what: "Active L1 table",
                offset: self.header.l1_table_offset,
                reason: format!("would exceed QEMU's limit with {new_size} entries"),
            }
            .into());
        }
        let bytes = new_size * 8;
        let new_off = self.alloc_clusters(self.layout.clusters_for(bytes))?;
        let mut table = self.l1.clone();
        table.resize(new_size as usize, 0);
        let mut raw = vec![
            0u8;
            self.layout.clusters_for(bytes) as usize
                * self.layout.cluster_size() as usize
        ];
        for (i, e) in table.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        self.swrite_meta(overlap::ol::ACTIVE_L1, new_off, &raw)?;
        self.sflush()?;
        let old_off = self.header.l1_table_offset;
        let old_bytes = cur * 8;
        self.commit_l1_header(new_size as u32, new_off)?;
        self.l1 = table;
        self.tables_changed();
        if old_bytes > 0 {
            self.free_range(old_off, old_bytes)?;
        }
        Ok(())
    }

    /// Reads guest data of a snapshot (through its own L1 table, without goto).
    ///
    /// # Errors
    /// [`Error::SnapshotNotFound`], or I/O and metadata errors.
    pub fn read_snapshot(&mut self, id_or_name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let idx = self.find_snapshot(id_or_name)?;
        let sn = self.snapshots[idx].clone();
        super::check_range(offset, buf.len() as u64, sn.disk_size)?;
        let l1 = self.read_snapshot_l1(&sn)?;
        self.read_guest(Some(&l1), offset, buf)
    }

    /// Reads a snapshot's L1 table from storage after checking that it is cluster aligned,
    /// inside the file and within QEMU's size limit.
    pub(crate) fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        if sn.l1_size > 0 {
            let file_len = self.storage.len().map_err(|e| Error::io("image size", e))?;
            validate_table(
                "Snapshot L1 table",
                sn.l1_table_offset,
                u64::from(sn.l1_size) * 8,
                MAX_L1_BYTES,
                self.layout.cluster_size(),
                file_len,
            )?;
        }
        read_table(&*self.storage, sn.l1_table_offset, u64::from(sn.l1_size))
    }
}

/// The kill points (see [`crate::killpoint`]) before and after a write of category `ign`.
fn kill_phases(ign: u8) -> (&'static str, &'static str) {
    use overlap::ol;
    match ign {
        ol::MAIN_HEADER => ("qcow2:write:header", "qcow2:wrote:header"),
        ol::ACTIVE_L1 => ("qcow2:write:active-l1", "qcow2:wrote:active-l1"),
        ol::REFCOUNT_TABLE => ("qcow2:write:refcount-table", "qcow2:wrote:refcount-table"),
        ol::REFCOUNT_BLOCK => ("qcow2:write:refcount-block", "qcow2:wrote:refcount-block"),
        ol::SNAPSHOT_TABLE => ("qcow2:write:snapshot-table", "qcow2:wrote:snapshot-table"),
        ol::INACTIVE_L1 => ("qcow2:write:inactive-l1", "qcow2:wrote:inactive-l1"),
        ol::DATA => ("qcow2:write:data", "qcow2:wrote:data"),
        _ => ("qcow2:write:l2", "qcow2:wrote:l2"),
    }
}

/// Checks that a table lies inside the file, is cluster aligned and within QEMU's limit.
pub(crate) fn validate_table(
    what: &'static str,
    offset: u64,
    bytes: u64,
    max_bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    validate_table_at(
        what,
        offset,
        bytes,
        max_bytes,
        cluster_size,
        file_len,
        false,
    )
}

/// The image's first cluster (or the whole file, if shorter), where the header and its
/// extensions lie: 64 KiB first, then the rest once the header's cluster size (at most
/// 2 MiB) is known. Over NBD every byte costs a transfer: reading 2 MiB at every open cost
/// more than a whole offline `snapshot -c` on a local file.
fn read_first_cluster(storage: &dyn Storage, file_len: u64) -> std::io::Result<Vec<u8>> {
    const FIRST: u64 = 64 << 10;
    let mut buf = vec![0u8; file_len.min(FIRST) as usize];
    storage.read_at(0, &mut buf)?;
    if let Some(bits) = buf
        .get(20..24)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    {
        if (layout::MIN_CLUSTER_BITS..=layout::MAX_CLUSTER_BITS).contains(&bits) {
            let want = file_len.min(1 << bits) as usize;
            let have = buf.len();
            if want > have {
                buf.resize(want, 0);
                storage.read_at(have as u64, &mut buf[have..])?;
            }
        }
    }
    Ok(buf)
}

/// [`validate_table`], or with `lenient` only what QEMU's `qcow2_validate_table` checks
/// (alignment and size limit; offset 0 and tables past the end of the file, which read as
/// zeroes, are accepted). Read-only opens are lenient, so that `info`, `snapshot -l` and
/// `check` see what qemu-img sees; writable opens are not, as writes would go over the
/// header or extend the file under the table.
pub(crate) fn validate_table_at(
    what: &'static str,
    offset: u64,
    bytes: u64,
    max_bytes: u64,
    cluster_size: u64,
    file_len: u64,
    lenient: bool,
) -> Result<()> {
    let err = |reason: String| {
        Err(Qcow2Error::InvalidTable {
            what,
            offset,
            reason,
        }
        .into())
    };
    if bytes > max_bytes {
        return err(format!("too large ({bytes} bytes, limit {max_bytes})"));
    }
    if offset % cluster_size != 0 || offset == 0 && bytes > 0 && !lenient {
        return err("offset invalid (not cluster aligned or zero)".into());
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len || lenient && end <= i64::MAX as u64 => Ok(()),
        _ => err(format!(
            "extends beyond the end of the file ({file_len:#x} bytes)"
        )),
    }
}

/// Reads a table of big-endian u64 entries; the caller has validated its extent.
///
/// Storage reads past its end as zeroes, and so does the table: only the part inside the
/// storage is read, into a table allocated zeroed, so that a table QEMU accepts past the end
/// of the file (up to 32 MiB of L1) costs neither a buffer nor a copy of zeroes.
pub(crate) fn read_table(storage: &dyn Storage, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let bytes = entries * 8;
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("read table at {offset:#x}"), e))?;
    // Whole entries: one that straddles the end reads the rest of itself as zeroes.
    let inside = len.saturating_sub(offset).min(bytes).next_multiple_of(8);
    let mut raw = vec![0u8; inside as usize];
    storage
        .read_at(offset, &mut raw)
        .map_err(|e| Error::io(format!("read table at {offset:#x}"), e))?;
    let mut table = vec![0u64; entries as usize];
    for (t, b) in table.iter_mut().zip(raw.chunks_exact(8)) {
        *t = BigEndian::read_u64(b);
    }
    Ok(table)
}

impl BlockDriver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        self.header.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        super::check_range(offset, buf.len() as u64, self.header.size)?;
        self.read_guest(None, offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        super::check_range(offset, buf.len() as u64, self.header.size)?;
        self.write_guest(offset, buf)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        super::check_range(offset, len, self.header.size)?;
        self.zero_guest(offset, len, false)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        super::check_range(offset, len, self.header.size)?;
        self.zero_guest(offset, len, true)
    }
    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sflush()
    }
    fn snapshots(&mut self) -> Option<&mut dyn SnapshotStore> {
        Some(self)
    }
    fn data_handle(&self) -> Option<super::storage::DataHandle> {
        if self.read_only {
            return None;
        }
        self.storage.data_handle()
    }
}

impl SnapshotStore for Qcow2 {
    fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(Snapshot::info).collect()
    }
    fn snapshot_create(&mut self, params: &SnapshotParams) -> Result<SnapshotInfo> {
        self.create_snapshot(params)
    }
    fn snapshot_goto(&mut self, id_or_name: &str) -> Result<()> {
        self.discarding(|q| q.goto_snapshot(id_or_name))
    }
    fn snapshot_delete(&mut self, id_or_name: &str) -> Result<()> {
        self.discarding(|q| q.delete_snapshot(id_or_name))
    }
    fn begin_discards(&mut self) {
        self.begin_discard_scope();
    }
    fn end_discards(&mut self, punch: bool) -> Result<()> {
        self.end_discard_scope(punch)
    }
    fn vmstate_reserve(&mut self, len: u64) -> Result<()> {
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        self.check_vmstate_room(len)?;
        // One L1 growth now, while little is unflushed, instead of one every half L1 range
        // of state (growth factor 1.5) with flushes behind the state already written.
        let last = self.vm_state_offset().saturating_add(len - 1);
        self.grow_l1(self.layout.l1_index(last) + 1, true)
    }
    fn vmstate_write(&mut self, pos: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        let off = self.vm_state_offset() + pos;
        // The state is one long sequential write: its data runs are sent to the device as
        // they are written, so the flush at the end waits for the tail only.
        self.writeback_runs = true;
        let r = self.write_guest(off, buf);
        self.writeback_runs = false;
        r
    }
    fn vmstate_write_detached(&mut self, pos: u64, buf: &[u8]) -> Result<Vec<DetachedRun>> {
        self.writable()?;
        let off = self.vm_state_offset() + pos;
        // No early writeback here: the caller writes the runs and paces their syncs.
        self.detached = Some(Vec::new());
        let r = self.write_guest(off, buf);
        let runs = self.detached.take().unwrap_or_default();
        r.map(|()| runs)
    }
    fn vmstate_read(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.vm_state_offset() + pos;
        self.read_guest(None, off, buf)
    }
    fn snapshot_vmstate_read(&mut self, id_or_name: &str, pos: u64, buf: &mut [u8]) -> Result<()> {
        let idx = self.find_snapshot(id_or_name)?;
        let (offset, size) = (
            self.snapshots[idx].l1_table_offset,
            self.snapshots[idx].l1_size,
        );
        let l1 = match self.snap_l1.take() {
            Some((o, n, t)) if o == offset && n == size => t,
            _ => {
                let sn = self.snapshots[idx].clone();
                self.read_snapshot_l1(&sn)?
            }
        };
        let off = self.vm_state_offset() + pos;
        let r = self.read_guest(Some(&l1), off, buf);
        self.snap_l1 = Some((offset, size, l1));
        r
    }
    fn snapshot_extra_tail(&self, id_or_name: &str) -> Result<Vec<u8>> {
        let idx = self.find_snapshot(id_or_name)?;
        Ok(self.snapshots[idx].extra_tail().to_vec())
    }
}

#[cfg(test)]
mod damage_tests;
#[cfg(test)]
mod tests;
