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
use super::layout::MAX_L1_BYTES;
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
        if len == 0 {
            return true;
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        if last >= self.counts.len() as u64 {
            return false;
        }
        for c in first..=last {
            self.counts[c as usize] = self.counts[c as usize].saturating_add(1);
        }
        true
    }
}

#[derive(Clone, Copy)]
struct Frag {
    next_contiguous: u64,
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
        let mut frag = Frag { next_contiguous: 0 };
        self.check_l1(&active, refs, r, Some(&mut frag), "active")?;
        // Snapshots.
        for sn in self.snapshots.clone() {
            let bytes = u64::from(sn.l1_size) * 8;
            if sn.l1_table_offset % cs != 0 || bytes > MAX_L1_BYTES {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if !refs.inc(sn.l1_table_offset, bytes) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is beyond the end of the image",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            let l1 = match self.read_snapshot_l1(&sn) {
                Ok(l1) => l1,
                Err(e) => {
                    r.corruptions += 1;
                    r.messages
                        .push(format!("ERROR snapshot {} ({}): {e}", sn.id, sn.name));
                    continue;
                }
            };
            self.check_l1(&l1, refs, r, None, &sn.name)?;
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

    fn check_l1(
        &mut self,
        l1: &[u64],
        refs: &mut Refs,
        r: &mut CheckReport,
        mut frag: Option<&mut Frag>,
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
            // QEMU counts fragmentation within each L2 table.
            if let Some(f) = frag.as_deref_mut() {
                f.next_contiguous = 0;
            }
            for j in 0..self.layout.l2_entries() {
                let (le, bm) = match self.l2_get(l2, j) {
                    Ok(v) => v,
                    Err(_) => {
                        r.check_errors += 1;
                        r.messages
                            .push(format!("ERROR: I/O error reading L2 table at {l2:#x}"));
                        break;
                    }
                };
                self.check_l2_entry(le, bm, refs, r, frag.as_deref_mut())?;
            }
        }
        Ok(())
    }

    fn check_l2_entry(
        &mut self,
        e: L2Entry,
        bm: u64,
        refs: &mut Refs,
        r: &mut CheckReport,
        frag: Option<&mut Frag>,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let ext = self.layout.extended_l2;
        match e.kind(ext) {
            ClusterKind::Compressed => {
                if e.copied() {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        e.0 & ((1u64 << self.layout.csize_shift()) - 1)
                    ));
                }
                if ext && bm != 0 {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR compressed cluster with non-zero subcluster allocation bitmap, entry={:#x}",
                        e.0
                    ));
                }
                let (s, end) = e.compressed_range(self.layout.csize_shift());
                if !refs.inc(s & !511, end - (s & !511)) {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR: compressed cluster at {s:#x} is beyond the end of the image"
                    ));
                }
                if let Some(f) = frag {
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                    r.fragmented_clusters += 1;
                    let _ = f;
                }
            }
            ClusterKind::Normal | ClusterKind::ZeroAlloc => {
                let off = e.offset();
                if ext && (bm >> 32) & bm & BITMAP_ALL_ALLOC != 0 {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR Invalid cluster entry found: l2_entry={:#x} bitmap={bm:#x}",
                        e.0
                    ));
                }
                if e.0 & 0x3f00_0000_0000_01fe != 0 || off % cs != 0 {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR offset={off:#x}: Cluster is not properly aligned; L2 entry corrupted."
                    ));
                    return Ok(());
                }
                if let Some(f) = frag {
                    r.allocated_clusters += 1;
                    if f.next_contiguous != 0 && off != f.next_contiguous {
                        r.fragmented_clusters += 1;
                    }
                    f.next_contiguous = off + cs;
                }
                if !refs.inc(off, cs) {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR offset={off:#x}: data cluster is beyond the end of the image"
                    ));
                }
            }
            _ => {
                if ext && bm & BITMAP_ALL_ALLOC != 0 && (bm >> 32) & bm != 0 {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR Invalid cluster entry found: l2_entry={:#x} bitmap={bm:#x}",
                        e.0
                    ));
                }
            }
        }
        Ok(())
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
        for (i, &computed) in refs.counts.iter().enumerate() {
            let i = i as u64;
            let stored = match self.get_refcount(i) {
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
            for j in 0..self.layout.l2_entries() {
                let (le, bm) = self.l2_get(l2, j)?;
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
                        self.l2_set(l2, j, L2Entry((le.0 & !OFLAG_COPIED) | flag), bm)?;
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
