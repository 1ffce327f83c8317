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
//! Repairs change stored refcounts and COPIED flags only. When the refcount table itself is
//! damaged QEMU rebuilds the whole refcount structure; vmsnap does not, and refuses to repair
//! such an image (a check error) rather than write through a broken table.

mod l2;
mod refs;
mod repair;
mod walk;

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
        let repair = if rebuild && repair.is_some() {
            r.check_errors += 1;
            r.messages.push(
                "ERROR need to rebuild refcount structures (vmsnap does not rebuild them; nothing was repaired)"
                    .into(),
            );
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
