//! The snapshot table and snapshot create / goto / delete.
//!
//! ```text
//!  entry (big-endian, 8-byte aligned, table at snapshots_offset, nb_snapshots entries)
//!   0  u64 l1_table_offset     16 u32 date_sec          36 u32 extra_data_size
//!   8  u32 l1_size             20 u32 date_nsec         40 extra data: u64 vm_state_size_large,
//!  12  u16 id_str_size         24 u64 vm_clock_nsec        u64 disk_size, u64 icount, unknown…
//!  14  u16 name_size           32 u32 vm_state_size      then id, name, zero padding to 8
//! ```
//!
//! Create: L1 copy → +1 refcounts (clear COPIED) → new table in fresh clusters → flush → one
//! 12-byte header write (`nb_snapshots`, `snapshots_offset`) → free the old table → discard
//! the VM state from the active layer. Goto: grow L1 → +1 on the snapshot's clusters →
//! overwrite the active L1 (synced) → −1 on the old active clusters → fix COPIED. Delete:
//! publish the table without the entry → −1 and free the L1 copy → fix COPIED. On-disk counts
//! never fall below the references, so a crash leaks clusters at worst.

use byteorder::{BigEndian, ByteOrder};

use super::entry::{ClusterKind, L1Entry, L2Entry, OFLAG_COPIED};
use super::header::OFF_SNAPSHOTS;
use super::layout::{MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES};
use super::overlap::ol;
use super::preflight::Walked;
use super::{Qcow2, Qcow2Error};
use crate::block::{Error, Result, SnapshotInfo, SnapshotParams};

/// Size of the extra data fields QEMU knows.
pub const KNOWN_EXTRA: usize = 24;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that table.
    pub l1_size: u32,
    /// Unique id.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (from `vm_state_size_large` when present).
    pub vm_state_size: u64,
    /// Disk size at creation.
    pub disk_size: u64,
    /// Instruction count, `u64::MAX` (-1) when not recorded.
    pub icount: u64,
    /// Extra data beyond the 24 bytes QEMU knows, kept verbatim.
    pub unknown_extra: Vec<u8>,
    /// Offset of this entry in the table on disk.
    pub entry_offset: u64,
    /// Length of this entry on disk, padded to 8 bytes.
    pub entry_len: u64,
    /// Length of this entry on disk without the padding (the table ends there).
    pub unpadded_len: u64,
    /// `extra_data_size` as stored (QEMU calls a v3 entry with less than 16 incomplete).
    pub extra_data_size: u32,
}

impl Snapshot {
    /// The public view.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            disk_size: Some(self.disk_size),
            icount: (self.icount != u64::MAX).then_some(self.icount),
        }
    }

    /// Extra data of our own (after the fields QEMU knows).
    pub fn extra_tail(&self) -> &[u8] {
        &self.unknown_extra
    }

    /// Serialised length of the entry, padded.
    fn encoded_len(&self) -> usize {
        self.unpadded_encoded_len().div_ceil(8) * 8
    }

    /// Serialised length of the entry without padding.
    fn unpadded_encoded_len(&self) -> usize {
        40 + KNOWN_EXTRA + self.unknown_extra.len() + self.id.len() + self.name.len()
    }

    /// Why this entry's L1 table cannot be used, as `qemu-img check` words it, or `None`
    /// when it is cluster aligned and within QEMU's size limit. Entries like these are
    /// listed (QEMU opens such images) but cannot be applied, read or deleted safely.
    pub fn l1_problem(&self, cluster_size: u64) -> Option<String> {
        if !self.has_l1_problem(cluster_size) {
            None
        } else if self.l1_table_offset % cluster_size != 0 {
            Some(format!(
                "snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                self.id, self.name, self.l1_table_offset
            ))
        } else if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            Some(format!(
                "snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                self.id, self.name, self.l1_size
            ))
        } else {
            None
        }
    }

    /// Whether [`Snapshot::l1_problem`] finds a problem, without formatting its message.
    pub fn has_l1_problem(&self, cluster_size: u64) -> bool {
        self.l1_table_offset % cluster_size != 0 || u64::from(self.l1_size) * 8 > MAX_L1_BYTES
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.encoded_len(), 0);
        let b = &mut out[start..];
        BigEndian::write_u64(&mut b[0..], self.l1_table_offset);
        BigEndian::write_u32(&mut b[8..], self.l1_size);
        BigEndian::write_u16(&mut b[12..], self.id.len() as u16);
        BigEndian::write_u16(&mut b[14..], self.name.len() as u16);
        BigEndian::write_u32(&mut b[16..], self.date_sec);
        BigEndian::write_u32(&mut b[20..], self.date_nsec);
        BigEndian::write_u64(&mut b[24..], self.vm_clock_nsec);
        BigEndian::write_u32(&mut b[32..], self.vm_state_size as u32);
        let extra = (KNOWN_EXTRA + self.unknown_extra.len()) as u32;
        BigEndian::write_u32(&mut b[36..], extra);
        BigEndian::write_u64(&mut b[40..], self.vm_state_size);
        BigEndian::write_u64(&mut b[48..], self.disk_size);
        BigEndian::write_u64(&mut b[56..], self.icount);
        let mut p = 64;
        b[p..p + self.unknown_extra.len()].copy_from_slice(&self.unknown_extra);
        p += self.unknown_extra.len();
        b[p..p + self.id.len()].copy_from_slice(self.id.as_bytes());
        p += self.id.len();
        b[p..p + self.name.len()].copy_from_slice(self.name.as_bytes());
    }
}

pub(crate) use super::snaptable::read_table;

/// Memory a walk may hold in changed tables and refcount blocks before writing them.
pub(crate) const WALK_BATCH_BYTES: usize = 32 << 20;

/// L2 tables a walk has changed in memory, and the L1 entries it will change.
#[derive(Debug, Default)]
struct PendingTables {
    /// Host offset → changed table.
    tables: std::collections::HashMap<u64, Vec<u8>>,
    bytes: usize,
    l1_changes: Vec<(usize, u64)>,
}

impl PendingTables {
    /// Takes the table at `off` out (an L1 table reaching one L2 table twice must see its
    /// own changes).
    fn take(&mut self, off: u64) -> Option<Vec<u8>> {
        let t = self.tables.remove(&off)?;
        self.bytes -= t.len();
        Some(t)
    }

    /// Keeps a changed table until the next write.
    fn put(&mut self, off: u64, table: Vec<u8>) {
        self.bytes += table.len();
        self.tables.insert(off, table);
    }

    /// The changed tables, taken out, lowest offset first.
    fn drain_sorted(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.bytes = 0;
        let mut v: Vec<(u64, Vec<u8>)> = self.tables.drain().collect();
        v.sort_unstable_by_key(|(o, _)| *o);
        v
    }
}

/// How an L1 walk changes counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Add one reference to every cluster reached.
    Inc,
    /// Remove one reference.
    Dec,
    /// Only make COPIED flags match the counts.
    FixCopied,
}

impl Qcow2 {
    /// Index of the snapshot with this id, else with this name (QEMU's order).
    pub(crate) fn find_snapshot(&self, id_or_name: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
            .ok_or_else(|| Error::SnapshotNotFound(id_or_name.to_owned()))
    }

    /// Sets how much changed metadata a snapshot walk holds in memory before writing it
    /// (default 32 MiB). For tests: 0 writes after every L2 table, the finest order the
    /// batched walk can produce, so crash tests reach the write points between batches.
    #[doc(hidden)]
    pub fn set_walk_batch_limit(&mut self, bytes: usize) {
        self.walk_batch_limit = bytes;
    }

    /// Snapshot entries as stored.
    pub fn snapshot_entries(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Walks an L1 table (the active one when `l1_offset` is the active table's offset, else
    /// the table read from disk), changing the counts of every L2 table and data cluster it
    /// reaches by `walk`, and setting COPIED flags to `refcount == 1` (QEMU
    /// `qcow2_update_snapshot_refcount`).
    ///
    /// Batched: counts change in memory (one refcount batch), each L2 table is read once and
    /// changed in memory, and every [`WALK_BATCH_BYTES`] (see
    /// [`Qcow2::set_walk_batch_limit`]) and at the end the changed refcount
    /// blocks are written first, then the changed L2 tables (one write each), then the changed
    /// L1 entries (one write). So a table never reaches storage before the counts its flags
    /// were computed from, and a crash leaves counts at or above the references, as the
    /// cluster-by-cluster order did.
    fn walk_l1(&mut self, l1_offset: u64, l1_size: u32, walk: Walk) -> Result<()> {
        self.walk_l1_upto(l1_offset, l1_size, usize::MAX, walk)
    }

    /// [`Qcow2::walk_l1`] over the first `end` L1 entries only.
    fn walk_l1_upto(&mut self, l1_offset: u64, l1_size: u32, end: usize, walk: Walk) -> Result<()> {
        self.begin_refcount_batch();
        let mut pending = PendingTables::default();
        let r = self.walk_l1_batched(l1_offset, l1_size, end, walk, &mut pending);
        let r = r.and_then(|()| self.write_walk_batch(l1_offset, &mut pending, walk));
        let ok = r.is_ok();
        let end = self.end_refcount_batch(ok);
        r.and(end)
    }

    fn walk_l1_batched(
        &mut self,
        l1_offset: u64,
        l1_size: u32,
        end: usize,
        walk: Walk,
        pending: &mut PendingTables,
    ) -> Result<()> {
        let active = l1_offset == self.header.l1_table_offset;
        let l1 = if active {
            self.l1.clone()
        } else {
            super::read_table(&*self.storage, l1_offset, u64::from(l1_size))?
        };
        let delta: i64 = match walk {
            Walk::Inc => 1,
            Walk::Dec => -1,
            Walk::FixCopied => 0,
        };
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        for (i, &raw_l1) in l1.iter().enumerate().take(end) {
            let l2 = L1Entry(raw_l1).l2_offset();
            if l2 == 0 {
                continue;
            }
            let mut table = match pending.take(l2) {
                Some(t) => t,
                None => self.take_l2_table(l2)?,
            };
            let mut changed = false;
            for p in (0..table.len()).step_by(es) {
                let e = L2Entry(BigEndian::read_u64(&table[p..]));
                let new = match e.kind(ext) {
                    ClusterKind::Compressed => {
                        if delta != 0 {
                            let (s, end) = e.compressed_range(self.layout.csize_shift());
                            self.update_refcount(s & !511, end - (s & !511), delta)?;
                        }
                        // Never COPIED (never written in place); QEMU clears a stray flag
                        // here too, as on every entry that is not a standard cluster.
                        L2Entry(e.0 & !OFLAG_COPIED)
                    }
                    ClusterKind::Normal | ClusterKind::ZeroAlloc => {
                        let c = self.layout.cluster_index(e.offset());
                        let rc = if delta != 0 {
                            self.add_refcount(c, delta)?
                        } else {
                            self.get_refcount(c)?
                        };
                        if rc == 1 {
                            L2Entry(e.0 | OFLAG_COPIED)
                        } else {
                            L2Entry(e.0 & !OFLAG_COPIED)
                        }
                    }
                    _ => L2Entry(e.0 & !OFLAG_COPIED),
                };
                if new != e {
                    BigEndian::write_u64(&mut table[p..], new.0);
                    changed = true;
                }
            }
            let c = self.layout.cluster_index(l2);
            let rc = if delta != 0 {
                self.add_refcount(c, delta)?
            } else {
                self.get_refcount(c)?
            };
            // A table whose last reference went is free: never write it back.
            if rc > 0 && changed {
                pending.put(l2, table);
            } else if rc > 0 {
                self.return_l2_table(l2, table);
            }
            let new = L1Entry::new(l2, rc == 1).0;
            // QEMU does not write back a table it is dropping references from.
            if new != raw_l1 && walk != Walk::Dec {
                pending.l1_changes.push((i, new));
            }
            if pending.bytes + self.refcount_batch_bytes() > self.walk_batch_limit {
                self.write_walk_batch(l1_offset, pending, walk)?;
            }
        }
        Ok(())
    }

    /// Writes what a walk has changed so far (the L1 table at `l1_offset`; the active one is
    /// also updated in memory).
    ///
    /// Order, so that a crash between two writes leaves leaks at most, never a COPIED flag
    /// on a cluster whose stored refcount is above 1 (a write would go in place into data a
    /// snapshot shares; `qemu-img check` calls it a corruption):
    /// - taking references (`Walk::Inc`): L2 tables, then L1 entries (COPIED cleared), then
    ///   the refcount blocks (+1); the new references are published later, after a flush;
    /// - dropping references: refcount blocks (−1) first, then L2 tables and L1 entries
    ///   (COPIED set where a count came down to 1).
    fn write_walk_batch(
        &mut self,
        l1_offset: u64,
        pending: &mut PendingTables,
        walk: Walk,
    ) -> Result<()> {
        if walk != Walk::Inc {
            self.write_refcount_batch()?;
        }
        self.write_walk_tables(l1_offset, pending)?;
        if walk == Walk::Inc {
            self.write_refcount_batch()?;
        }
        Ok(())
    }

    /// The table part of [`Self::write_walk_batch`]: L2 tables, then L1 entries.
    fn write_walk_tables(&mut self, l1_offset: u64, pending: &mut PendingTables) -> Result<()> {
        for (off, t) in pending.drain_sorted() {
            self.overlap_check(ol::ACTIVE_L2 | ol::INACTIVE_L2, off, t.len() as u64)?;
            self.l2_cache.forget(off);
            self.swrite_meta(ol::ACTIVE_L2 | ol::INACTIVE_L2, off, &t)?;
            self.l2_cache.insert(off, t);
        }
        let changes = std::mem::take(&mut pending.l1_changes);
        let (Some(lo), Some(hi)) = (
            changes.iter().map(|c| c.0).min(),
            changes.iter().map(|c| c.0).max(),
        ) else {
            return Ok(());
        };
        let active = l1_offset == self.header.l1_table_offset;
        let mut span = if active {
            self.l1[lo..=hi].to_vec()
        } else {
            let mut raw = vec![0u8; (hi - lo + 1) * 8];
            self.sread(l1_offset + lo as u64 * 8, &mut raw)?;
            raw.chunks_exact(8).map(BigEndian::read_u64).collect()
        };
        for &(i, v) in &changes {
            span[i - lo] = v;
        }
        let mut raw = vec![0u8; span.len() * 8];
        for (k, v) in span.iter().enumerate() {
            BigEndian::write_u64(&mut raw[k * 8..], *v);
        }
        let which = if active {
            ol::ACTIVE_L1
        } else {
            ol::INACTIVE_L1
        };
        if !active {
            self.snap_l1 = None;
        }
        self.swrite_meta(which, l1_offset + lo as u64 * 8, &raw)?;
        if active {
            self.l1[lo..=hi].copy_from_slice(&span);
            self.tables_changed();
        }
        Ok(())
    }

    /// Writes `list` as the new snapshot table: fresh clusters, flush, one 12-byte header
    /// write, then the old table is freed (QEMU `qcow2_write_snapshots`).
    fn publish_table(&mut self, list: Vec<Snapshot>) -> Result<()> {
        let mut raw = Vec::new();
        for s in &list {
            s.encode(&mut raw);
        }
        if raw.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Qcow2Error::SnapshotLimit(
                "Snapshot table too large (exceeds 64 MiB)".into(),
            )
            .into());
        }
        let new_off = if raw.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(self.layout.clusters_for(raw.len() as u64))?;
            self.swrite_meta(ol::SNAPSHOT_TABLE, off, &raw)?;
            off
        };
        self.sflush()?;
        let mut hdr = [0u8; 12];
        BigEndian::write_u32(&mut hdr[0..4], list.len() as u32);
        BigEndian::write_u64(&mut hdr[4..12], new_off);
        self.swrite_meta(ol::MAIN_HEADER, OFF_SNAPSHOTS, &hdr)?;
        self.sflush()?;
        let old_off = self.header.snapshots_offset;
        let old_len: u64 = self.snapshots.iter().map(|s| s.entry_len).sum();
        self.header.nb_snapshots = list.len() as u32;
        self.header.snapshots_offset = new_off;
        let mut list = list;
        let mut p = new_off;
        for s in &mut list {
            s.entry_offset = p;
            s.entry_len = s.encoded_len() as u64;
            s.unpadded_len = s.unpadded_encoded_len() as u64;
            s.extra_data_size = (KNOWN_EXTRA + s.unknown_extra.len()) as u32;
            p += s.entry_len;
        }
        self.snapshots = list;
        self.snap_l1 = None;
        self.snapshots_changed();
        if old_off != 0 && old_len > 0 {
            self.free_range(old_off, old_len)?;
        }
        Ok(())
    }

    /// Refuses, before an operation writes anything, when what it frees at its end (the
    /// snapshot table it replaces, and the ranges in `also`) has a cluster whose stored
    /// refcount is already 0: freeing it would fail after the operation's other writes.
    fn check_freed_later(&mut self, also: &[(u64, u64)]) -> Result<()> {
        let old_len: u64 = self.snapshots.iter().map(|s| s.entry_len).sum();
        let table = (self.header.snapshots_offset, old_len);
        for &(off, len) in std::iter::once(&table).chain(also) {
            if off != 0 && len > 0 {
                self.check_referenced(off, len)?;
            }
        }
        Ok(())
    }

    fn next_snapshot_id(&self) -> String {
        let max = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (max + 1).to_string()
    }

    /// Creates a snapshot of the active layer (QEMU `qcow2_snapshot_create`).
    pub(crate) fn create_snapshot(&mut self, p: &SnapshotParams) -> Result<SnapshotInfo> {
        self.writable()?;
        if p.name.is_empty() || p.name.len() > u16::MAX as usize {
            return Err(Error::Format(format!("Invalid snapshot name '{}'", p.name)));
        }
        if self.snapshots.iter().any(|s| s.name == p.name) {
            return Err(Qcow2Error::SnapshotExists(p.name.clone()).into());
        }
        if self.snapshots.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Qcow2Error::SnapshotLimit(format!(
                "Too many snapshots (QEMU's limit is {MAX_SNAPSHOTS})"
            ))
            .into());
        }
        if p.extra_tail.len() > MAX_SNAPSHOT_EXTRA as usize - KNOWN_EXTRA {
            return Err(Qcow2Error::SnapshotLimit("Too much extra snapshot data".into()).into());
        }
        if self.layout.max_refcount() < 2 && self.l1.iter().any(|&e| e != 0) {
            return Err(Qcow2Error::RefcountTooNarrow(self.layout.refcount_bits()).into());
        }
        // Nothing is written unless the active tables and their counts can take the +1.
        self.preflight_repairing(Walked::Create)?;
        self.check_freed_later(&[])?;
        // The L1 copy and the new table (one entry more, at most a cluster).
        let table: u64 = self.snapshots.iter().map(|s| s.entry_len).sum();
        let cs = self.layout.cluster_size();
        let n = self.layout.clusters_for(self.l1.len() as u64 * 8)
            + self.layout.clusters_for(table + cs);
        self.check_next_allocations(n)?;
        let id = self.next_snapshot_id();
        // 1. Copy the active L1 table into fresh clusters.
        let l1_bytes = self.l1.len() as u64 * 8;
        let l1_off = if l1_bytes == 0 {
            0
        } else {
            let off = self.alloc_clusters(self.layout.clusters_for(l1_bytes))?;
            let mut raw = vec![0u8; l1_bytes as usize];
            for (i, e) in self.l1.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            self.snap_l1 = None;
            self.swrite_meta(ol::INACTIVE_L1, off, &raw)?;
            off
        };
        // 2. +1 on everything the active table reaches below the VM state area; COPIED
        // flags cleared. With VM state, the area's L2 tables move to the snapshot instead:
        // the L1 copy references them and the active L1 drops them, so every cluster keeps
        // its number of references and none needs a count change (a crash before the table
        // is published leaks them, never more).
        let active_off = self.header.l1_table_offset;
        let active_size = self.l1.len() as u32;
        let moved = if p.vm_state_size > 0 {
            let idx = self.layout.l1_vm_state_index(self.header.size);
            usize::try_from(idx)
                .unwrap_or(usize::MAX)
                .min(self.l1.len())
        } else {
            self.l1.len()
        };
        self.walk_l1_upto(active_off, active_size, moved, Walk::Inc)?;
        self.drop_active_l1_from(moved)?;
        // 3. Publish the new table (flush, header commit, free old table).
        let sn = Snapshot {
            l1_table_offset: l1_off,
            l1_size: active_size,
            id,
            name: p.name.clone(),
            date_sec: p.date_sec,
            date_nsec: p.date_nsec,
            vm_clock_nsec: p.vm_clock_nsec,
            vm_state_size: p.vm_state_size,
            disk_size: self.header.size,
            icount: p.icount.unwrap_or(u64::MAX),
            unknown_extra: p.extra_tail.clone(),
            entry_offset: 0,
            entry_len: 0,
            unpadded_len: 0,
            extra_data_size: 0,
        };
        let mut list = self.snapshots.clone();
        list.push(sn.clone());
        self.publish_table(list)?;
        self.sflush()?;
        Ok(sn.info())
    }

    /// Clears the active L1 entries from index `from` on (the VM state area that moved to a
    /// new snapshot), in memory and with one write.
    fn drop_active_l1_from(&mut self, from: usize) -> Result<()> {
        let Some(tail) = self.l1.get(from..) else {
            return Ok(());
        };
        if tail.iter().all(|&e| e == 0) {
            return Ok(());
        }
        for &e in tail {
            let l2 = L1Entry(e).l2_offset();
            if l2 != 0 {
                self.l2_cache.forget(l2);
            }
        }
        let zeros = vec![0u8; tail.len() * 8];
        self.swrite_meta(
            ol::ACTIVE_L1,
            self.header.l1_table_offset + from as u64 * 8,
            &zeros,
        )?;
        self.l1[from..].fill(0);
        // Those L2 tables are the new snapshot's now, no longer active ones.
        self.tables_changed();
        Ok(())
    }

    /// Reverts the active layer to a snapshot (QEMU `qcow2_snapshot_goto`).
    pub(crate) fn goto_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.writable()?;
        let idx = self.find_snapshot(id_or_name)?;
        let sn = self.snapshots[idx].clone();
        if sn.disk_size != self.header.size {
            return Err(Qcow2Error::DiskSizeMismatch {
                snapshot: sn.id,
                snap_size: sn.disk_size,
                disk_size: self.header.size,
            }
            .into());
        }
        // Validate the snapshot's L1 table before anything is changed.
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        // The snapshot's VM state area stays the snapshot's: the active layer gets the disk
        // part only (the mirror of create, which moves the area out of the active L1; QEMU
        // copies it in and discards it at the next create). Reverting then costs the same
        // whatever the VM state's size, and loadvm reads the state from the snapshot.
        let disk_part = if sn.vm_state_size > 0 {
            usize::try_from(self.layout.l1_vm_state_index(self.header.size))
                .unwrap_or(usize::MAX)
                .min(sn_l1.len())
        } else {
            sn_l1.len()
        };
        let sn_disk = &sn_l1[..disk_part];
        if self.layout.max_refcount() < 2 && sn_disk.iter().any(|&e| e != 0) {
            return Err(Qcow2Error::RefcountTooNarrow(self.layout.refcount_bits()).into());
        }
        self.preflight_repairing(Walked::Goto(sn_disk))?;
        // 1. The active L1 must hold the whole snapshot table.
        self.grow_l1(u64::from(sn.l1_size), true)?;
        // 2. +1 on everything the snapshot's disk part reaches (also fixes its COPIED flags),
        // then the table as the walk left it.
        let mut new_l1 = if sn.l1_size > 0 {
            self.walk_l1_upto(sn.l1_table_offset, sn.l1_size, disk_part, Walk::Inc)?;
            self.read_snapshot_l1(&sn)?
        } else {
            Vec::new()
        };
        new_l1.truncate(disk_part);
        new_l1.resize(self.l1.len(), 0);
        // 3. Overwrite the active L1 table, synced.
        let mut raw = vec![0u8; self.l1.len() * 8];
        for (i, e) in new_l1.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        self.swrite_meta(ol::ACTIVE_L1, self.header.l1_table_offset, &raw)?;
        self.sflush()?;
        // 4. −1 on what the old active table reached (still in memory).
        let active_off = self.header.l1_table_offset;
        let size = self.l1.len() as u32;
        self.walk_l1(active_off, size, Walk::Dec)?;
        // 5. Switch the in-memory table and fix COPIED flags.
        self.l1 = new_l1;
        self.tables_changed();
        self.walk_l1(active_off, size, Walk::FixCopied)?;
        self.sflush()
    }

    /// Deletes a snapshot (QEMU `qcow2_snapshot_delete`).
    pub(crate) fn delete_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.writable()?;
        let idx = self.find_snapshot(id_or_name)?;
        let sn = self.snapshots[idx].clone();
        // Validate the snapshot's tables and the counts before the entry is dropped.
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        self.preflight_repairing(Walked::Delete(idx, &sn_l1))?;
        self.check_freed_later(&[(sn.l1_table_offset, u64::from(sn.l1_size) * 8)])?;
        // 1. Publish the table without the entry: from here on only leaks are possible.
        let mut list = self.snapshots.clone();
        list.remove(idx);
        self.publish_table(list)?;
        // 2. −1 on everything the snapshot reached, then free its L1 table.
        if sn.l1_size > 0 {
            self.walk_l1(sn.l1_table_offset, sn.l1_size, Walk::Dec)?;
            self.free_range(sn.l1_table_offset, u64::from(sn.l1_size) * 8)?;
        }
        // 3. Clusters now referenced once get COPIED back in the active tables.
        let active_off = self.header.l1_table_offset;
        let size = self.l1.len() as u32;
        self.walk_l1(active_off, size, Walk::FixCopied)?;
        self.sflush()
    }
}
