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
//! written.
//!
//! One pass, as cheap as the walk that follows it: the L1 tables are read first (the walked
//! ones validated entry by entry), then every distinct L2 table once, lowest offset first,
//! through the L2 cache the walk then reads again without I/O; counts go into dense arrays
//! indexed by cluster ([`super::tally`]), and the stored refcounts of the walked clusters
//! are read in cluster order, one refcount block at a time.

use super::check::l2_entry_corruption;
use super::entry::{ClusterKind, L1Entry, L2Entry, L1_RESERVED, L2_STD_RESERVED, OFLAG_COPIED};
use super::header::INCOMPAT_DIRTY;
use super::overlap::{category_name, ol, MetaMap};
use super::refcount::get_in_block;
use super::tally::{Role, TableRefs, Tally};
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
        let dirty = self.header.incompatible_features & INCOMPAT_DIRTY != 0;
        let meta = self.metadata_map();
        let cb = self.layout.cluster_bits;
        let mut t = Tally::new(file_len, cb, !matches!(w, Walked::Delete(..)));
        // 1. The walked L1 tables, entry by entry.
        let active = std::mem::take(&mut self.l1);
        let r = match w {
            Walked::Create => self.walk_l1_entries(
                &active,
                "the active L1 table",
                Role::Inc,
                &meta,
                file_len,
                &mut t,
            ),
            Walked::Goto(sn) => self
                .walk_l1_entries(
                    sn,
                    "the snapshot's L1 table",
                    Role::Inc,
                    &meta,
                    file_len,
                    &mut t,
                )
                .and_then(|()| {
                    self.walk_l1_entries(
                        &active,
                        "the active L1 table",
                        Role::Walked,
                        &meta,
                        file_len,
                        &mut t,
                    )
                }),
            // The active table is not walked, but its COPIED flags are rewritten at the end:
            // its entries must name sound L2 tables too.
            Walked::Delete(_, sn) => self
                .walk_l1_entries(
                    sn,
                    "the snapshot's L1 table",
                    Role::Walked,
                    &meta,
                    file_len,
                    &mut t,
                )
                .and_then(|()| {
                    active.iter().enumerate().try_for_each(|(i, &raw)| {
                        self.check_l1_entry(i, raw, "the active L1 table", &meta, file_len)
                            .map(drop)
                    })
                }),
        };
        // 2. The references every table holds (damaged other tables count what can be
        // read), one L1 table in memory at a time. Not on a dirty image.
        if r.is_ok() && !dirty {
            self.count_l1_entries(&active, file_len, &mut t);
        }
        self.l1 = active;
        r?;
        if !dirty {
            for i in 0..self.snapshots.len() {
                if let Ok(l1) = self.read_snapshot_l1(&self.snapshots[i]) {
                    // An entry of any table that leads `check` into the header: the
                    // operation rewrites the header, and with it what `check` finds there.
                    if let Some(j) = l1.iter().position(|&raw| reads_header(raw)) {
                        return Err(refused(format!(
                            "entry {j} of the L1 table of snapshot '{}' ({:#x}) has no offset \
                             but is not zero: `check` reads the header as its L2 table, and \
                             the operation rewrites the header",
                            self.snapshots[i].name, l1[j]
                        )));
                    }
                    self.count_l1_entries(&l1, file_len, &mut t);
                }
            }
        }
        // 3. Every L2 table once.
        for (c, refs) in t.take_tables() {
            if refs.from.is_some() || !dirty {
                self.count_l2_entries(c << cb, refs, &meta, file_len, &mut t)?;
            }
        }
        if dirty {
            return Ok(());
        }
        // 4. Stored counts against references, and room for the increments.
        self.compare_walked(w, &t)?;
        self.check_fixed_writes(w)?;
        if let Walked::Delete(idx, _) = w {
            let sn = self.snapshots[idx].clone();
            let first = sn.l1_table_offset >> cb;
            let n = (u64::from(sn.l1_size) * 8).div_ceil(self.layout.cluster_size());
            for c in first..first + n {
                if t.all(c) != Some(0) || self.get_refcount(c)? == 0 {
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

    /// For every walked cluster, in order: its stored refcount is at least the references
    /// all tables hold, and the increment fits the refcount width.
    fn compare_walked(&mut self, w: Walked<'_>, t: &Tally) -> Result<()> {
        let max = self.layout.max_refcount();
        let cb = self.layout.cluster_bits;
        let rbits = self.layout.refblock_bits();
        let order = self.layout.refcount_order;
        let mut block: Option<(u64, Option<Vec<u8>>)> = None;
        for c in t.walked() {
            let rt = c >> rbits;
            if block.as_ref().map(|b| b.0) != Some(rt) {
                block = Some((rt, self.refblock_for(c)?));
            }
            let rc = match block.as_ref().and_then(|b| b.1.as_deref()) {
                Some(data) => get_in_block(data, (c & ((1 << rbits) - 1)) as usize, order),
                None => 0,
            };
            let Some(refs) = t.all(c) else {
                return Err(refused(format!(
                    "the cluster at host offset {:#x} has more references than can be counted",
                    c << cb
                )));
            };
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
            if rc.checked_add(t.inc(c)).map_or(true, |v| v > max) {
                return Err(Qcow2Error::RefcountOverflow {
                    cluster: c,
                    bits: self.layout.refcount_bits(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The writes an operation makes at fixed places, whatever the tables hold: the header's
    /// snapshot fields (create and delete publish a new table there) and the active L1 table
    /// (COPIED flags; goto's new table, when it fits where the old one is). Each must touch
    /// no other structure, checked before the first write rather than at its own.
    fn check_fixed_writes(&self, w: Walked<'_>) -> Result<()> {
        if matches!(w, Walked::Create | Walked::Delete(..)) {
            self.overlap_check(ol::MAIN_HEADER, super::header::OFF_SNAPSHOTS, 12)?;
        }
        let active = self.l1.len() as u64;
        let written = match w {
            Walked::Goto(sn) if sn.len() as u64 > active => 0,
            _ => active,
        };
        self.overlap_check(ol::ACTIVE_L1, self.header.l1_table_offset, written * 8)
    }

    /// A copy of the refcount block covering cluster `c` (`None`: no block, counts are 0),
    /// read as [`Qcow2::get_refcount`] reads it. The block, which the operation rewrites,
    /// must not lie over other metadata.
    fn refblock_for(&mut self, c: u64) -> Result<Option<Vec<u8>>> {
        let rt = (c >> self.layout.refblock_bits()) as usize;
        let off = self.reftable.get(rt).copied().unwrap_or(0) & super::entry::REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.overlap_check(ol::REFCOUNT_BLOCK, off, self.layout.cluster_size())?;
        self.get_refcount(c)?;
        Ok(self.refblock_copy(off))
    }

    /// Before the refcount repair of a dirty (lazy-refcounts) image: the repair rewrites
    /// counts inside the existing refcount blocks, so every block the table names must be a
    /// sound cluster of its own (QEMU refuses such an image too).
    pub(crate) fn preflight_dirty_repair(&mut self) -> Result<()> {
        let file_len = self.storage.len().map_err(|e| Error::io("image size", e))?;
        let cs = self.layout.cluster_size();
        let meta = self.metadata_map();
        for (i, &e) in self.reftable.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let off = e & super::entry::REFT_OFFSET_MASK;
            let why = if off != e || off % cs != 0 {
                Some(format!("offset {e:#x} is not cluster aligned"))
            } else {
                check_cluster(&meta, off, cs, ol::REFCOUNT_BLOCK, file_len).err()
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

    /// Validates the entries of a walked L1 table and records the L2 tables they name.
    fn walk_l1_entries(
        &self,
        l1: &[u64],
        table: &'static str,
        role: Role,
        meta: &MetaMap,
        file_len: u64,
        t: &mut Tally,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        for (i, &raw) in l1.iter().enumerate() {
            if let Some(l2) = self.check_l1_entry(i, raw, table, meta, file_len)? {
                t.walked_table(l2 / cs, role, table);
            }
        }
        Ok(())
    }

    /// One L1 entry of `table`: no reserved bits, and its L2 table (returned, if any) cluster
    /// aligned, inside the file and over no other metadata.
    fn check_l1_entry(
        &self,
        i: usize,
        raw: u64,
        table: &'static str,
        meta: &MetaMap,
        file_len: u64,
    ) -> Result<Option<u64>> {
        if raw & L1_RESERVED != 0 {
            return Err(refused(format!(
                "entry {i} of {table} has reserved bits set ({raw:#x})"
            )));
        }
        let l2 = L1Entry(raw).l2_offset();
        if raw == 0 {
            return Ok(None);
        }
        if reads_header(raw) {
            return Err(refused(format!(
                "entry {i} of {table} ({raw:#x}) has no offset but is not zero: `check` \
                 reads the header as its L2 table"
            )));
        }
        let cs = self.layout.cluster_size();
        check_cluster(meta, l2, cs, ol::ACTIVE_L2 | ol::INACTIVE_L2, file_len)
            .map_err(|why| refused(format!("entry {i} of {table}: L2 table {why}")))?;
        Ok(Some(l2))
    }

    /// Records the L2 tables an L1 table names, as `qemu-img check` counts them (one
    /// reference per L1 entry). Entries that cannot be valid are skipped: `check` reports
    /// them, and the operation does not touch them.
    fn count_l1_entries(&self, l1: &[u64], file_len: u64, t: &mut Tally) {
        let cs = self.layout.cluster_size();
        for &raw in l1 {
            let l2 = L1Entry(raw).l2_offset();
            if l2 != 0 && raw & L1_RESERVED == 0 && l2 % cs == 0 && l2 + cs <= file_len {
                t.any_table(l2 / cs);
            }
        }
    }

    /// Counts the entries of the L2 table at `l2` (`refs.all` times each), and when a walked
    /// table reaches it validates them and marks their clusters walked.
    fn count_l2_entries(
        &mut self,
        l2: u64,
        refs: TableRefs,
        meta: &MetaMap,
        file_len: u64,
        t: &mut Tally,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        let shift = self.layout.csize_shift();
        let layout = self.layout;
        let table = self.load_l2(l2)?;
        let walked = refs.from.is_some();
        let from = refs.from.unwrap_or_default();
        let entry_err = |j: usize, why: String| {
            refused(format!(
                "entry {j} of the L2 table at {l2:#x} (reached from {from}): {why}"
            ))
        };
        for (j, p) in (0..table.len()).step_by(es).enumerate() {
            let e = L2Entry(u64::from_be_bytes(
                table[p..p + 8].try_into().unwrap_or_default(),
            ));
            // Reserved bits: `check` reports the entry once per table that reaches it, so
            // sharing the table would add reports of the same damage.
            if walked && e.kind(ext) != ClusterKind::Compressed && e.0 & L2_STD_RESERVED != 0 {
                return Err(entry_err(j, format!("reserved bits set ({:#x})", e.0)));
            }
            match e.kind(ext) {
                ClusterKind::Normal | ClusterKind::ZeroAlloc => {
                    if walked {
                        check_cluster(meta, e.offset(), cs, ol::DATA, file_len)
                            .map_err(|why| entry_err(j, format!("data cluster {why}")))?;
                    }
                    t.add(e.offset() / cs, refs.all, refs.inc, walked);
                }
                ClusterKind::Compressed => {
                    let (s, end) = e.compressed_range(shift);
                    // The descriptor counts whole sectors; the last may end past EOF.
                    if s >= file_len {
                        if walked {
                            return Err(entry_err(
                                j,
                                format!(
                                    "compressed data at {s:#x} lies beyond the end of the file \
                                     ({file_len:#x})"
                                ),
                            ));
                        }
                        continue;
                    }
                    t.add_range(s & !511, end, refs.all, refs.inc, walked);
                }
                _ => {}
            }
            // Anything else `check` reports about the entry (compressed data reaching a
            // cluster or more past the end of the file, a bad subcluster bitmap), it reports
            // once per table that reaches it too. Not a COPIED flag on a compressed entry:
            // the walk clears it, as QEMU's does. (Of a standard entry that is not
            // compressed, `check` reports only what the checks above refuse.)
            if walked && (ext || e.kind(ext) == ClusterKind::Compressed) {
                let bm = if ext {
                    u64::from_be_bytes(table[p + 8..p + 16].try_into().unwrap_or_default())
                } else {
                    0
                };
                let e = L2Entry(e.0 & !OFLAG_COPIED);
                if let Some(m) = l2_entry_corruption(layout, j, e, bm, file_len) {
                    return Err(entry_err(
                        j,
                        format!("`check` reports it once per table reaching it: {m}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An L1 entry with flags (COPIED, or reserved bits) and no offset. Reads and writes take its
/// range as unallocated (as QEMU's do), but `check` (QEMU's too) reads the header as its L2
/// table and reports every entry there that is not valid (the magic is a compressed cluster
/// far past the end of the file) once per table that reaches it: a copy of the L1 table adds
/// those reports again, and a rewrite of the header changes them (QEMU's snapshot code aborts
/// on such an entry).
fn reads_header(raw: u64) -> bool {
    raw != 0 && L1Entry(raw).l2_offset() == 0
}

/// Why a cluster at `off` cannot be what a table says it is, if it cannot.
fn check_cluster(
    meta: &MetaMap,
    off: u64,
    cs: u64,
    ign: u8,
    file_len: u64,
) -> std::result::Result<(), String> {
    if off % cs != 0 {
        return Err(format!("offset {off:#x} is not cluster aligned"));
    }
    let cb = cs.trailing_zeros();
    if let Some((c, bits)) = meta.hit(off >> cb, 1, ign) {
        let (at, what) = (c << cb, category_name(bits));
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
