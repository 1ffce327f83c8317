//! Consistency check and repair (QEMU `qcow2_co_check_locked` / `qcow2_check_refcounts`).
//!
//! The check rebuilds every cluster's reference count in memory from the header, the active
//! L1/L2 tables, every snapshot's L1/L2 tables, the snapshot table and the refcount structures
//! ([`walk`], [`l2`], [`refs`]), then compares with the stored counts ([`repair`]):
//!
//! - stored > computed: a leak (`Leaked cluster N refcount=A reference=B`), harmless;
//! - stored < computed: a corruption (`ERROR cluster N refcount=A reference=B`): a write could
//!   reuse a cluster still in use.
//!
//! Everything else QEMU reports is a corruption too, in QEMU's words: reserved bits in L1, L2
//! and refcount table entries, unaligned tables and clusters, references one cluster or more
//! past the end of the file (L2 tables, data and compressed clusters, snapshot L1 tables and
//! the snapshot table), refcount blocks outside the image or referenced twice, and damaged
//! snapshot entries. A check error (exit 1) means that checking itself failed: an I/O error,
//! or a stored refcount that cannot be read (an unaligned refcount block).
//!
//! COPIED flags in the active tables are compared with the computed reference count. A flag
//! that is set on a cluster referenced more than once is a corruption (a write would go in
//! place into shared data). A flag that is missing on a cluster referenced once is only a lost
//! optimisation (the next write copies the cluster); a crash in the middle of a snapshot
//! operation leaves such flags, and vmsnap counts them with the leaks and fixes them with
//! `-r leaks`. QEMU counts both kinds as corruptions; see formats/qcow2.md.
//!
//! Repairs change stored refcounts and COPIED flags. When the refcount table itself is
//! damaged, `-r all` writes a new refcount structure from the computed counts ([`rebuild`],
//! as QEMU does) and checks again; `-r leaks` refuses (a check error) rather than write
//! through a broken table.

mod l2;
mod rebuild;
mod refs;
mod repair;
mod walk;

pub(crate) use l2::l2_entry_corruption;
use refs::Refs;

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

    /// Records one corruption with its message.
    fn corruption(&mut self, msg: String) {
        self.corruptions += 1;
        push_capped(&mut self.messages, MAX_MESSAGES, msg);
    }
}

/// Messages a report keeps: a damaged image can make QEMU print millions of lines (an L1
/// table read over guest data reaching every cluster), which vmsnap counts but does not keep.
pub(super) const MAX_MESSAGES: usize = 100_000;

/// Appends `msg` unless `v` holds `cap` messages; the first message past the cap becomes a
/// line saying that further ones are left out (their counts stay in the report).
pub(super) fn push_capped(v: &mut Vec<String>, cap: usize, msg: String) {
    match v.len().cmp(&cap) {
        std::cmp::Ordering::Less => v.push(msg),
        std::cmp::Ordering::Equal => v.push(format!(
            "(further messages left out after the first {cap}; the counts below include them)"
        )),
        std::cmp::Ordering::Greater => {}
    }
}

impl Qcow2 {
    /// Checks (and optionally repairs) the image's metadata, like `qemu-img check`.
    ///
    /// # Errors
    /// I/O errors, or [`Error::ReadOnly`] when asked to repair a read-only image.
    pub fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport> {
        self.check_once(repair, true)
    }

    /// One check; with `may_rebuild`, a damaged refcount table under `-r all` is rebuilt
    /// and the image checked again.
    fn check_once(&mut self, repair: Option<Repair>, may_rebuild: bool) -> Result<CheckReport> {
        if repair.is_some() {
            self.writable()?;
        }
        let cs = self.layout.cluster_size();
        let file_len = self.storage.len().map_err(|e| Error::io("image size", e))?;
        let mut r = CheckReport {
            total_clusters: self.header.size.div_ceil(cs),
            ..Default::default()
        };
        let mut refs = Refs::new(file_len, self.layout.cluster_bits);
        self.snapshot_entries_check(&mut r);
        let rebuild = self.compute_refs(&mut refs, &mut r, file_len)?;
        // A zero refcount table entry whose range holds clusters in use: repairing those
        // counts one by one would need a new block placed inside that range, over a cluster
        // in use. A rebuild places everything past the end.
        let missing_blocks = repair == Some(Repair::All) && self.zero_entries_in_use(&refs);
        if (rebuild || missing_blocks) && repair == Some(Repair::All) && may_rebuild {
            // Report what is wrong as QEMU does before its rebuild; the stored counts that
            // cannot be read are replaced, not check errors.
            let errors = r.check_errors;
            self.compare_refs(&refs, &mut r, None)?;
            r.check_errors = errors;
            return self.rebuild_and_check(&refs, r);
        }
        let repair = if rebuild && repair.is_some() {
            r.check_errors += 1;
            r.messages.push(if may_rebuild {
                "ERROR need to rebuild refcount structures".into()
            } else {
                "ERROR rebuilt refcount structure is still broken".into()
            });
            None
        } else {
            repair
        };
        self.compare_refs(&refs, &mut r, repair)?;
        self.check_copied(&mut r, repair)?;
        if repair.is_some() {
            self.sflush()?;
        }
        Ok(r)
    }

    /// True when a refcount table entry is zero while the check counted references to
    /// clusters of its range.
    fn zero_entries_in_use(&self, refs: &Refs) -> bool {
        let per_block = self.layout.refblock_entries() as usize;
        self.reftable.iter().enumerate().any(|(rt, &e)| {
            e == 0
                && refs
                    .counts
                    .iter()
                    .skip(rt * per_block)
                    .take(per_block)
                    .any(|&n| n != 0)
        })
    }

    /// Rebuilds the refcount structure from `refs` and checks (and repairs) the image again:
    /// the old structure is leaked then, and those leaks are repaired too. `before` is the
    /// report of the check that found the damage; its corruptions and leaks count as fixed
    /// when the second check no longer finds them.
    fn rebuild_and_check(&mut self, refs: &Refs, before: CheckReport) -> Result<CheckReport> {
        let mut messages = before.messages;
        messages.push("Rebuilding refcount structure".into());
        if let Err(e) = self.rebuild_refcounts(refs) {
            messages.push(format!("ERROR rebuilding the refcount structure: {e}"));
            return Ok(CheckReport {
                messages,
                check_errors: before.check_errors + 1,
                ..before
            });
        }
        let mut after = self.check_once(Some(Repair::All), false)?;
        after.corruptions_fixed += before.corruptions.saturating_sub(after.corruptions);
        after.leaks_fixed += before.leaks.saturating_sub(after.leaks);
        after.check_errors += before.check_errors;
        messages.append(&mut after.messages);
        after.messages = messages;
        Ok(after)
    }

    /// What QEMU's snapshot table check reports about the entries themselves (the L1
    /// references are judged in the walk).
    fn snapshot_entries_check(&self, r: &mut CheckReport) {
        if self.header.version < 3 {
            return;
        }
        for (i, sn) in self.snapshots.iter().enumerate() {
            // Version 3 requires vm_state_size_large and disk_size.
            if sn.extra_data_size < 16 {
                r.corruption(format!("ERROR snapshot table entry {i} is incomplete"));
            }
        }
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
