//! Checking one L2 table's entries (QEMU's `check_refcounts_l2`).

use byteorder::{BigEndian, ByteOrder};

use super::super::entry::{ClusterKind, L2Entry, BITMAP_ALL_ALLOC, L2_STD_RESERVED, OFLAG_ZERO};
use super::super::layout::Layout;
use super::super::Qcow2;
use super::refs::Refs;
use super::CheckReport;
use crate::block::Result;

/// Messages kept per L2 table (a "table" read over guest data can have an error in every
/// entry, and is replayed for every L1 entry that reaches it).
const MAX_TABLE_MESSAGES: usize = 256;

/// What checking one L2 table found, replayed for every further L1 entry that reaches the
/// same table: a table shared by the active layer and N snapshots is read and walked once.
#[derive(Debug, Default)]
pub(super) struct L2Findings {
    messages: Vec<String>,
    corruptions: u64,
    check_errors: u64,
    allocated: u64,
    compressed: u64,
    fragmented: u64,
}

impl L2Findings {
    /// Reports the findings for one reference (statistics only for the active layer).
    pub(super) fn apply(&self, r: &mut CheckReport, stats: bool) {
        for m in &self.messages {
            if r.messages.len() > super::MAX_MESSAGES {
                break;
            }
            super::push_capped(&mut r.messages, super::MAX_MESSAGES, m.clone());
        }
        r.corruptions += self.corruptions;
        r.check_errors += self.check_errors;
        if stats {
            r.allocated_clusters += self.allocated;
            r.compressed_clusters += self.compressed;
            r.fragmented_clusters += self.fragmented;
        }
    }

    fn corruption(&mut self, msg: String) {
        self.corruptions += 1;
        super::push_capped(&mut self.messages, MAX_TABLE_MESSAGES, msg);
    }
}

impl Qcow2 {
    /// Checks one L2 table read in one piece, adding `times` references to each cluster it
    /// points to. Findings are returned rather than reported, to be replayed per reference.
    pub(super) fn check_l2(&mut self, l2: u64, refs: &mut Refs, times: u64) -> Result<L2Findings> {
        let mut f = L2Findings::default();
        let cs = self.layout.cluster_size();
        let table = if l2 % cs == 0 {
            self.read_l2_table(l2)
        } else {
            // An unaligned "table" is read where it points, bypassing the cache.
            let mut buf = vec![0u8; cs as usize];
            self.sread(l2, &mut buf).map(|()| buf)
        };
        let table = match table {
            Ok(t) => t,
            Err(_) => {
                f.check_errors += 1;
                f.messages
                    .push("ERROR: I/O error in check_refcounts_l2".to_string());
                return Ok(f);
            }
        };
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        // QEMU counts fragmentation within each L2 table.
        let mut next_contiguous = 0u64;
        for (i, p) in (0..table.len()).step_by(es).enumerate() {
            let e = L2Entry(BigEndian::read_u64(&table[p..]));
            let bm = if ext {
                BigEndian::read_u64(&table[p + 8..])
            } else {
                0
            };
            check_l2_entry(
                self.layout,
                i,
                e,
                bm,
                refs,
                times,
                &mut f,
                &mut next_contiguous,
            );
        }
        Ok(f)
    }
}

/// What `check` reports about L2 entry `i` of a table, judged on its own (the first message,
/// if any). `check` reports it once per L1 entry that reaches the table, so an operation that
/// makes one more table reach it would raise the count: the snapshot operations' pre-write
/// checks refuse such entries in the tables they walk.
pub(crate) fn l2_entry_corruption(
    layout: Layout,
    i: usize,
    e: L2Entry,
    bm: u64,
    file_len: u64,
) -> Option<String> {
    let mut refs = Refs::bounds_only(file_len, layout.cluster_bits);
    let mut f = L2Findings::default();
    check_l2_entry(layout, i, e, bm, &mut refs, 1, &mut f, &mut 0);
    if f.corruptions == 0 {
        return None;
    }
    f.messages.into_iter().next()
}

#[allow(clippy::too_many_arguments)]
fn check_l2_entry(
    layout: Layout,
    i: usize,
    e: L2Entry,
    bm: u64,
    refs: &mut Refs,
    times: u64,
    f: &mut L2Findings,
    next_contiguous: &mut u64,
) {
    let cs = layout.cluster_size();
    let ext = layout.extended_l2;
    let kind = e.kind(ext);
    if kind != ClusterKind::Compressed && e.0 & L2_STD_RESERVED != 0 {
        f.corruption(format!(
            "ERROR found l2 entry with reserved bits set: {:x}",
            e.0
        ));
    }
    match kind {
        ClusterKind::Compressed => {
            let shift = layout.csize_shift();
            if e.copied() {
                f.corruption(format!(
                    "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                    e.0 & ((1u64 << shift) - 1)
                ));
            }
            if bm != 0 {
                f.corruption(format!(
                    "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={:#x}",
                    e.0
                ));
                return;
            }
            let (s, end) = e.compressed_range(shift);
            if let Err(m) = refs.inc_by(s, end - s, times) {
                f.corruption(m);
            }
            f.allocated += 1;
            f.compressed += 1;
            f.fragmented += 1;
        }
        ClusterKind::Normal | ClusterKind::ZeroAlloc => {
            let off = e.offset();
            if (bm >> 32) & bm != 0 {
                f.corruption(format!(
                    "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if off % cs != 0 {
                let data = if ext {
                    bm & BITMAP_ALL_ALLOC != 0
                } else {
                    e.0 & OFLAG_ZERO == 0
                };
                f.corruption(format!(
                    "ERROR offset={off:x}: {} cluster is not properly aligned; L2 entry corrupted.",
                    if data { "Data" } else { "Preallocated" }
                ));
            }
            f.allocated += 1;
            if *next_contiguous != 0 && off != *next_contiguous {
                f.fragmented += 1;
            }
            *next_contiguous = off + cs;
            if let Err(m) = refs.inc_by(off, cs, times) {
                f.corruption(m);
            }
        }
        ClusterKind::Unallocated if bm & BITMAP_ALL_ALLOC != 0 => {
            f.corruption(
                "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
            );
        }
        _ => {}
    }
}
