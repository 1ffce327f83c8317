//! In-memory reference counts (QEMU's `qcow2_inc_refcounts_imrt`) and the stored counts read
//! back in order.

use super::super::entry::OFFSET_MASK;
use super::super::refcount::get_in_block;
use super::super::Qcow2;
use crate::block::Result;

/// Computed reference counts, one per cluster of the file plus one: QEMU accepts a
/// reference that reaches less than one cluster past the end of the file (the last
/// cluster may be partly allocated).
pub(super) struct Refs {
    pub(super) counts: Vec<u64>,
    cluster_bits: u32,
    file_len: u64,
}

impl Refs {
    pub(super) fn new(file_len: u64, cluster_bits: u32) -> Self {
        let cs = 1u64 << cluster_bits;
        Refs {
            counts: vec![0; file_len.div_ceil(cs) as usize + 1],
            cluster_bits,
            file_len,
        }
    }

    /// No counts, only the file's bounds: [`Refs::inc`] reports what it would report and
    /// counts nothing (checking single entries before a write).
    pub(super) fn bounds_only(file_len: u64, cluster_bits: u32) -> Self {
        Refs {
            counts: Vec::new(),
            cluster_bits,
            file_len,
        }
    }

    /// Adds one reference to every cluster of `[off, off + len)`.
    ///
    /// # Errors
    /// QEMU's message when the region reaches one cluster or more past the end of the file.
    pub(super) fn inc(&mut self, off: u64, len: u64) -> std::result::Result<(), String> {
        self.inc_by(off, len, 1)
    }

    /// True when `[off, off + len)` ends less than one cluster past the end of the file.
    pub(super) fn fits(&self, off: u64, len: u64) -> bool {
        let cs = 1u64 << self.cluster_bits;
        len == 0
            || off
                .checked_add(len)
                .is_some_and(|end| end < self.file_len.saturating_add(cs))
    }

    /// Adds `n` references to every cluster of `[off, off + len)`.
    ///
    /// # Errors
    /// As [`Refs::inc`].
    pub(super) fn inc_by(&mut self, off: u64, len: u64, n: u64) -> std::result::Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        if !self.fits(off, len) {
            return Err(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for c in first..=last {
            if let Some(v) = self.counts.get_mut(c as usize) {
                *v = v.saturating_add(n);
            }
        }
        Ok(())
    }

    /// The computed count of the cluster at host offset `off`.
    pub(super) fn at(&self, off: u64) -> u64 {
        self.counts
            .get((off >> self.cluster_bits) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Clusters to compare: the file's, and the one past its end only when referenced
    /// (QEMU grows its array only then).
    pub(super) fn compared(&self) -> &[u64] {
        match self.counts.split_last() {
            Some((0, rest)) => rest,
            _ => &self.counts,
        }
    }
}

/// Stored refcounts read in order, one refcount block at a time.
#[derive(Default)]
pub(super) struct StoredCounts {
    /// Refcount table index of `block`, and a copy of that block.
    block: Option<(usize, Vec<u8>)>,
}

impl StoredCounts {
    /// The stored refcount of cluster `c`.
    ///
    /// # Errors
    /// When the refcount block cannot be read (unaligned: QEMU cannot read it either).
    pub(super) fn get(&mut self, q: &mut Qcow2, c: u64) -> Result<u64> {
        let rt = (c >> q.layout.refblock_bits()) as usize;
        if self.block.as_ref().map(|(b, _)| *b) != Some(rt) {
            self.block = None;
            let raw = q.reftable.get(rt).copied().unwrap_or(0);
            let off = raw & OFFSET_MASK;
            if off == 0 || off != raw & !0x1ff {
                return stored_refcount(q, c);
            }
            // Through the refcount cache first: a bad block is reported as before.
            let v = stored_refcount(q, c)?;
            match q.refblock_copy(off) {
                Some(d) => self.block = Some((rt, d)),
                None => return Ok(v),
            }
        }
        let data = self.block.as_ref().map_or(&[][..], |(_, d)| &d[..]);
        let idx = (c & (q.layout.refblock_entries() - 1)) as usize;
        Ok(get_in_block(data, idx, q.layout.refcount_order))
    }

    /// Drops the copy (the block was just changed).
    pub(super) fn forget(&mut self) {
        self.block = None;
    }
}

/// The stored refcount of cluster `c` as QEMU's `qcow2_get_refcount` reads it: the
/// refcount table entry's offset is every bit but the 9 reserved ones; an offset past what a
/// file can hold (bit 63) fails with an I/O error, one past the end of the file reads as
/// zeroes, an unaligned one fails.
///
/// # Errors
/// Those failures, and I/O errors.
pub(super) fn stored_refcount(q: &mut Qcow2, c: u64) -> Result<u64> {
    let rt = (c >> q.layout.refblock_bits()) as usize;
    let raw = q.reftable.get(rt).copied().unwrap_or(0);
    let off = raw & !0x1ff;
    if off > i64::MAX as u64 - q.layout.cluster_size() {
        return Err(crate::block::Error::io(
            format!("refcount block at {off:#x}"),
            std::io::Error::from_raw_os_error(5),
        ));
    }
    if off != raw & OFFSET_MASK {
        // Bits 56-62: far past the end of any file, reads as zeroes.
        return Ok(0);
    }
    q.get_refcount(c)
}
