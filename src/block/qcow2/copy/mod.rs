//! Snapshot-tree copy: a new qcow2 image holding the active layer *and* every internal
//! snapshot of a source image (table, layers, VM states), with the sharing between layers
//! kept. `vmsnap convert` uses it; `qemu-img convert` copies the active layer only.
//!
//! ```text
//!  source layers (active, then each snapshot in table order)
//!    └─ regions: the disk [0, disk_size) and, for snapshots, the VM state area
//!         └─ output cluster → key (source pieces: host range, compressed entry, zero, backing)
//!              └─ key seen before → the same output L2 entry (shared, refcount + 1)
//!                 new key        → read, zero check, (compress), append to the data area
//!  output L2 tables deduplicated by content; then L1 tables, snapshot table, refcounts, header
//! ```
//!
//! The output is built in one pass and written front to back: header cluster (written last),
//! data clusters in the order the walk meets them, then the metadata. Refcounts are counted
//! the way QEMU's `check` counts them (every L1 entry → L2 table → entry path adds one), so
//! the output has no leaks and `qemu-img check` finds it clean. The key is made of *source*
//! ranges, so sharing survives changes of cluster size, subclusters and compression: two
//! layers whose output cluster is built from the same source bytes share it.
//!
//! Hand-written: no crate reproduces a qcow2 snapshot tree; the codec pieces (deflate, zstd)
//! come from flate2 and zstd. Format notes: `formats/qcow2.md`, "Copying the snapshot tree".
#![deny(unsafe_code)]

mod source;
mod tables;
mod walk;
mod writer;

use super::Compat;
use crate::block::storage::Storage;

pub use source::{Select, SourceImage};

/// Errors of the snapshot-tree copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The output options are not allowed together.
    #[error("{0}")]
    Options(String),
    /// Reading the source failed.
    #[error("reading the source image")]
    Source(#[source] crate::block::Error),
    /// The snapshot asked for with `-l` is not in the source.
    #[error("Failed to load snapshot: Can't find snapshot '{0}'")]
    NoSuchSnapshot(String),
    /// A snapshot cannot be laid out in the output.
    #[error("snapshot '{name}': {reason}")]
    Snapshot {
        /// The snapshot's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing the output failed.
    #[error("writing the output at offset {offset:#x}")]
    Write {
        /// Output offset.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Compressing a cluster failed.
    #[error("compressing a cluster: {0}")]
    Compress(String),
    /// The output refcount width cannot count a shared cluster's references.
    #[error(
        "refcount_bits={bits} cannot count the {count} references to output cluster {cluster:#x} \
         that the snapshots share; use a wider refcount_bits or --active-only"
    )]
    RefcountTooNarrow {
        /// Output refcount width.
        bits: u32,
        /// Output cluster index.
        cluster: u64,
        /// References it needs.
        count: u64,
    },
    /// A table would exceed one of QEMU's limits.
    #[error("{0}")]
    Limit(String),
}

impl From<crate::block::Error> for CopyError {
    fn from(e: crate::block::Error) -> Self {
        CopyError::Source(e)
    }
}

/// Result of the copy.
pub type Result<T> = std::result::Result<T, CopyError>;

/// Output options (`qemu-img convert -O qcow2 -o …` and `-c`).
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Output cluster size.
    pub cluster_size: u32,
    /// Output refcount width.
    pub refcount_bits: u32,
    /// Output header version.
    pub compat: Compat,
    /// Extended L2 entries in the output.
    pub extended_l2: bool,
    /// zstd instead of zlib for compressed clusters.
    pub zstd: bool,
    /// Compress data clusters (`-c`); VM state stays uncompressed.
    pub compress: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V3,
            extended_l2: false,
            zstd: false,
            compress: false,
        }
    }
}

impl CopyOptions {
    /// Checks the combination as `qemu-img create` does.
    ///
    /// # Errors
    /// [`CopyError::Options`] naming the conflict.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(CopyError::Options(s.into()));
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.compat == Compat::V2 {
            if self.refcount_bits != 16 {
                return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
            if self.extended_l2 {
                return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.zstd {
                return bad("Compression type other than zlib requires compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
        }
        if self.extended_l2 && cs < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        Ok(())
    }
}

/// What the copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Snapshots written to the output table.
    pub snapshots: usize,
    /// Data clusters written (compressed ones included).
    pub data_clusters: u64,
    /// Output clusters reused by a later layer instead of being copied again.
    pub shared: u64,
    /// Output file length.
    pub file_len: u64,
}

/// Copies `src` (the layers `select` names) into `out` as a new qcow2 image.
/// `progress(done, total)` is called as guest bytes are walked.
///
/// `out` should be empty; on error it holds a partial image that the caller removes.
///
/// # Errors
/// Option conflicts, source read or metadata errors, output write errors, refcount width.
pub fn copy_image(
    src: &mut SourceImage<'_>,
    select: &Select,
    out: &dyn Storage,
    opts: &CopyOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyReport> {
    opts.validate()?;
    let layers = source::layers(src, select, opts)?;
    walk::copy_layers(src, &layers, out, opts, progress)
}
