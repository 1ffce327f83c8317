//! L1, L2 and extended-L2 table entries.

/// Host offset mask of L1 and standard L2 entries: bits 9..=55.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset mask of refcount table entries: bits 9..=63 (QEMU's `REFT_OFFSET_MASK`; the
/// top bits that L1 and L2 entries reserve are part of the offset here, so a damaged entry
/// with one set points far past the end of the file, as QEMU and `check` read it).
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one (only meaningful in the active tables).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeroes (version 3).
pub const OFLAG_ZERO: u64 = 1;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry that must be zero (QEMU's
/// `L2E_STD_RESERVED_MASK`).
pub const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Extended L2 bitmap: every subcluster allocated.
pub const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Extended L2 bitmap: every subcluster reads as zero.
pub const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// Entries compared at once by [`skip_zero_block`].
const ZERO_BLOCK: usize = 64;

/// The index of the first entry of `table` at or after `i` that may be non-zero: when entry
/// `i` is zero, whole blocks of zero entries from `i` on are skipped, each tested with one
/// comparison (the entries are OR-ed together, which the coverage instrumentation does not
/// trace; a `memcmp` would be traced, and fed to the fuzzer's dictionary, at every call).
/// A table that lies mostly past the end of the file (read as zeroes) has hundreds of
/// thousands of zero entries, which every walk skips; comparing them one at a time costs
/// most of a check in the fuzz build.
pub(crate) fn skip_zero_block(table: &[u64], mut i: usize) -> usize {
    // A non-zero entry first: dense tables pay one comparison per entry, as before.
    if table.get(i) != Some(&0) {
        return i;
    }
    while let Some(block) = table.get(i..i.saturating_add(ZERO_BLOCK)) {
        let Ok(block) = <&[u64; ZERO_BLOCK]>::try_from(block) else {
            break;
        };
        if block.iter().fold(0, |acc, &e| acc | e) != 0 {
            break;
        }
        i += ZERO_BLOCK;
    }
    i
}

/// The entries of `table` with their indexes, in order, less blocks of zero entries (see
/// [`skip_zero_block`]): every non-zero entry is yielded, and some zero ones.
pub(crate) fn entries_skipping_zero_blocks(
    table: &[u64],
) -> impl Iterator<Item = (usize, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        i = skip_zero_block(table, i);
        let e = *table.get(i)?;
        i += 1;
        Some((i - 1, e))
    })
}

/// An L1 entry.
///
/// ```text
///  bit 63      COPIED: the L2 table's refcount is exactly one
///  bits 9..=55 host offset of the L2 table (0: not allocated)
///  other       reserved, 0
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Host offset of the L2 table, 0 if none.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// An entry pointing at `l2_offset`.
    pub fn new(l2_offset: u64, copied: bool) -> Self {
        L1Entry(l2_offset | if copied { OFLAG_COPIED } else { 0 })
    }
}

/// What a (sub)cluster reads as, from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated: reads from the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes, no host cluster.
    ZeroPlain,
    /// Reads as zeroes, host cluster still allocated (reused by the next write).
    ZeroAlloc,
    /// Data at the host offset.
    Normal,
    /// Compressed data.
    Compressed,
}

/// A standard L2 entry (the first 64 bits of an extended one).
///
/// ```text
///  bit 63      COPIED
///  bit 62      compressed
///  standard:   bits 9..=55 host offset; bit 0 "reads as zero" (v3, not with extended L2)
///  compressed: bits 0..x-1 host byte offset, bits x..=61 additional 512-byte sectors,
///              x = 62 - (cluster_bits - 8)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// Compressed flag.
    pub fn compressed(self) -> bool {
        self.0 & OFLAG_COMPRESSED != 0
    }
    /// Host offset of a standard entry.
    pub fn offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// The kind of a standard (non-extended) entry.
    pub fn kind(self, extended: bool) -> ClusterKind {
        if self.compressed() {
            ClusterKind::Compressed
        } else if !extended && self.0 & OFLAG_ZERO != 0 {
            if self.offset() != 0 {
                ClusterKind::ZeroAlloc
            } else {
                ClusterKind::ZeroPlain
            }
        } else if self.offset() == 0 {
            ClusterKind::Unallocated
        } else {
            ClusterKind::Normal
        }
    }
    /// Host byte range `[start, end)` of a compressed cluster's data.
    pub fn compressed_range(self, csize_shift: u32) -> (u64, u64) {
        let offset_mask = (1u64 << csize_shift) - 1;
        let start = self.0 & offset_mask;
        let sectors = ((self.0 & !OFLAG_COPIED & !OFLAG_COMPRESSED) >> csize_shift) + 1;
        let end = (start & !511) + sectors * 512;
        (start, end)
    }
}

/// The kind of one subcluster from an extended L2 entry and its bitmap.
pub fn subcluster_kind(entry: L2Entry, bitmap: u64, sc: u32) -> ClusterKind {
    if entry.compressed() {
        return ClusterKind::Compressed;
    }
    let alloc = bitmap & (1 << sc) != 0;
    let zero = bitmap & (1 << (32 + sc)) != 0;
    if zero {
        ClusterKind::ZeroPlain
    } else if alloc && entry.offset() != 0 {
        ClusterKind::Normal
    } else {
        ClusterKind::Unallocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(L2Entry(0).kind(false), ClusterKind::Unallocated);
        assert_eq!(L2Entry(1).kind(false), ClusterKind::ZeroPlain);
        assert_eq!(L2Entry(0x10000 | 1).kind(false), ClusterKind::ZeroAlloc);
        assert_eq!(
            L2Entry(0x10000 | OFLAG_COPIED).kind(false),
            ClusterKind::Normal
        );
        assert_eq!(
            L2Entry(OFLAG_COMPRESSED | 5).kind(false),
            ClusterKind::Compressed
        );
        let e = L2Entry(0x10000);
        assert_eq!(subcluster_kind(e, 1, 0), ClusterKind::Normal);
        assert_eq!(subcluster_kind(e, 1, 1), ClusterKind::Unallocated);
        assert_eq!(subcluster_kind(e, 1 << 33, 1), ClusterKind::ZeroPlain);
    }

    #[test]
    fn compressed_range() {
        // 64 KiB clusters: csize_shift = 54; 2 extra sectors at byte offset 0x1234.
        let e = L2Entry(OFLAG_COMPRESSED | (2 << 54) | 0x1234);
        assert_eq!(e.compressed_range(54), (0x1234, 0x1200 + 3 * 512));
    }
}

#[cfg(test)]
mod zero_block_tests {
    use super::*;

    #[test]
    fn skipping_zero_blocks_yields_every_non_zero_entry_in_order() {
        for len in [0usize, 1, 63, 64, 65, 200, 1000] {
            for nonzero in [
                vec![],
                vec![0],
                vec![len / 2],
                vec![0, 63, 64, 130],
                vec![len.saturating_sub(1)],
            ] {
                let mut t = vec![0u64; len];
                for &i in &nonzero {
                    if i < len {
                        t[i] = i as u64 + 1;
                    }
                }
                let got: Vec<(usize, u64)> = entries_skipping_zero_blocks(&t)
                    .filter(|&(_, e)| e != 0)
                    .collect();
                let want: Vec<(usize, u64)> = t
                    .iter()
                    .copied()
                    .enumerate()
                    .filter(|&(_, e)| e != 0)
                    .collect();
                assert_eq!(got, want, "len {len}, non-zero at {nonzero:?}");
                for (i, e) in entries_skipping_zero_blocks(&t) {
                    assert_eq!(t[i], e);
                }
                assert_eq!(skip_zero_block(&t, len), len);
                if let Some(&first) = want.first() {
                    assert!(skip_zero_block(&t, 0) <= first.0);
                } else {
                    // Whole blocks skipped; the rest is left to the caller.
                    let i = skip_zero_block(&t, 0);
                    assert!(
                        i <= len && len - i < ZERO_BLOCK,
                        "len {len}: stopped at {i}"
                    );
                }
            }
        }
    }
}
