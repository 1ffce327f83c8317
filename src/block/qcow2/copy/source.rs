//! The source side of a tree copy: which layers are copied, where each of their regions goes
//! in the output, and what every output cluster is made of in source terms (its key).

use byteorder::{BigEndian, ByteOrder};

use super::super::entry::{subcluster_kind, ClusterKind, L2Entry, L1_RESERVED, OFFSET_MASK};
use super::super::layout::Layout;
use super::super::snapshot::Snapshot;
use super::super::Qcow2;
use super::{CopyError, CopyOptions, Result};
use crate::block::BlockDriver;

/// The image a copy reads.
#[derive(Debug)]
pub enum SourceImage<'a> {
    /// A qcow2 image: every layer can be copied, and sharing is seen in its tables.
    Qcow2(&'a mut Qcow2),
    /// Any other driver: its one layer is read as guest data.
    Plain(&'a mut dyn BlockDriver),
}

/// Which layers of the source are copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// The active layer and every snapshot (the default for qcow2 output).
    All,
    /// The active layer only (`--active-only`, what `qemu-img convert` does).
    Active,
    /// Every snapshot, with an empty active layer (block migration sends the active layer
    /// itself, as guest data, while the guest changes it).
    Snapshots,
    /// One snapshot, by id (`-l snapshot.id=ID`), becomes the active layer.
    SnapshotId(String),
    /// One snapshot, by name (`-l snapshot.name=TAG`), becomes the active layer.
    SnapshotName(String),
    /// One snapshot, by id first and then by name (`-l ID_OR_NAME`).
    SnapshotIdOrName(String),
}

impl Select {
    /// Parses the argument of `qemu-img convert -l`.
    pub fn parse_l(arg: &str) -> Select {
        if let Some(v) = arg.strip_prefix("snapshot.name=") {
            Select::SnapshotName(v.to_owned())
        } else if let Some(v) = arg.strip_prefix("snapshot.id=") {
            Select::SnapshotId(v.to_owned())
        } else {
            Select::SnapshotIdOrName(arg.to_owned())
        }
    }

    /// The snapshot `self` names among `list`, if it names one.
    ///
    /// # Errors
    /// [`CopyError::NoSuchSnapshot`].
    pub fn find<'a>(&self, list: &'a [Snapshot]) -> Result<Option<&'a Snapshot>> {
        let (found, what) = match self {
            Select::All | Select::Active | Select::Snapshots => return Ok(None),
            Select::SnapshotId(id) => (list.iter().find(|s| &s.id == id), id),
            Select::SnapshotName(n) => (list.iter().find(|s| &s.name == n), n),
            Select::SnapshotIdOrName(x) => (
                list.iter()
                    .find(|s| &s.id == x)
                    .or_else(|| list.iter().find(|s| &s.name == x)),
                x,
            ),
        };
        found
            .map(Some)
            .ok_or_else(|| CopyError::NoSuchSnapshot(what.clone()))
    }
}

/// A guest range of a source layer and where it goes in the output layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region {
    /// Source guest offset.
    pub src: u64,
    /// Output guest offset (aligned to an output L1 entry's range).
    pub out: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One layer to copy.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    /// The source L1 table (the active one copied; empty for a plain source).
    pub l1: Vec<u64>,
    /// Disk and, for snapshots, VM state.
    pub regions: Vec<Region>,
    /// The output snapshot entry (None: the output's active layer).
    pub entry: Option<Snapshot>,
    /// Virtual disk size of the layer.
    pub disk_size: u64,
}

/// The layers `select` names, active layer first, snapshots in table order.
pub(super) fn layers(
    src: &mut SourceImage<'_>,
    select: &Select,
    opts: &CopyOptions,
) -> Result<Vec<Layer>> {
    let q = match src {
        SourceImage::Plain(d) => {
            if !matches!(select, Select::All | Select::Active | Select::Snapshots) {
                return Err(CopyError::Options(format!(
                    "the {} format has no snapshots to select with -l",
                    d.format().name()
                )));
            }
            let size = d.size();
            return Ok(vec![Layer {
                l1: Vec::new(),
                regions: vec![Region {
                    src: 0,
                    out: 0,
                    len: size,
                }],
                entry: None,
                disk_size: size,
            }]);
        }
        SourceImage::Qcow2(q) => q,
    };
    let disk = |size: u64| Region {
        src: 0,
        out: 0,
        len: size,
    };
    if let Some(sn) = select.find(&q.snapshots)? {
        let sn = sn.clone();
        let l1 = q.read_snapshot_l1(&sn)?;
        return Ok(vec![Layer {
            l1,
            regions: vec![disk(sn.disk_size)],
            entry: None,
            disk_size: sn.disk_size,
        }]);
    }
    let size = q.header.size;
    let mut out = vec![Layer {
        l1: if *select == Select::Snapshots {
            Vec::new()
        } else {
            q.l1.clone()
        },
        regions: vec![disk(size)],
        entry: None,
        disk_size: size,
    }];
    if *select == Select::Active {
        return Ok(out);
    }
    let out_layout = Layout {
        cluster_bits: opts.cluster_size.trailing_zeros(),
        extended_l2: opts.extended_l2,
        refcount_order: opts.refcount_bits.trailing_zeros(),
    };
    let src_vm = q.vm_state_offset();
    let out_vm = out_layout.vm_state_offset(size);
    for sn in q.snapshots.clone() {
        let mut regions = vec![disk(sn.disk_size)];
        if sn.vm_state_size > 0 && (sn.disk_size > out_vm || sn.disk_size > src_vm) {
            return Err(CopyError::Snapshot {
                name: sn.name.clone(),
                reason: format!(
                    "its disk size {} reaches into the VM state area of the {}-byte image",
                    sn.disk_size, size
                ),
            });
        }
        let l1 = q.read_snapshot_l1(&sn)?;
        if sn.vm_state_size > 0 {
            // The vmstate area may hold more than the stream: vmsnap keeps lazy loadvm's
            // page index past it (formats/lazy-loadvm.md). Copy the area up to the end of
            // its last allocated L1 range; unallocated clusters cost nothing.
            let span = q.layout().bytes_per_l1_entry();
            let end = l1
                .iter()
                .rposition(|e| e & OFFSET_MASK != 0)
                .map_or(0, |i| (i as u64 + 1) * span);
            regions.push(Region {
                src: src_vm,
                out: out_vm,
                len: sn.vm_state_size.max(end.saturating_sub(src_vm)),
            });
        }
        out.push(Layer {
            l1,
            regions,
            disk_size: sn.disk_size,
            entry: Some(sn),
        });
    }
    Ok(out)
}

/// Where a piece of an output cluster comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Piece {
    /// Reads as zeroes.
    Zero,
    /// Unallocated with a backing file: the backing file's data at this guest offset.
    Backing(u64),
    /// Uncompressed data at this source host offset.
    Host(u64),
    /// Compressed cluster (L2 entry without COPIED), from this offset in its cluster.
    Compressed(u64, u64),
    /// Guest data of a plain source at this offset (never shared).
    Guest(u64),
}

/// What an output cluster is made of: pieces with their lengths, adjacent pieces merged, so
/// that the same source bytes give the same key in every layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct Key(pub Vec<(Piece, u64)>);

impl Key {
    fn push(&mut self, p: Piece, n: u64) {
        if let Some((last, len)) = self.0.last_mut() {
            let merged = match (*last, p) {
                (Piece::Zero, Piece::Zero) => true,
                (Piece::Backing(a), Piece::Backing(b))
                | (Piece::Host(a), Piece::Host(b))
                | (Piece::Guest(a), Piece::Guest(b)) => a + *len == b,
                (Piece::Compressed(e, a), Piece::Compressed(f, b)) => e == f && a + *len == b,
                _ => false,
            };
            if merged {
                *len += n;
                return;
            }
        }
        self.0.push((p, n));
    }

    /// True if every piece reads as zero.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|(p, _)| *p == Piece::Zero)
    }

    /// The source host offset if the key is one uncompressed run of `len` bytes.
    pub fn host_run(&self, len: u64) -> Option<u64> {
        match self.0.as_slice() {
            [(Piece::Host(h), n)] if *n == len => Some(*h),
            _ => None,
        }
    }
}

/// Reads the source: keys and contents of ranges of a layer.
#[derive(Debug)]
pub(super) struct Mapper<'a, 'b> {
    pub src: &'a mut SourceImage<'b>,
    /// The last L2 table read (offset, bytes).
    l2: Option<(u64, Vec<u8>)>,
}

impl<'a, 'b> Mapper<'a, 'b> {
    pub fn new(src: &'a mut SourceImage<'b>) -> Self {
        Self { src, l2: None }
    }

    /// True if `[src, src + len)` of `layer` certainly reads as zeroes without looking at
    /// any L2 table (no L2 tables mapped there, no backing file).
    pub fn range_is_empty(&self, layer: &Layer, src: u64, len: u64) -> bool {
        let SourceImage::Qcow2(q) = &*self.src else {
            return false;
        };
        if q.backing.is_some() {
            return false;
        }
        if len == 0 {
            return true;
        }
        let first = q.layout.l1_index(src);
        let last = q.layout.l1_index(src + len - 1);
        (first..=last).all(|i| {
            layer
                .l1
                .get(i as usize)
                .map_or(true, |e| e & OFFSET_MASK == 0)
        })
    }

    /// The key of `[src, src + len)` of `layer`.
    pub fn key(&mut self, layer: &Layer, src: u64, len: u64) -> Result<Key> {
        let mut key = Key::default();
        let SourceImage::Qcow2(q) = &mut *self.src else {
            key.push(Piece::Guest(src), len);
            return Ok(key);
        };
        let lay = q.layout;
        let backing = q.backing.is_some();
        let unalloc = |g: u64| {
            if backing {
                Piece::Backing(g)
            } else {
                Piece::Zero
            }
        };
        let end = src + len;
        let mut p = src;
        while p < end {
            let i1 = lay.l1_index(p) as usize;
            let raw = layer.l1.get(i1).copied().unwrap_or(0);
            if raw & L1_RESERVED != 0 {
                return Err(corrupt(format!(
                    "L1 entry {i1} has reserved bits set ({raw:#x})"
                )));
            }
            let l2 = raw & OFFSET_MASK;
            if l2 == 0 {
                let n = ((i1 as u64 + 1) * lay.bytes_per_l1_entry()).min(end) - p;
                key.push(unalloc(p), n);
                p += n;
                continue;
            }
            if !matches!(&self.l2, Some((o, _)) if *o == l2) {
                self.l2 = Some((l2, q.read_l2_table(l2)?));
            }
            let table = match &self.l2 {
                Some((_, t)) => t,
                None => return Err(corrupt("L2 table not loaded".into())),
            };
            let es = lay.l2_entry_size() as usize;
            let at = lay.l2_index(p) as usize * es;
            let e = L2Entry(BigEndian::read_u64(&table[at..]));
            let in_cl = lay.offset_in_cluster(p);
            let cl_end = (lay.cluster_start(p) + lay.cluster_size()).min(end);
            if lay.extended_l2 && !e.compressed() {
                let bm = BigEndian::read_u64(&table[at + 8..]);
                let unit = lay.subcluster_size();
                while p < cl_end {
                    let off = lay.offset_in_cluster(p);
                    let n = ((p / unit + 1) * unit).min(cl_end) - p;
                    let piece = match subcluster_kind(e, bm, (off / unit) as u32) {
                        ClusterKind::Normal => Piece::Host(e.offset() + off),
                        ClusterKind::Unallocated => unalloc(p),
                        _ => Piece::Zero,
                    };
                    key.push(piece, n);
                    p += n;
                }
                continue;
            }
            let n = cl_end - p;
            let piece = match e.kind(false) {
                ClusterKind::Unallocated => unalloc(p),
                ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc => Piece::Zero,
                ClusterKind::Normal => Piece::Host(e.offset() + in_cl),
                ClusterKind::Compressed => {
                    Piece::Compressed(e.0 & !super::super::entry::OFLAG_COPIED, in_cl)
                }
            };
            key.push(piece, n);
            p += n;
        }
        Ok(key)
    }

    /// Reads `buf.len()` guest bytes of `layer` at `src`.
    pub fn read(&mut self, layer: &Layer, src: u64, buf: &mut [u8]) -> Result<()> {
        match &mut *self.src {
            SourceImage::Qcow2(q) => q.read_guest(Some(&layer.l1), src, buf)?,
            SourceImage::Plain(d) => d.read_at(src, buf)?,
        }
        Ok(())
    }

    /// Reads source host bytes (a key's [`Key::host_run`]).
    pub fn read_host(&mut self, host: u64, buf: &mut [u8]) -> Result<()> {
        match &mut *self.src {
            SourceImage::Qcow2(q) => q.sread(host, buf)?,
            SourceImage::Plain(_) => {
                return Err(corrupt("host read from a plain source".into()));
            }
        }
        Ok(())
    }
}

fn corrupt(msg: String) -> CopyError {
    CopyError::Source(super::super::corrupt(msg))
}
