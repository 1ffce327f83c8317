//! Overlap checks before every write (QEMU `qcow2_check_metadata_overlap`).
//!
//! Every write the driver sends to storage, guest data and metadata alike, is first compared
//! with the metadata clusters the driver knows of, by category:
//!
//! ```text
//!  bit 0 qcow2_header       cluster 0
//!  bit 1 active L1 table    header.l1_table_offset, l1_size * 8 bytes
//!  bit 2 active L2 table    every active L1 entry's L2 offset, one cluster each
//!  bit 3 refcount table     header.refcount_table_offset, refcount_table_clusters
//!  bit 4 refcount block     every refcount table entry, one cluster each
//!  bit 5 snapshot table     header.snapshots_offset, the table's length
//!  bit 6 inactive L1 table  every snapshot's l1_table_offset, l1_size * 8 bytes
//!  bit 7 inactive L2 table  every snapshot L1 entry's L2 offset, one cluster each
//! ```
//!
//! A write names the categories it may legitimately touch (an L2 table update touches
//! "active L2 table", a guest data write touches none); a hit on any other category refuses
//! the write before its first byte goes out, with QEMU's message ("Preventing invalid write
//! on metadata (overlaps with refcount block)"). Allocation checks the clusters it is about
//! to hand out the same way, so damaged refcounts (a refcount of 0 on a table in use) are
//! refused before the refcount write that would claim them.
//!
//! Cost: QEMU's default "cached" mode scans its in-memory tables on every write and leaves
//! out inactive L2 tables (they need disk reads). Here the categories live in one ordered
//! map of host clusters, built from the tables in memory the first time a write needs it and
//! rebuilt only after a table itself changes (L1 entry, refcount table entry, snapshot
//! table): a check is one range lookup. The inactive L2 part needs the snapshots' L1 tables
//! from disk, so it is kept apart and rebuilt only when the snapshot table changes; with it
//! the checks cover what QEMU's `overlap-check=all` covers.
//!
//! After a refusal the open image takes no more writes (QEMU marks the image corrupt and
//! stops using it). Unlike QEMU, the corrupt bit is not written: the rule here is that a
//! refused operation leaves the file's bytes as they were; the damage predates the write
//! and `vmsnap check` reports it.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::entry::{entries_skipping_zero_blocks, L1Entry, REFT_OFFSET_MASK};
use super::layout::MAX_L1_BYTES;
use super::{Qcow2, Qcow2Error};
use crate::block::Result;

/// Overlap categories (QEMU's `QCOW2_OL_*` bits).
pub(crate) mod ol {
    /// Cluster 0, the image header.
    pub const MAIN_HEADER: u8 = 1 << 0;
    /// The active L1 table.
    pub const ACTIVE_L1: u8 = 1 << 1;
    /// L2 tables the active L1 table points to.
    pub const ACTIVE_L2: u8 = 1 << 2;
    /// The refcount table.
    pub const REFCOUNT_TABLE: u8 = 1 << 3;
    /// Refcount blocks.
    pub const REFCOUNT_BLOCK: u8 = 1 << 4;
    /// The snapshot table.
    pub const SNAPSHOT_TABLE: u8 = 1 << 5;
    /// The snapshots' L1 tables.
    pub const INACTIVE_L1: u8 = 1 << 6;
    /// L2 tables the snapshots' L1 tables point to.
    pub const INACTIVE_L2: u8 = 1 << 7;
    /// Guest data: may overlap no metadata.
    pub const DATA: u8 = 0;
}

/// QEMU's name of the lowest category set in `bits` (its `metadata_ol_names`).
pub(crate) fn category_name(bits: u8) -> &'static str {
    match bits.trailing_zeros() {
        0 => "qcow2_header",
        1 => "active L1 table",
        2 => "active L2 table",
        3 => "refcount table",
        4 => "refcount block",
        5 => "snapshot table",
        6 => "inactive L1 table",
        _ => "inactive L2 table",
    }
}

/// Host clusters holding metadata, each with its categories.
#[derive(Debug, Default, Clone)]
pub(crate) struct MetaMap(BTreeMap<u64, u8>);

impl MetaMap {
    /// Marks `n` clusters from `first` as holding `bits`.
    pub(crate) fn add(&mut self, first: u64, n: u64, bits: u8) {
        for c in first..first.saturating_add(n) {
            *self.0.entry(c).or_default() |= bits;
        }
    }

    /// The first cluster of `[first, first + n)` holding a category outside `ign`.
    pub(crate) fn hit(&self, first: u64, n: u64, ign: u8) -> Option<(u64, u8)> {
        self.0
            .range(first..first.saturating_add(n))
            .map(|(&c, &b)| (c, b & !ign))
            .find(|&(_, b)| b != 0)
    }
}

/// The three parts of the map; `None` means "rebuild before the next check".
#[derive(Debug, Default)]
pub(crate) struct OverlapState {
    active: Option<MetaMap>,
    /// The snapshot table and the snapshots' L1 tables: they change only with the snapshot
    /// table, not with every active table the way `active` does.
    snapshots: Option<MetaMap>,
    inactive_l2: Option<MetaMap>,
    /// Set by a refusal: the open image takes no more writes.
    refused: Option<String>,
}

impl Qcow2 {
    fn overlap_state(&self) -> MutexGuard<'_, OverlapState> {
        // A panic while the lock was held cannot leave the maps half-built in a way that
        // matters: they are rebuilt from the tables.
        self.overlap.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            g.active = None;
            g.snapshots = None;
            g.inactive_l2 = None;
            g
        })
    }

    /// The tables in memory changed (active L1, refcount table, header). A change of the
    /// snapshot list or of the snapshot table's place is [`Qcow2::snapshots_changed`].
    pub(crate) fn tables_changed(&self) {
        self.overlap_state().active = None;
    }

    /// The snapshot table changed: its L1 tables (and their L2 tables) may be others.
    pub(crate) fn snapshots_changed(&self) {
        let mut s = self.overlap_state();
        s.active = None;
        s.snapshots = None;
        s.inactive_l2 = None;
    }

    /// Refuses further writes when an earlier write of this session was refused.
    pub(crate) fn not_refused(&self) -> Result<()> {
        match &self.overlap_state().refused {
            Some(why) => Err(Qcow2Error::Corrupt(format!(
                "no more writes to this image after an earlier refusal ({why}); run 'vmsnap \
                 check -r all'"
            ))
            .into()),
            None => Ok(()),
        }
    }

    /// Checks that a write of `len` bytes at host `offset` touches no metadata outside `ign`
    /// (QEMU `qcow2_pre_write_overlap_check`); a refusal stops further writes.
    pub(crate) fn overlap_check(&self, ign: u8, offset: u64, len: u64) -> Result<()> {
        let Some((cluster, what)) = self.overlap_hit(ign, offset, len) else {
            return Ok(());
        };
        self.overlap_state().refused = Some(format!("overlap with {what}"));
        Err(Qcow2Error::MetadataOverlap {
            what,
            offset,
            len,
            cluster,
        }
        .into())
    }

    /// The first metadata cluster (host offset, QEMU's name of its structure) that
    /// `[offset, offset + len)` touches outside the categories in `ign`.
    pub(crate) fn overlap_hit(
        &self,
        ign: u8,
        offset: u64,
        len: u64,
    ) -> Option<(u64, &'static str)> {
        if len == 0 {
            return None;
        }
        let cb = self.layout.cluster_bits;
        let first = offset >> cb;
        let n = (offset.saturating_add(len - 1) >> cb) - first + 1;
        let s = self.built_state();
        // A cluster in several parts holds each part's categories: the lowest category of
        // the first cluster hit is the lowest of the parts' first hits at that cluster.
        [&s.active, &s.snapshots, &s.inactive_l2]
            .into_iter()
            .filter_map(|m| m.as_ref().and_then(|m| m.hit(first, n, ign)))
            .min_by_key(|&(c, b)| (c, b.trailing_zeros()))
            .map(|(c, b)| (c << cb, category_name(b)))
    }

    /// The state with every part of the map built.
    fn built_state(&self) -> MutexGuard<'_, OverlapState> {
        let mut s = self.overlap_state();
        if s.active.is_none() {
            s.active = Some(self.build_active_map());
        }
        if s.snapshots.is_none() {
            s.snapshots = Some(self.build_snapshots_map());
        }
        if s.inactive_l2.is_none() {
            s.inactive_l2 = Some(self.build_inactive_l2_map());
        }
        s
    }

    /// The whole map as it stands (every part in one), for many checks in a row without
    /// taking the lock for each.
    pub(crate) fn metadata_map(&self) -> MetaMap {
        let s = self.built_state();
        let mut m = s.active.clone().unwrap_or_default();
        let rest = [&s.snapshots, &s.inactive_l2];
        for (&c, &b) in rest.into_iter().flatten().flat_map(|m| m.0.iter()) {
            *m.0.entry(c).or_default() |= b;
        }
        m
    }

    /// Header, active L1 and L2, refcount table and blocks: from the tables in memory.
    fn build_active_map(&self) -> MetaMap {
        let cs = self.layout.cluster_size();
        let cb = self.layout.cluster_bits;
        let h = &self.header;
        let clusters = |bytes: u64| bytes.div_ceil(cs);
        let mut m = MetaMap::default();
        m.add(0, 1, ol::MAIN_HEADER);
        if !self.l1.is_empty() {
            m.add(
                h.l1_table_offset >> cb,
                clusters(self.l1.len() as u64 * 8),
                ol::ACTIVE_L1,
            );
        }
        for (_, e) in entries_skipping_zero_blocks(&self.l1) {
            let l2 = L1Entry(e).l2_offset();
            if l2 != 0 {
                m.add(l2 >> cb, 1, ol::ACTIVE_L2);
            }
        }
        m.add(
            h.refcount_table_offset >> cb,
            u64::from(h.refcount_table_clusters),
            ol::REFCOUNT_TABLE,
        );
        for (_, e) in entries_skipping_zero_blocks(&self.reftable) {
            let rb = e & REFT_OFFSET_MASK;
            if rb != 0 {
                m.add(rb >> cb, 1, ol::REFCOUNT_BLOCK);
            }
        }
        m
    }

    /// The snapshot table and the snapshots' L1 tables: from the snapshot list in memory.
    fn build_snapshots_map(&self) -> MetaMap {
        let cs = self.layout.cluster_size();
        let cb = self.layout.cluster_bits;
        let h = &self.header;
        let clusters = |bytes: u64| bytes.div_ceil(cs);
        let mut m = MetaMap::default();
        let table_len: u64 = self.snapshots.iter().map(|s| s.entry_len).sum();
        if h.snapshots_offset != 0 && table_len > 0 {
            m.add(
                h.snapshots_offset >> cb,
                clusters(table_len + (h.snapshots_offset & (cs - 1))),
                ol::SNAPSHOT_TABLE,
            );
        }
        // As QEMU counts them: a table at offset 0 (over the header) too, and an unaligned
        // one over every cluster its bytes touch.
        for sn in &self.snapshots {
            let bytes = u64::from(sn.l1_size) * 8;
            if bytes > 0 && bytes <= MAX_L1_BYTES {
                let off = sn.l1_table_offset;
                m.add(
                    off >> cb,
                    clusters(bytes + (off & (cs - 1))),
                    ol::INACTIVE_L1,
                );
            }
        }
        m
    }

    /// The L2 tables of every snapshot whose L1 table can be read (a damaged one is skipped:
    /// the tables it would name are unknown, as they are to QEMU).
    fn build_inactive_l2_map(&self) -> MetaMap {
        let cb = self.layout.cluster_bits;
        let mut m = MetaMap::default();
        for sn in &self.snapshots {
            let Ok(l1) = self.read_snapshot_l1(sn) else {
                continue;
            };
            for (_, e) in entries_skipping_zero_blocks(&l1) {
                let l2 = L1Entry(e).l2_offset();
                if l2 != 0 {
                    m.add(l2 >> cb, 1, ol::INACTIVE_L2);
                }
            }
        }
        m
    }
}

/// A fresh lock-protected state for a newly opened image.
pub(crate) fn new_state() -> Mutex<OverlapState> {
    Mutex::new(OverlapState::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_reports_first_cluster_outside_ignored_categories() {
        let mut m = MetaMap::default();
        m.add(0, 1, ol::MAIN_HEADER);
        m.add(3, 2, ol::ACTIVE_L1);
        m.add(4, 1, ol::ACTIVE_L2);
        assert_eq!(m.hit(1, 2, ol::DATA), None);
        assert_eq!(m.hit(2, 4, ol::DATA), Some((3, ol::ACTIVE_L1)));
        assert_eq!(m.hit(3, 2, ol::ACTIVE_L1), Some((4, ol::ACTIVE_L2)));
        assert_eq!(m.hit(3, 2, ol::ACTIVE_L1 | ol::ACTIVE_L2), None);
        assert_eq!(m.hit(u64::MAX - 1, 5, ol::DATA), None);
    }

    #[test]
    fn names_follow_qemu() {
        assert_eq!(category_name(ol::REFCOUNT_BLOCK), "refcount block");
        assert_eq!(
            category_name(ol::ACTIVE_L1 | ol::ACTIVE_L2),
            "active L1 table"
        );
        assert_eq!(category_name(ol::INACTIVE_L2), "inactive L2 table");
        assert_eq!(category_name(ol::MAIN_HEADER), "qcow2_header");
    }
}
