//! Validation before the first write of a snapshot operation.
//!
//! Snapshot create, goto and delete change refcounts of everything a table reaches and then
//! COPIED flags computed from them. On damaged metadata that can make things worse: an L2
//! entry far past the end of the file grows the refcount table to count it, a cluster whose
//! stored refcount is below its references is freed while still in use (and overwritten by
//! the next allocation), or gets COPIED while shared (and a guest write goes in place into
//! a snapshot). So before anything is written, the tables the operation walks are checked:
//!
//! - every L1 entry: no reserved bits, L2 table cluster aligned, inside the file, and not
//!   over other metadata (overlap categories of [`super::overlap`]);
//! - every allocated L2 entry: cluster aligned, inside the file, not over metadata;
//! - refcount sanity: for each cluster the walked tables reach, its stored refcount must be
//!   at least the number of references all tables (active and every snapshot) hold, counted
//!   as `qemu-img check` counts them (one per L1 entry for an L2 table, one per L1 path for
//!   a data cluster); an increment must fit the refcount width.
//!
//! A failure is [`Qcow2Error::Refused`] naming the table, entry or cluster; nothing is
//! written. The walk reads the same L2 tables the operation then reads (through the cache),
//! plus the L2 tables only other snapshots hold.

use std::collections::HashMap;

use super::entry::{ClusterKind, L1Entry, L2Entry, L1_RESERVED};
use super::header::INCOMPAT_DIRTY;
use super::overlap::ol;
use super::{Qcow2, Qcow2Error};
use crate::block::{Error, Result};

/// The tables an operation walks.
#[derive(Clone, Copy)]
pub(crate) enum Walked<'a> {
    /// Snapshot create: the active table gets +1.
    Create,
    /// Goto: the snapshot's table gets +1, the active one −1.
    Goto(&'a [u64]),
    /// Delete of snapshot `idx`: its table gets −1.
    Delete(usize, &'a [u64]),
}

fn refused(msg: String) -> Error {
    Qcow2Error::Refused(msg).into()
}

/// References per host cluster.
type Counts = HashMap<u64, u64>;

impl Qcow2 {
    /// [`Qcow2::preflight`] around the repair of a dirty (lazy-refcounts) image: the tables
    /// are checked before the repair writes anything, the refcounts (stale before it, exact
    /// after it) once it is done.
    pub(crate) fn preflight_repairing(&mut self, w: Walked<'_>) -> Result<()> {
        self.preflight(w)?;
        if self.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            self.repair_if_dirty()?;
            self.preflight(w)?;
        }
        Ok(())
    }

    /// Checks the tables `w` walks and the refcounts it changes; writes nothing. On a dirty
    /// image the stored refcounts are not up to date, and only the tables are checked.
    pub(crate) fn preflight(&mut self, w: Walked<'_>) -> Result<()> {
        let file_len = self.storage.len().map_err(|e| Error::io("image size", e))?;
        let active = self.l1.clone();
        // The walked tables, validated entry by entry, with their own path counts.
        let mut walked = Counts::new();
        let mut inc = Counts::new();
        match w {
            Walked::Create => {
                self.count_table(&active, "the active L1 table", file_len, &mut walked)?;
                inc.clone_from(&walked);
            }
            Walked::Goto(sn) => {
                self.count_table(sn, "the snapshot's L1 table", file_len, &mut inc)?;
                self.count_table(&active, "the active L1 table", file_len, &mut walked)?;
                for (&c, &n) in &inc {
                    *walked.entry(c).or_default() += n;
                }
            }
            Walked::Delete(_, sn) => {
                self.count_table(sn, "the snapshot's L1 table", file_len, &mut walked)?;
            }
        }
        if self.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            return Ok(());
        }
        // References held by every table (damaged other tables count what can be read).
        let mut l1s = vec![active];
        for i in 0..self.snapshots.len() {
            let sn = self.snapshots[i].clone();
            if let Ok(l1) = self.read_snapshot_l1(&sn) {
                l1s.push(l1);
            }
        }
        let all = self.count_all(&l1s, file_len)?;
        let max = self.layout.max_refcount();
        let mut clusters: Vec<u64> = walked.keys().copied().collect();
        clusters.sort_unstable();
        let cb = self.layout.cluster_bits;
        for c in clusters {
            let rc = self.get_refcount(c)?;
            let refs = all.get(&c).copied().unwrap_or(0);
            if rc < refs {
                let what = match w {
                    Walked::Create => "creating a snapshot would mark it as unshared",
                    Walked::Goto(_) => "reverting would free it or mark it unshared while in use",
                    Walked::Delete(..) => {
                        "deleting the snapshot would free it or mark it unshared while in use"
                    }
                };
                return Err(refused(format!(
                    "the cluster at host offset {:#x} has refcount {rc} but {refs} references; {what}",
                    c << cb
                )));
            }
            let add = inc.get(&c).copied().unwrap_or(0);
            if rc.checked_add(add).map_or(true, |v| v > max) {
                return Err(Qcow2Error::RefcountOverflow {
                    cluster: c,
                    bits: self.layout.refcount_bits(),
                }
                .into());
            }
        }
        if let Walked::Delete(idx, _) = w {
            let sn = self.snapshots[idx].clone();
            let first = sn.l1_table_offset >> cb;
            let n = (u64::from(sn.l1_size) * 8).div_ceil(self.layout.cluster_size());
            for c in first..first + n {
                if all.contains_key(&c) || self.get_refcount(c)? == 0 {
                    return Err(refused(format!(
                        "the L1 table of snapshot '{}' at {:#x} is also used elsewhere or \
                         already free",
                        sn.name, sn.l1_table_offset
                    )));
                }
            }
        }
        Ok(())
    }

    /// Before the refcount repair of a dirty (lazy-refcounts) image: the repair rewrites
    /// counts inside the existing refcount blocks, so every block the table names must be a
    /// sound cluster of its own (QEMU refuses such an image too).
    pub(crate) fn preflight_dirty_repair(&mut self) -> Result<()> {
        let file_len = self.storage.len().map_err(|e| Error::io("image size", e))?;
        let cs = self.layout.cluster_size();
        for (i, &e) in self.reftable.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let off = e & super::entry::OFFSET_MASK;
            let why = if off != e || off % cs != 0 {
                Some(format!("offset {e:#x} is not cluster aligned"))
            } else {
                self.check_cluster(off, cs, ol::REFCOUNT_BLOCK, file_len)
                    .err()
            };
            if let Some(why) = why {
                return Err(refused(format!(
                    "the image is dirty (lazy refcounts) and cannot be repaired automatically: \
                     refcount block {i} {why}"
                )));
            }
        }
        Ok(())
    }

    /// Validates one L1 table and its L2 tables, adding their references to `counts`.
    fn count_table(
        &mut self,
        l1: &[u64],
        table: &str,
        file_len: u64,
        counts: &mut Counts,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        for (i, &raw) in l1.iter().enumerate() {
            if raw & L1_RESERVED != 0 {
                return Err(refused(format!(
                    "entry {i} of {table} has reserved bits set ({raw:#x})"
                )));
            }
            let l2 = L1Entry(raw).l2_offset();
            if l2 == 0 {
                continue;
            }
            self.check_cluster(l2, cs, ol::ACTIVE_L2 | ol::INACTIVE_L2, file_len)
                .map_err(|why| refused(format!("entry {i} of {table}: L2 table {why}")))?;
            *counts.entry(l2 / cs).or_default() += 1;
            let t = self.read_l2_table(l2)?;
            let es = self.layout.l2_entry_size() as usize;
            for (j, p) in (0..t.len()).step_by(es).enumerate() {
                let e = L2Entry(u64::from_be_bytes(
                    t[p..p + 8].try_into().unwrap_or_default(),
                ));
                match e.kind(self.layout.extended_l2) {
                    ClusterKind::Normal | ClusterKind::ZeroAlloc => {
                        self.check_cluster(e.offset(), cs, ol::DATA, file_len)
                            .map_err(|why| {
                                refused(format!(
                                    "entry {j} of the L2 table at {l2:#x} (reached from {table}): \
                                     data cluster {why}"
                                ))
                            })?;
                        *counts.entry(e.offset() / cs).or_default() += 1;
                    }
                    ClusterKind::Compressed => {
                        let (s, end) = e.compressed_range(self.layout.csize_shift());
                        // The descriptor counts whole sectors; the last may end past EOF.
                        if s >= file_len {
                            return Err(refused(format!(
                                "entry {j} of the L2 table at {l2:#x} (reached from {table}): \
                                 compressed data at {s:#x} lies beyond the end of the file \
                                 ({file_len:#x})"
                            )));
                        }
                        for c in (s & !511) / cs..=(end - 1) / cs {
                            *counts.entry(c).or_default() += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The references all of `l1s` hold, as `qemu-img check` counts them. Each distinct L2
    /// table is read once and its entries counted once per L1 entry naming it (snapshots
    /// mostly share their L2 tables). Entries that cannot be valid are skipped: `check`
    /// reports them, and the operation does not touch them.
    fn count_all(&mut self, l1s: &[Vec<u64>], file_len: u64) -> Result<Counts> {
        let cs = self.layout.cluster_size();
        let mut tables: HashMap<u64, u64> = HashMap::new();
        for l1 in l1s {
            for &raw in l1 {
                let l2 = L1Entry(raw).l2_offset();
                if l2 != 0 && raw & L1_RESERVED == 0 && l2 % cs == 0 && l2 + cs <= file_len {
                    *tables.entry(l2).or_default() += 1;
                }
            }
        }
        let mut order: Vec<(u64, u64)> = tables.into_iter().collect();
        order.sort_unstable();
        let mut counts = Counts::new();
        let es = self.layout.l2_entry_size() as usize;
        for (l2, n) in order {
            *counts.entry(l2 / cs).or_default() += n;
            let t = self.read_l2_table(l2)?;
            for p in (0..t.len()).step_by(es) {
                let e = L2Entry(u64::from_be_bytes(
                    t[p..p + 8].try_into().unwrap_or_default(),
                ));
                match e.kind(self.layout.extended_l2) {
                    ClusterKind::Normal | ClusterKind::ZeroAlloc => {
                        *counts.entry(e.offset() / cs).or_default() += n;
                    }
                    ClusterKind::Compressed => {
                        let (s, end) = e.compressed_range(self.layout.csize_shift());
                        if s < file_len {
                            for c in (s & !511) / cs..=(end - 1) / cs {
                                *counts.entry(c).or_default() += n;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(counts)
    }

    /// Why a cluster at `off` cannot be what a table says it is, if it cannot.
    fn check_cluster(
        &self,
        off: u64,
        cs: u64,
        ign: u8,
        file_len: u64,
    ) -> std::result::Result<(), String> {
        if off % cs != 0 {
            return Err(format!("offset {off:#x} is not cluster aligned"));
        }
        if let Some((at, what)) = self.overlap_hit(ign, off, cs) {
            return Err(format!("at {off:#x} overlaps the {what} at {at:#x}"));
        }
        // Tables are read whole; a data cluster only has to start inside the file.
        let need = if ign == ol::DATA { 1 } else { cs };
        if off.checked_add(need).map_or(true, |end| end > file_len) {
            return Err(format!(
                "at {off:#x} lies beyond the end of the file ({file_len:#x})"
            ));
        }
        Ok(())
    }
}
