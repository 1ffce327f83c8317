//! Comparing computed with stored refcounts and COPIED flags, and repairing them
//! (QEMU's `compare_refcounts` and `check_oflag_copied`).

use std::collections::HashMap;

use byteorder::{BigEndian, ByteOrder};

use super::super::entry::{skip_zero_block, ClusterKind, L1Entry, L2Entry, OFLAG_COPIED};
use super::super::Qcow2;
use super::refs::{stored_refcount, Refs, StoredCounts};
use super::{bump, bump_fixed, CheckReport, Repair};
use crate::block::Result;

impl Qcow2 {
    pub(super) fn compare_refs(
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
        for (i, &computed) in refs.compared().iter().enumerate() {
            let i = i as u64;
            let stored = match stored_counts.get(self, i) {
                Ok(v) => v,
                Err(e) => {
                    r.check_errors += 1;
                    r.messages
                        .push(format!("Can't get refcount for cluster {i}: {e}"));
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

    /// Compares COPIED flags of the active tables with the stored reference counts (as
    /// QEMU's `check_oflag_copied`, after any refcount repair). Clusters whose count cannot
    /// be read are skipped silently, as QEMU does.
    pub(super) fn check_copied(
        &mut self,
        r: &mut CheckReport,
        repair: Option<Repair>,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let bits = self.layout.cluster_bits;
        let mut walked: HashMap<u64, CheckReport> = HashMap::new();
        let mut next = 0;
        while next < self.l1.len() {
            // Zero entries are skipped below; blocks of them at once.
            let i = skip_zero_block(&self.l1, next);
            let Some(&raw) = self.l1.get(i) else {
                break;
            };
            next = i + 1;
            let e = L1Entry(raw);
            let l2 = e.l2_offset();
            if l2 == 0 || l2 % cs != 0 {
                continue;
            }
            let Ok(stored) = stored_refcount(self, l2 >> bits) else {
                continue;
            };
            let should = stored == 1;
            if should != e.copied() {
                let harmless = should;
                let fix = matches!(repair, Some(Repair::All)) || harmless && repair.is_some();
                r.messages.push(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={}",
                    if fix { "Repairing" } else { "ERROR" },
                    e.0,
                    stored
                ));
                if fix {
                    self.write_l1_entry(i, L1Entry::new(l2, should).0)?;
                    bump_fixed(r, harmless);
                } else {
                    bump(r, harmless);
                }
            }
            // Without repair nothing is written, so every L1 entry that reaches the same L2
            // table finds the same: the table is walked once and its findings replayed.
            if repair.is_none() {
                if let Some(f) = walked.get(&l2) {
                    merge(r, f);
                    continue;
                }
            }
            let mut f = CheckReport::default();
            self.check_copied_l2(l2, &mut f, repair)?;
            merge(r, &f);
            if repair.is_none() {
                walked.insert(l2, f);
            }
        }
        Ok(())
    }

    /// The data clusters of the active L2 table at `l2` (cluster aligned): their COPIED
    /// flags against the stored counts, reported into `r`.
    fn check_copied_l2(
        &mut self,
        l2: u64,
        r: &mut CheckReport,
        repair: Option<Repair>,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let bits = self.layout.cluster_bits;
        // Only walk L2 tables that are the active layer's alone; shared tables were
        // counted through their owner and their flags are cleared by construction.
        let Ok(table) = self.read_l2_table(l2) else {
            r.check_errors += 1;
            r.messages
                .push(format!("ERROR: Could not read L2 table at {l2:#x}"));
            return Ok(());
        };
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
            let Ok(stored) = stored_refcount(self, le.offset() >> bits) else {
                continue;
            };
            let should = stored == 1;
            if should != le.copied() {
                let harmless = should;
                let fix = matches!(repair, Some(Repair::All)) || harmless && repair.is_some();
                r.messages.push(format!(
                    "{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                    if fix { "Repairing" } else { "ERROR" },
                    le.0,
                    stored
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
        Ok(())
    }
}

/// Adds the findings of one L2 table's COPIED walk to the report.
fn merge(r: &mut CheckReport, f: &CheckReport) {
    r.messages.extend(f.messages.iter().cloned());
    r.corruptions += f.corruptions;
    r.leaks += f.leaks;
    r.check_errors += f.check_errors;
    r.corruptions_fixed += f.corruptions_fixed;
    r.leaks_fixed += f.leaks_fixed;
}
