//! Counting references: header, L1 tables (active and snapshots), the snapshot table and
//! the refcount structures, in QEMU's order (`calculate_refcounts`).

use std::collections::HashMap;

use super::super::entry::{entries_skipping_zero_blocks, L1Entry, L1_RESERVED, OFFSET_MASK};
use super::super::snapshot::Snapshot;
use super::super::snaptable::table_size;
use super::super::Qcow2;
use super::l2::L2Findings;
use super::refs::Refs;
use super::CheckReport;
use crate::block::Result;

/// The highest offset QEMU's block layer reads or writes (`BDRV_MAX_LENGTH`: `INT64_MAX`
/// aligned down to 1 GiB).
const BDRV_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// Reserved bits of a refcount table entry.
const REFT_RESERVED: u64 = 0x1ff;

/// State of the L2 part of a check: references per table, and tables already walked.
pub(super) struct L2Walk {
    /// L1 entries reaching the L2 table at each cluster of the file (only tables the walk
    /// enters are counted: cluster aligned and inside the file, so the index is in range).
    reach: Vec<u64>,
    /// Findings of the tables reached more than once, by offset.
    seen: HashMap<u64, L2Findings>,
}

impl L2Walk {
    /// How many L1 entries reach the table at `l2` (at least 1: the one asking).
    fn times(&self, l2: u64, cluster_bits: u32) -> u64 {
        if l2 % (1u64 << cluster_bits) != 0 {
            return 1;
        }
        let n = usize::try_from(l2 >> cluster_bits)
            .ok()
            .and_then(|i| self.reach.get(i))
            .copied()
            .unwrap_or(0);
        n.max(1)
    }
}

impl Qcow2 {
    /// Counts every reference; true when the refcount structure itself is damaged (QEMU
    /// would rebuild it).
    pub(super) fn compute_refs(
        &mut self,
        refs: &mut Refs,
        r: &mut CheckReport,
        file_len: u64,
    ) -> Result<bool> {
        let cs = self.layout.cluster_size();
        if let Err(m) = refs.inc(0, cs) {
            r.corruption(m);
        }
        let mut walk = L2Walk {
            reach: self.count_l2_references(refs, file_len),
            seen: HashMap::new(),
        };
        // Active layer, with allocation statistics.
        if let Err(m) = refs.inc(self.header.l1_table_offset, self.l1.len() as u64 * 8) {
            r.corruption(m);
        }
        let active = self.l1.clone();
        self.check_l1(&active, refs, r, &mut walk, true)?;
        // Snapshots.
        for i in 0..self.snapshots.len() {
            let Some(l1) = self.snapshot_l1_for_check(&self.snapshots[i], refs, Some(r), file_len)
            else {
                continue;
            };
            self.check_l1(&l1, refs, r, &mut walk, false)?;
        }
        // Snapshot table.
        let len = table_size(&self.snapshots, self.header.snapshots_offset);
        if let Err(m) = refs.inc(self.header.snapshots_offset, len) {
            r.corruption(m);
        }
        // Refcount table and blocks.
        let rt_bytes = u64::from(self.header.refcount_table_clusters) * cs;
        if let Err(m) = refs.inc(self.header.refcount_table_offset, rt_bytes) {
            r.corruption(m);
        }
        Ok(self.check_refblocks(refs, r, file_len))
    }

    /// QEMU's `check_refblocks`: true when the refcount table needs a rebuild.
    fn check_refblocks(&mut self, refs: &mut Refs, r: &mut CheckReport, file_len: u64) -> bool {
        let cs = self.layout.cluster_size();
        let mut rebuild = false;
        for (i, &e) in self.reftable.iter().enumerate() {
            let off = e & !REFT_RESERVED;
            if e & REFT_RESERVED != 0 {
                r.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                rebuild = true;
                continue;
            }
            if off % cs != 0 {
                r.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                rebuild = true;
                continue;
            }
            if off >> self.layout.cluster_bits >= file_len.div_ceil(cs) {
                r.corruption(format!("ERROR refcount block {i} is outside image"));
                rebuild = true;
                continue;
            }
            if off == 0 {
                continue;
            }
            if let Err(m) = refs.inc(off, cs) {
                r.corruption(m);
            }
            let n = refs.at(off);
            if n != 1 {
                r.corruption(format!("ERROR refcount block {i} refcount={n}"));
                rebuild = true;
            }
        }
        rebuild
    }

    /// A snapshot's L1 table if it can be walked. With a report, the entry's problems are
    /// reported and the table's own clusters get their reference (QEMU's order: the table is
    /// counted, then read; past the end of the file it reads as zeroes).
    fn snapshot_l1_for_check(
        &self,
        sn: &Snapshot,
        refs: &mut Refs,
        r: Option<&mut CheckReport>,
        file_len: u64,
    ) -> Option<Vec<u64>> {
        let cs = self.layout.cluster_size();
        if sn.has_l1_problem(cs) {
            if let (Some(r), Some(msg)) = (r, sn.l1_problem(cs)) {
                r.corruption(format!("ERROR {msg}"));
            }
            return None;
        }
        let bytes = u64::from(sn.l1_size) * 8;
        // QEMU reads no further than BDRV_MAX_LENGTH: a table beyond it is an I/O error,
        // which ends QEMU's check as failed (exit 1) after the reference was counted.
        let unreadable = bytes > 0
            && sn
                .l1_table_offset
                .checked_add(bytes)
                .map_or(true, |end| end > BDRV_MAX_LENGTH);
        if let Some(r) = r {
            if let Err(m) = refs.inc(sn.l1_table_offset, bytes) {
                r.corruption(m);
            }
            if unreadable {
                r.check_errors += 1;
                r.messages
                    .push("ERROR: I/O error in check_refcounts_l1".to_owned());
            }
        }
        if unreadable {
            return None;
        }
        // Within 32 MiB (checked above). Past the end of the file the table reads as zeroes,
        // and both walks (`count_l2_references`, `check_l1`) skip zero entries: only the
        // entries inside the file are read and walked.
        let inside = file_len
            .saturating_sub(sn.l1_table_offset)
            .div_ceil(8)
            .min(u64::from(sn.l1_size));
        if inside == 0 {
            // Nothing to read (an empty table, or one wholly past the end of the file).
            return Some(Vec::new());
        }
        super::super::read_table(&*self.storage, sn.l1_table_offset, inside).ok()
    }

    /// The L2 table an L1 entry leads the check into, if any (cluster aligned, and less
    /// than one cluster past the end of the file).
    fn walkable_l2(&self, raw: u64, refs: &Refs) -> Option<u64> {
        let cs = self.layout.cluster_size();
        let l2 = L1Entry(raw).l2_offset();
        (raw != 0 && l2 % cs == 0 && refs.fits(l2, cs)).then_some(l2)
    }

    /// How many L1 entries (active and of every snapshot the check will walk) reach each L2
    /// table, by cluster (see [`L2Walk::reach`]). A pre-pass over the L1 tables only.
    fn count_l2_references(&self, refs: &mut Refs, file_len: u64) -> Vec<u64> {
        let bits = self.layout.cluster_bits;
        let mut reach = vec![0u64; refs.counts.len()];
        let count = |reach: &mut Vec<u64>, l1: &[u64], refs: &Refs| {
            for (_, raw) in entries_skipping_zero_blocks(l1) {
                if let Some(l2) = self.walkable_l2(raw, refs) {
                    // A walkable table starts inside the file: always in range.
                    if let Some(n) = reach.get_mut((l2 >> bits) as usize) {
                        *n += 1;
                    }
                }
            }
        };
        count(&mut reach, &self.l1, refs);
        for sn in &self.snapshots {
            if let Some(l1) = self.snapshot_l1_for_check(sn, refs, None, file_len) {
                count(&mut reach, &l1, refs);
            }
        }
        reach
    }

    /// QEMU's `check_refcounts_l1` over the entries of one L1 table.
    fn check_l1(
        &mut self,
        l1: &[u64],
        refs: &mut Refs,
        r: &mut CheckReport,
        walk: &mut L2Walk,
        stats: bool,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        for (_, raw) in entries_skipping_zero_blocks(l1) {
            if raw == 0 {
                continue;
            }
            if raw & L1_RESERVED != 0 {
                r.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {raw:x}"
                ));
            }
            let l2 = raw & OFFSET_MASK;
            if let Err(m) = refs.inc(l2, cs) {
                r.corruption(m);
            }
            if l2 % cs != 0 {
                r.corruption(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                // QEMU still reads a table there and checks what it finds.
            }
            if !refs.fits(l2, cs) {
                continue;
            }
            // Only tables reached more than once are kept in `seen`.
            let times = walk.times(l2, self.layout.cluster_bits);
            if times > 1 {
                if let Some(f) = walk.seen.get(&l2) {
                    f.apply(r, stats);
                    continue;
                }
            }
            // First visit: every reference to this table counts its clusters now.
            let f = self.check_l2(l2, refs, times)?;
            f.apply(r, stats);
            if times > 1 {
                walk.seen.insert(l2, f);
            }
        }
        Ok(())
    }
}
