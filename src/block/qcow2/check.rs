//! Consistency check and repair (QEMU `qcow2_check_refcounts`).
//!
//! The check rebuilds every cluster's reference count in memory from the header, the active
//! L1/L2 tables, every snapshot's L1/L2 tables, the snapshot table and the refcount structures,
//! then compares with the stored counts:
//!
//! - stored > computed: a leak (`Leaked cluster N refcount=A reference=B`), harmless;
//! - stored < computed: a corruption (`ERROR cluster N refcount=A reference=B`): a write could
//!   reuse a cluster still in use.
//!
//! COPIED flags in the active tables are compared with the computed reference count. A flag
//! that is set on a cluster referenced more than once is a corruption (a write would go in
//! place into shared data). A flag that is missing on a cluster referenced once is only a lost
//! optimisation (the next write copies the cluster); a crash in the middle of a snapshot
//! operation leaves such flags, and vmsnap counts them with the leaks and fixes them with
//! `-r leaks`. QEMU counts both kinds as corruptions; see formats/qcow2.md.

use super::entry::{ClusterKind, L1Entry, L2Entry, BITMAP_ALL_ALLOC, OFLAG_COPIED};
use std::collections::HashMap;

use byteorder::{BigEndian, ByteOrder};

use super::layout::MAX_L1_BYTES;
use super::snapshot::Snapshot;
use super::Qcow2;
use crate::block::{Error, Result};

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Leaked clusters only (`-r leaks`).
    Leaks,
    /// Leaks and corruptions (`-r all`).
    All,
}

/// Result of a consistency check, with `qemu-img check`'s numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Findings in QEMU's wording, one per line.
    pub messages: Vec<String>,
    /// Corruptions found and not fixed.
    pub corruptions: u64,
    /// Leaks found and not fixed.
    pub leaks: u64,
    /// Errors that kept parts of the check from running.
    pub check_errors: u64,
    /// Corruptions fixed by repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by repair.
    pub leaks_fixed: u64,
    /// Guest clusters allocated in the active layer.
    pub allocated_clusters: u64,
    /// Virtual size in clusters.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active layer.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 2 corruptions, 3 leaks only, 1 check errors.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// In-memory reference counts, bounded by the file size.
struct Refs {
    counts: Vec<u64>,
    cluster_bits: u32,
}

impl Refs {
    /// Adds a reference to every cluster of `[off, off + len)`; false if beyond the file.
    fn inc(&mut self, off: u64, len: u64) -> bool {
        self.inc_by(off, len, 1)
    }

    /// True when `[off, off + len)` lies within the counted clusters.
    fn fits(&self, off: u64, len: u64) -> bool {
        len == 0
            || off
                .checked_add(len - 1)
                .is_some_and(|last| (last >> self.cluster_bits) < self.counts.len() as u64)
    }

    /// Adds `n` references to every cluster of `[off, off + len)`; false if beyond the file.
    fn inc_by(&mut self, off: u64, len: u64, n: u64) -> bool {
        if len == 0 {
            return true;
        }
        if !self.fits(off, len) {
            return false;
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for c in first..=last {
            self.counts[c as usize] = self.counts[c as usize].saturating_add(n);
        }
        true
    }
}

/// What checking one L2 table found, replayed for every further L1 entry that reaches the
/// same table: a table shared by the active layer and N snapshots is read and walked once.
#[derive(Debug, Default)]
struct L2Findings {
    messages: Vec<String>,
    corruptions: u64,
    check_errors: u64,
    allocated: u64,
    compressed: u64,
    fragmented: u64,
}

impl L2Findings {
    /// Reports the findings for one reference (statistics only for the active layer).
    fn apply(&self, r: &mut CheckReport, stats: bool) {
        r.messages.extend(self.messages.iter().cloned());
        r.corruptions += self.corruptions;
        r.check_errors += self.check_errors;
        if stats {
            r.allocated_clusters += self.allocated;
            r.compressed_clusters += self.compressed;
            r.fragmented_clusters += self.fragmented;
        }
    }
}

/// Stored refcounts read in order, one refcount block at a time.
#[derive(Default)]
struct StoredCounts {
    /// Refcount table index of `block`, and a copy of that block.
    block: Option<(usize, Vec<u8>)>,
}

impl StoredCounts {
    /// The stored refcount of cluster `c`.
    fn get(&mut self, q: &mut Qcow2, c: u64) -> Result<u64> {
        let rt = (c >> q.layout.refblock_bits()) as usize;
        if self.block.as_ref().map(|(b, _)| *b) != Some(rt) {
            self.block = None;
            let off = q.reftable.get(rt).copied().unwrap_or(0) & super::entry::OFFSET_MASK;
            if off == 0 {
                return Ok(0);
            }
            // Through the refcount cache first: a bad block is reported as before.
            let v = q.get_refcount(c)?;
            match q.refblock_copy(off) {
                Some(d) => self.block = Some((rt, d)),
                None => return Ok(v),
            }
        }
        let data = self.block.as_ref().map_or(&[][..], |(_, d)| &d[..]);
        let idx = (c & (q.layout.refblock_entries() - 1)) as usize;
        Ok(super::refcount::get_in_block(
            data,
            idx,
            q.layout.refcount_order,
        ))
    }

    /// Drops the copy (the block was just changed).
    fn forget(&mut self) {
        self.block = None;
    }
}

/// State of the L2 part of a check: references per table, and tables already walked.
struct L2Walk {
    reach: HashMap<u64, u64>,
    seen: HashMap<u64, L2Findings>,
}

impl Qcow2 {
    /// Checks (and optionally repairs) the image's metadata, like `qemu-img check`.
    ///
    /// # Errors
    /// I/O errors, or [`Error::ReadOnly`] when asked to repair a read-only image.
    pub fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport> {
        if repair.is_some() {
            self.writable()?;
        }
        let cs = self.layout.cluster_size();
        let file_len = self.storage.len().map_err(|e| Error::io("image size", e))?;
        let mut r = CheckReport {
            total_clusters: self.header.size.div_ceil(cs),
            ..Default::default()
        };
        let mut refs = Refs {
            counts: vec![0; file_len.div_ceil(cs) as usize],
            cluster_bits: self.layout.cluster_bits,
        };
        self.compute_refs(&mut refs, &mut r, file_len)?;
        self.compare_refs(&refs, &mut r, repair)?;
        self.check_copied(&refs, &mut r, repair)?;
        if repair.is_some() {
            self.sflush()?;
        }
        Ok(r)
    }

    fn compute_refs(&mut self, refs: &mut Refs, r: &mut CheckReport, file_len: u64) -> Result<()> {
        let cs = self.layout.cluster_size();
        refs.inc(0, cs);
        let mut walk = L2Walk {
            reach: self.count_l2_references(refs),
            seen: HashMap::new(),
        };
        // Active layer, with allocation statistics.
        let l1_bytes = self.l1.len() as u64 * 8;
        if !refs.inc(self.header.l1_table_offset, l1_bytes) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR: active L1 table at {:#x} is beyond the end of the image",
                self.header.l1_table_offset
            ));
        }
        let active = self.l1.clone();
        self.check_l1(&active, refs, r, &mut walk, true, "active")?;
        // Snapshots.
        for sn in self.snapshots.clone() {
            let Some(l1) = self.snapshot_l1_for_check(&sn, refs, r, true) else {
                continue;
            };
            self.check_l1(&l1, refs, r, &mut walk, false, &sn.name)?;
        }
        // Snapshot table.
        if self.header.nb_snapshots > 0 {
            let len: u64 = self.snapshots.iter().map(|s| s.entry_len).sum();
            if !refs.inc(self.header.snapshots_offset, len) {
                r.corruptions += 1;
                r.messages
                    .push("ERROR snapshot table is beyond the end of the image".into());
            }
        }
        // Refcount table and blocks.
        let rt_bytes = u64::from(self.header.refcount_table_clusters) * cs;
        refs.inc(self.header.refcount_table_offset, rt_bytes);
        for (i, &e) in self.reftable.clone().iter().enumerate() {
            let off = e & super::entry::OFFSET_MASK;
            if e == 0 {
                continue;
            }
            if off != e || off % cs != 0 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if off >= file_len {
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            refs.inc(off, cs);
            if refs.counts[(off / cs) as usize] > 1 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR refcount block {i} refcount={}",
                    refs.counts[(off / cs) as usize]
                ));
            }
        }
        Ok(())
    }

    /// A snapshot's L1 table if it can be walked, otherwise reports why. With `count`, the
    /// table's own clusters get their reference (also when reading it then fails).
    fn snapshot_l1_for_check(
        &mut self,
        sn: &Snapshot,
        refs: &mut Refs,
        r: &mut CheckReport,
        count: bool,
    ) -> Option<Vec<u64>> {
        let cs = self.layout.cluster_size();
        let bytes = u64::from(sn.l1_size) * 8;
        if sn.l1_table_offset % cs != 0 || bytes > MAX_L1_BYTES {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                sn.id, sn.name, sn.l1_table_offset
            ));
            return None;
        }
        let inside = if count {
            refs.inc(sn.l1_table_offset, bytes)
        } else {
            refs.fits(sn.l1_table_offset, bytes)
        };
        if !inside {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is beyond the end of the image",
                sn.id, sn.name, sn.l1_table_offset
            ));
            return None;
        }
        match self.read_snapshot_l1(sn) {
            Ok(l1) => Some(l1),
            Err(e) => {
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR snapshot {} ({}): {e}", sn.id, sn.name));
                None
            }
        }
    }

    /// The L2 table an L1 entry leads the check into, if any (not misaligned, not beyond the
    /// end of the file).
    fn walkable_l2(&self, raw: u64, refs: &Refs) -> Option<u64> {
        let cs = self.layout.cluster_size();
        let l2 = L1Entry(raw).l2_offset();
        (l2 != 0 && raw & super::entry::L1_RESERVED == 0 && l2 % cs == 0 && refs.fits(l2, cs))
            .then_some(l2)
    }

    /// How many L1 entries (active and of every snapshot the check will walk) reach each L2
    /// table. A pre-pass over the L1 tables only, on scratch counts.
    fn count_l2_references(&mut self, refs: &mut Refs) -> HashMap<u64, u64> {
        let mut reach: HashMap<u64, u64> = HashMap::new();
        let mut count = |q: &Qcow2, l1: &[u64], refs: &Refs| {
            for &raw in l1 {
                if let Some(l2) = q.walkable_l2(raw, refs) {
                    *reach.entry(l2).or_insert(0) += 1;
                }
            }
        };
        count(self, &self.l1, refs);
        let mut scratch = CheckReport::default();
        for sn in self.snapshots.clone() {
            if let Some(l1) = self.snapshot_l1_for_check(&sn, refs, &mut scratch, false) {
                count(self, &l1, refs);
            }
        }
        reach
    }

    fn check_l1(
        &mut self,
        l1: &[u64],
        refs: &mut Refs,
        r: &mut CheckReport,
        walk: &mut L2Walk,
        stats: bool,
        what: &str,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        for (i, &raw) in l1.iter().enumerate() {
            let e = L1Entry(raw);
            let l2 = e.l2_offset();
            if l2 == 0 {
                continue;
            }
            if raw & super::entry::L1_RESERVED != 0 || l2 % cs != 0 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR l2_offset={l2:#x}: Table is not cluster aligned; L1 entry corrupted ({what} L1 index {i})"
                ));
                continue;
            }
            if !refs.inc(l2, cs) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR l2_offset={l2:#x}: L2 table is beyond the end of the image ({what} L1 index {i})"
                ));
                continue;
            }
            if let Some(f) = walk.seen.get(&l2) {
                f.apply(r, stats);
                continue;
            }
            // First visit: every reference to this table counts its clusters now.
            let times = walk.reach.get(&l2).copied().unwrap_or(1).max(1);
            let f = self.check_l2(l2, refs, times)?;
            f.apply(r, stats);
            if times > 1 {
                walk.seen.insert(l2, f);
            }
        }
        Ok(())
    }

    /// Checks one L2 table read in one piece, adding `times` references to each cluster it
    /// points to. Findings are returned rather than reported, to be replayed per reference.
    fn check_l2(&mut self, l2: u64, refs: &mut Refs, times: u64) -> Result<L2Findings> {
        let mut f = L2Findings::default();
        let table = match self.read_l2_table(l2) {
            Ok(t) => t,
            Err(_) => {
                f.check_errors += 1;
                f.messages
                    .push(format!("ERROR: I/O error reading L2 table at {l2:#x}"));
                return Ok(f);
            }
        };
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        // QEMU counts fragmentation within each L2 table.
        let mut next_contiguous = 0u64;
        for p in (0..table.len()).step_by(es) {
            let e = L2Entry(BigEndian::read_u64(&table[p..]));
            let bm = if ext {
                BigEndian::read_u64(&table[p + 8..])
            } else {
                0
            };
            self.check_l2_entry(e, bm, refs, times, &mut f, &mut next_contiguous);
        }
        Ok(f)
    }

    fn check_l2_entry(
        &self,
        e: L2Entry,
        bm: u64,
        refs: &mut Refs,
        times: u64,
        f: &mut L2Findings,
        next_contiguous: &mut u64,
    ) {
        let cs = self.layout.cluster_size();
        let ext = self.layout.extended_l2;
        match e.kind(ext) {
            ClusterKind::Compressed => {
                if e.copied() {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        e.0 & ((1u64 << self.layout.csize_shift()) - 1)
                    ));
                }
                if ext && bm != 0 {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR compressed cluster with non-zero subcluster allocation bitmap, entry={:#x}",
                        e.0
                    ));
                }
                let (s, end) = e.compressed_range(self.layout.csize_shift());
                if !refs.inc_by(s & !511, end - (s & !511), times) {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR: compressed cluster at {s:#x} is beyond the end of the image"
                    ));
                }
                f.allocated += 1;
                f.compressed += 1;
                f.fragmented += 1;
            }
            ClusterKind::Normal | ClusterKind::ZeroAlloc => {
                let off = e.offset();
                if ext && (bm >> 32) & bm & BITMAP_ALL_ALLOC != 0 {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR Invalid cluster entry found: l2_entry={:#x} bitmap={bm:#x}",
                        e.0
                    ));
                }
                if e.0 & 0x3f00_0000_0000_01fe != 0 || off % cs != 0 {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR offset={off:#x}: Cluster is not properly aligned; L2 entry corrupted."
                    ));
                    return;
                }
                f.allocated += 1;
                if *next_contiguous != 0 && off != *next_contiguous {
                    f.fragmented += 1;
                }
                *next_contiguous = off + cs;
                if !refs.inc_by(off, cs, times) {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR offset={off:#x}: data cluster is beyond the end of the image"
                    ));
                }
            }
            _ => {
                if ext && bm & BITMAP_ALL_ALLOC != 0 && (bm >> 32) & bm != 0 {
                    f.corruptions += 1;
                    f.messages.push(format!(
                        "ERROR Invalid cluster entry found: l2_entry={:#x} bitmap={bm:#x}",
                        e.0
                    ));
                }
            }
        }
    }

    fn compare_refs(
        &mut self,
        refs: &Refs,
        r: &mut CheckReport,
        repair: Option<Repair>,
    ) -> Result<()> {
        // Repairs must not allocate over clusters in use: allocate past everything.
        if repair.is_some() {
            self.free_hint = self.free_hint.max(refs.counts.len() as u64);
        }
        let mut highest = 0u64;
        let mut stored_counts = StoredCounts::default();
        for (i, &computed) in refs.counts.iter().enumerate() {
            let i = i as u64;
            let stored = match stored_counts.get(self, i) {
                Ok(v) => v,
                Err(e) => {
                    r.check_errors += 1;
                    r.messages
                        .push(format!("ERROR: cannot get refcount of cluster {i}: {e}"));
                    continue;
                }
            };
            if stored > 0 || computed > 0 {
                highest = i;
            }
            if stored == computed {
                continue;
            }
            let leak = stored > computed;
            let fix = match repair {
                Some(Repair::All) => true,
                Some(Repair::Leaks) => leak,
                None => false,
            };
            let word = if fix {
                "Repairing"
            } else if leak {
                "Leaked"
            } else {
                "ERROR"
            };
            r.messages.push(format!(
                "{word} cluster {i} refcount={stored} reference={computed}"
            ));
            if fix {
                let v = computed.min(self.layout.max_refcount());
                if computed > self.layout.max_refcount() {
                    r.corruptions += 1;
                    continue;
                }
                self.set_refcount(i, v)?;
                stored_counts.forget();
                if leak {
                    r.leaks_fixed += 1;
                } else {
                    r.corruptions_fixed += 1;
                }
            } else if leak {
                r.leaks += 1;
            } else {
                r.corruptions += 1;
            }
        }
        r.image_end_offset = (highest + 1) * self.layout.cluster_size();
        Ok(())
    }

    /// Compares COPIED flags of the active tables with the computed reference counts.
    fn check_copied(
        &mut self,
        refs: &Refs,
        r: &mut CheckReport,
        repair: Option<Repair>,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let count = |off: u64| refs.counts.get((off / cs) as usize).copied().unwrap_or(0);
        for i in 0..self.l1.len() {
            let e = L1Entry(self.l1[i]);
            let l2 = e.l2_offset();
            if l2 == 0 || l2 % cs != 0 || count(l2) == 0 {
                continue;
            }
            let should = count(l2) == 1;
            if should != e.copied() {
                let harmless = should;
                let fix = matches!(repair, Some(Repair::All)) || harmless && repair.is_some();
                r.messages.push(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={}",
                    if fix { "Repairing" } else { "ERROR" },
                    e.0,
                    count(l2)
                ));
                if fix {
                    self.write_l1_entry(i, L1Entry::new(l2, should).0)?;
                    bump_fixed(r, harmless);
                } else {
                    bump(r, harmless);
                }
            }
            // Only walk L2 tables that are the active layer's alone; shared tables were
            // counted through their owner and their flags are cleared by construction.
            let table = self.read_l2_table(l2)?;
            let es = self.layout.l2_entry_size() as usize;
            for (j, ent) in table.chunks_exact(es).enumerate() {
                let le = L2Entry(BigEndian::read_u64(ent));
                if !matches!(
                    le.kind(self.layout.extended_l2),
                    ClusterKind::Normal | ClusterKind::ZeroAlloc
                ) {
                    continue;
                }
                if le.offset() % cs != 0 {
                    continue;
                }
                let should = count(le.offset()) == 1;
                if should != le.copied() {
                    let harmless = should;
                    let fix = matches!(repair, Some(Repair::All)) || harmless && repair.is_some();
                    r.messages.push(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                        if fix { "Repairing" } else { "ERROR" },
                        le.0,
                        count(le.offset())
                    ));
                    if fix {
                        let flag = if should { OFLAG_COPIED } else { 0 };
                        // Writing into a shared L2 table is fine: COPIED is ignored there.
                        let bm = if self.layout.extended_l2 {
                            BigEndian::read_u64(&ent[8..])
                        } else {
                            0
                        };
                        self.l2_set(l2, j as u64, L2Entry((le.0 & !OFLAG_COPIED) | flag), bm)?;
                        bump_fixed(r, harmless);
                    } else {
                        bump(r, harmless);
                    }
                }
            }
        }
        Ok(())
    }
}

fn bump(r: &mut CheckReport, harmless: bool) {
    if harmless {
        r.leaks += 1;
    } else {
        r.corruptions += 1;
    }
}

fn bump_fixed(r: &mut CheckReport, harmless: bool) {
    if harmless {
        r.leaks_fixed += 1;
    } else {
        r.corruptions_fixed += 1;
    }
}
