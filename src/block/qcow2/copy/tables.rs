//! The output metadata: L2 tables deduplicated by content, L1 tables, the snapshot table,
//! refcounts counted as QEMU's `check` counts them, COPIED flags, and the header.
//!
//! Layout after the data area: L2 tables, L1 tables (active first), snapshot table,
//! refcount table, refcount blocks. The header (cluster 0) is written last.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use byteorder::{BigEndian, ByteOrder};

use super::super::entry::{L2Entry, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::super::header::{self, Header, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2};
use super::super::layout::{Layout, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOT_TABLE_BYTES};
use super::super::refcount::set_in_block;
use super::super::snapshot::Snapshot;
use super::super::Compat;
use super::writer::write_sparse;
use super::{CopyError, CopyOptions, Result};
use crate::block::storage::Storage;

/// Output L2 tables, each stored once however many L1 entries point to it.
#[derive(Debug, Default)]
pub(super) struct L2Store {
    /// Table contents (one cluster each).
    pub tables: Vec<Vec<u8>>,
    /// L1 entries pointing to each table (its refcount).
    pub refs: Vec<u64>,
    index: HashMap<u64, Vec<usize>>,
}

impl L2Store {
    /// Stores a table (or finds the same one) for one more L1 entry; returns its index.
    pub fn insert(&mut self, table: Vec<u8>) -> usize {
        let mut h = DefaultHasher::new();
        table.hash(&mut h);
        let bucket = self.index.entry(h.finish()).or_default();
        if let Some(&i) = bucket.iter().find(|&&i| self.tables[i] == table) {
            self.refs[i] += 1;
            return i;
        }
        bucket.push(self.tables.len());
        self.tables.push(table);
        self.refs.push(1);
        self.tables.len() - 1
    }
}

/// One output layer: its L1 table (indices into the [`L2Store`]) and snapshot entry.
#[derive(Debug)]
pub(super) struct OutLayer {
    /// L1 entries.
    pub l1: Vec<Option<usize>>,
    /// Snapshot entry (its L1 fields are filled in here); None for the active layer.
    pub entry: Option<Snapshot>,
}

/// Writes everything after the data area (which ends at the cluster-aligned `data_end`) and
/// the header; returns the file length.
pub(super) fn write_tail(
    out: &dyn Storage,
    opts: &CopyOptions,
    layout: Layout,
    size: u64,
    data_end: u64,
    store: &mut L2Store,
    layers: &mut [OutLayer],
) -> Result<u64> {
    let cs = layout.cluster_size();
    let mut next = data_end / cs;
    // Placement.
    let l2_first = next;
    next += store.tables.len() as u64;
    let mut l1_offsets = Vec::with_capacity(layers.len());
    for l in layers.iter() {
        let bytes = l.l1.len() as u64 * 8;
        if bytes > MAX_L1_BYTES {
            return Err(CopyError::Limit(format!(
                "an L1 table of {} entries exceeds QEMU's 32 MiB limit",
                l.l1.len()
            )));
        }
        l1_offsets.push(if bytes > 0 { next * cs } else { 0 });
        next += layout.clusters_for(bytes);
    }
    let mut snap_table = Vec::new();
    let mut nb_snapshots = 0u32;
    for (l, &off) in layers.iter_mut().zip(&l1_offsets) {
        if let Some(sn) = l.entry.as_mut() {
            sn.l1_table_offset = off;
            sn.l1_size = l.l1.len() as u32;
            sn.encode(&mut snap_table);
            nb_snapshots += 1;
        }
    }
    if snap_table.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(CopyError::Limit(
            "the snapshot table would exceed QEMU's 64 MiB limit".into(),
        ));
    }
    let snap_off = if snap_table.is_empty() { 0 } else { next * cs };
    next += layout.clusters_for(snap_table.len() as u64);
    // Refcount structures cover everything including themselves.
    let per_block = layout.refblock_entries();
    let (mut rt, mut rb) = (0u64, 0u64);
    loop {
        let rb2 = (next + rt + rb).div_ceil(per_block);
        let rt2 = layout.clusters_for(rb2 * 8);
        if (rt2, rb2) == (rt, rb) {
            break;
        }
        (rt, rb) = (rt2, rb2);
    }
    if rt * cs > MAX_REFTABLE_BYTES.max(cs) {
        return Err(CopyError::Limit(
            "the refcount table would exceed QEMU's 8 MiB limit".into(),
        ));
    }
    let rt_first = next;
    let total = next + rt + rb;
    // Counting.
    let mut counts = vec![0u64; total as usize];
    counts[0] = 1;
    let shift = layout.csize_shift();
    for (t, &r) in store.tables.iter().zip(&store.refs) {
        for_each_entry(t, layout, |e, _| {
            if e.compressed() {
                let (start, end) = e.compressed_range(shift);
                for c in layout.cluster_index(start)..=layout.cluster_index(end - 1) {
                    counts[c as usize] += r;
                }
            } else if e.offset() != 0 {
                counts[layout.cluster_index(e.offset()) as usize] += r;
            }
        });
    }
    for (i, &r) in store.refs.iter().enumerate() {
        counts[(l2_first + i as u64) as usize] = r;
    }
    for c in &mut counts[(l2_first + store.tables.len() as u64) as usize..] {
        *c = 1;
    }
    let max = layout.max_refcount();
    if let Some((i, &c)) = counts.iter().enumerate().find(|(_, &c)| c > max) {
        return Err(CopyError::RefcountTooNarrow {
            bits: layout.refcount_bits(),
            cluster: i as u64,
            count: c,
        });
    }
    // COPIED: in the active L1 for tables only it uses, and in those tables for clusters
    // only they reference.
    let active = layers.iter().position(|l| l.entry.is_none());
    if let Some(a) = active {
        let used: Vec<usize> = layers[a].l1.iter().flatten().copied().collect();
        for t in used {
            if store.refs[t] == 1 {
                let table = &mut store.tables[t];
                let es = layout.l2_entry_size() as usize;
                for p in (0..table.len()).step_by(es) {
                    let e = L2Entry(BigEndian::read_u64(&table[p..]));
                    if !e.compressed()
                        && e.offset() != 0
                        && counts[layout.cluster_index(e.offset()) as usize] == 1
                    {
                        BigEndian::write_u64(&mut table[p..], e.0 | OFLAG_COPIED);
                    }
                }
            }
        }
    }
    // Writing: L2 tables, L1 tables, snapshot table, refcount table and blocks.
    let w = |off: u64, b: &[u8]| write_sparse(out, off, b);
    let mut batch = Vec::with_capacity((8 << 20).min(store.tables.len() * cs as usize));
    let mut batch_at = l2_first * cs;
    for t in &store.tables {
        batch.extend_from_slice(t);
        if batch.len() >= 8 << 20 {
            w(batch_at, &batch)?;
            batch_at += batch.len() as u64;
            batch.clear();
        }
    }
    w(batch_at, &batch)?;
    for (l, &off) in layers.iter().zip(&l1_offsets) {
        if off == 0 {
            continue;
        }
        let is_active = l.entry.is_none();
        let mut raw = vec![0u8; (layout.clusters_for(l.l1.len() as u64 * 8) * cs) as usize];
        for (i, e) in l.l1.iter().enumerate() {
            if let Some(t) = e {
                let l2_off = (l2_first + *t as u64) * cs;
                let copied = is_active && store.refs[*t] == 1;
                let v = l2_off | if copied { OFLAG_COPIED } else { 0 };
                BigEndian::write_u64(&mut raw[i * 8..], v);
            }
        }
        w(off, &raw)?;
    }
    if snap_off != 0 {
        snap_table.resize(
            (layout.clusters_for(snap_table.len() as u64) * cs) as usize,
            0,
        );
        w(snap_off, &snap_table)?;
    }
    let mut reftable = vec![0u8; (rt * cs) as usize];
    let mut block = vec![0u8; cs as usize];
    for b in 0..rb {
        block.fill(0);
        let first = b * per_block;
        for (i, &c) in counts
            .iter()
            .skip(first as usize)
            .take(per_block as usize)
            .enumerate()
        {
            if c != 0 {
                set_in_block(&mut block, i, layout.refcount_order, c);
            }
        }
        let at = (rt_first + rt + b) * cs;
        BigEndian::write_u64(&mut reftable[b as usize * 8..], at);
        w(at, &block)?;
    }
    w(rt_first * cs, &reftable)?;
    // Header last.
    let active_l1 = active.map(|a| (layers[a].l1.len(), l1_offsets[a]));
    let (l1_size, l1_off) = active_l1.unwrap_or((0, 0));
    let v3 = opts.compat == Compat::V3;
    let mut incompat = 0;
    if opts.extended_l2 {
        incompat |= INCOMPAT_EXTL2;
    }
    if opts.zstd {
        incompat |= INCOMPAT_COMPRESSION;
    }
    let h = Header {
        version: if v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: layout.cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_first * cs,
        refcount_table_clusters: rt as u32,
        nb_snapshots,
        snapshots_offset: snap_off,
        incompatible_features: incompat,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: layout.refcount_order,
        header_length: if v3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: u8::from(opts.zstd),
        extensions: if v3 {
            vec![header::default_feature_table()]
        } else {
            Vec::new()
        },
        backing_file: None,
    };
    let end = total * cs;
    out.set_len(end).map_err(|source| CopyError::Write {
        offset: end,
        source,
    })?;
    w(0, &h.to_bytes(cs as usize))?;
    Ok(end)
}

/// Calls `f` with every non-empty entry (and its bitmap) of an output L2 table.
fn for_each_entry(table: &[u8], layout: Layout, mut f: impl FnMut(L2Entry, u64)) {
    let es = layout.l2_entry_size() as usize;
    for p in (0..table.len()).step_by(es) {
        let e = BigEndian::read_u64(&table[p..]);
        if e != 0 {
            let bm = if es == 16 {
                BigEndian::read_u64(&table[p + 8..])
            } else {
                0
            };
            f(L2Entry(e), bm);
        }
    }
}

/// Whether an entry value is a compressed-cluster descriptor.
pub(super) fn is_compressed(entry: u64) -> bool {
    entry & OFLAG_COMPRESSED != 0
}
