//! Rebuilding the refcount structure (QEMU `rebuild_refcount_structure`), for `check -r all`
//! on an image whose refcount table itself is damaged: reserved bits in an entry, a refcount
//! block that is unaligned, outside the image or referenced twice.
//!
//! The stored counts cannot be repaired in place there (a repair would write through the
//! broken table), so a new structure is written from the counts the check computed:
//!
//! 1. new refcount blocks and a new refcount table are laid out *after everything*: past the
//!    end of the file and past every cluster the check counted, so that no byte of the image
//!    as it is, damaged parts included, is overwritten (QEMU fills free clusters inside the
//!    image first; appending keeps a crash at any point harmless, at the cost of a larger
//!    file until the old structure, now leaked, is reused);
//! 2. the blocks, then the table, are written and flushed;
//! 3. one 12-byte header write (`refcount_table_offset`, `refcount_table_clusters`) switches
//!    to the new structure, flushed.
//!
//! A crash before step 3 leaves the image as it was plus unreferenced clusters at its end; after
//! it, the image is consistent and the old structure is leaked, which the check that follows
//! the rebuild repairs (QEMU does the same). Nothing is written when a computed count does not
//! fit the image's refcount width.

use byteorder::{BigEndian, ByteOrder};

use super::super::header::OFF_REFTABLE;
use super::super::overlap::ol;
use super::super::refcount::set_in_block;
use super::super::{Qcow2, Qcow2Error};
use super::refs::Refs;
use crate::block::Result;

/// Where the new structure goes: its refcount blocks (by refcount table index) and its table.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// First cluster of the new structure.
    pub(super) start: u64,
    /// Refcount table indices that get a block, ascending; block `n` of the list is written
    /// at cluster `start + n`.
    pub(super) blocks: Vec<u64>,
    /// Clusters of the new refcount table, after the blocks.
    pub(super) table_clusters: u64,
}

impl Layout {
    /// One past the last cluster of the new structure.
    pub(super) fn end(&self) -> u64 {
        self.start + self.blocks.len() as u64 + self.table_clusters
    }

    /// First cluster of the new table.
    fn table_start(&self) -> u64 {
        self.start + self.blocks.len() as u64
    }
}

/// Lays out blocks for every refcount-table index whose range holds a non-zero count in
/// `counts` (cluster index → count), plus the new structure itself, placed from `start` on.
/// The structure counts itself, so this repeats until the number of blocks and table
/// clusters no longer changes.
pub(super) fn lay_out(counts: &[u64], start: u64, refblock_bits: u32, cluster_size: u64) -> Layout {
    let mut used: Vec<u64> = Vec::new();
    for (c, &n) in counts.iter().enumerate() {
        let rt = (c as u64) >> refblock_bits;
        if n != 0 && used.last() != Some(&rt) {
            used.push(rt);
        }
    }
    let mut layout = Layout {
        start,
        blocks: Vec::new(),
        table_clusters: 0,
    };
    loop {
        let mut blocks = used.clone();
        // The new structure's own clusters need counts too.
        let own_first = start >> refblock_bits;
        // The previous round's size (at least one cluster, in the first round).
        let own_len = (layout.end() - start).max(1);
        let own_last = (start + own_len - 1) >> refblock_bits;
        for rt in own_first..=own_last {
            if blocks.last().map_or(true, |&l| l < rt) {
                blocks.push(rt);
            }
        }
        let entries = blocks.last().map_or(1, |&l| l + 1);
        let table_clusters = (entries * 8).div_ceil(cluster_size);
        let next = Layout {
            start,
            blocks,
            table_clusters,
        };
        if next == layout {
            return layout;
        }
        layout = next;
    }
}

impl Qcow2 {
    /// Writes a new refcount structure holding the counts in `refs` and switches the header
    /// to it (see the module doc for the order). Returns the number of clusters written.
    ///
    /// # Errors
    /// A computed count too wide for the image's refcounts (nothing written), or an I/O
    /// error (the header still points to the old structure unless the error came after its
    /// write).
    pub(super) fn rebuild_refcounts(&mut self, refs: &Refs) -> Result<u64> {
        let cs = self.layout.cluster_size();
        let order = self.layout.refcount_order;
        let max = if order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        if let Some((c, &n)) = refs.counts.iter().enumerate().find(|(_, &n)| n > max) {
            return Err(Qcow2Error::Corrupt(format!(
                "cluster {c} is referenced {n} times, more than {}-bit refcounts can hold: \
                 the refcount structure cannot be rebuilt (nothing was written)",
                1u32 << order
            ))
            .into());
        }
        let file_len = self
            .storage
            .len()
            .map_err(|e| crate::block::Error::io("image size", e))?;
        let last_counted = refs
            .counts
            .iter()
            .rposition(|&n| n != 0)
            .map_or(0, |c| c + 1);
        let start = file_len.div_ceil(cs).max(last_counted as u64);
        let bits = self.layout.refblock_bits();
        let l = lay_out(&refs.counts, start, bits, cs);
        let per_block = self.layout.refblock_entries();
        let count_of = |c: u64| -> u64 {
            if c >= l.start && c < l.end() {
                1
            } else {
                refs.counts.get(c as usize).copied().unwrap_or(0)
            }
        };
        let entries = (l.table_clusters * cs / 8) as usize;
        let mut table = vec![0u64; entries];
        for (n, &rt) in l.blocks.iter().enumerate() {
            let mut block = vec![0u8; cs as usize];
            for i in 0..per_block {
                let v = count_of(rt * per_block + i);
                if v != 0 {
                    set_in_block(&mut block, i as usize, order, v);
                }
            }
            let off = (l.start + n as u64) * cs;
            // The new structure lies past everything in the image; only a damaged table
            // entry can point there, and it belongs to the structure being replaced.
            let both = ol::REFCOUNT_BLOCK | ol::REFCOUNT_TABLE;
            self.swrite_meta_as(both, ol::REFCOUNT_BLOCK, off, &block)?;
            table[rt as usize] = off;
        }
        let mut raw = vec![0u8; (l.table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        let table_off = l.table_start() * cs;
        let both = ol::REFCOUNT_BLOCK | ol::REFCOUNT_TABLE;
        self.swrite_meta_as(both, ol::REFCOUNT_TABLE, table_off, &raw)?;
        self.sflush()?;
        let mut hdr = [0u8; 12];
        BigEndian::write_u64(&mut hdr[0..8], table_off);
        BigEndian::write_u32(&mut hdr[8..12], l.table_clusters as u32);
        self.swrite_meta(ol::MAIN_HEADER, OFF_REFTABLE, &hdr)?;
        self.sflush()?;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = l.table_clusters as u32;
        self.reftable = table;
        self.rb_cache.clear();
        self.tables_changed();
        self.end_cluster = self.end_cluster.max(l.end());
        self.free_hint = self.free_hint.max(l.end());
        Ok(l.end() - l.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_covers_the_counts_and_itself() {
        // 64 KiB clusters, 16-bit refcounts: 32768 clusters per block.
        let bits = 15;
        let cs = 65536;
        let mut counts = vec![0u64; 100];
        counts[0] = 1;
        counts[5] = 2;
        let l = lay_out(&counts, 100, bits, cs);
        assert_eq!(l.blocks, vec![0]);
        assert_eq!(l.table_clusters, 1);
        assert_eq!((l.start, l.end()), (100, 102));

        // Counts in block 0 and block 3; the structure starts in block 3 and spills into 4.
        let start = 4 * 32768 - 1;
        let mut counts = vec![0u64; start as usize];
        counts[1] = 1;
        counts[3 * 32768 + 7] = 1;
        let l = lay_out(&counts, start, bits, cs);
        assert_eq!(l.blocks, vec![0, 3, 4]);
        assert_eq!(l.table_clusters, 1);
        assert_eq!(l.end(), start + 4);
    }

    #[test]
    fn a_table_of_many_blocks_takes_more_clusters() {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64 entries per table
        // cluster.
        let bits = 6;
        let cs = 512;
        let counts = vec![1u64; 64 * 100];
        let l = lay_out(&counts, 64 * 100, bits, cs);
        // 100 blocks for the counts, then the structure's own (102–104 clusters) needs 2 more.
        assert_eq!(l.blocks.len(), 102);
        assert_eq!(l.table_clusters, 2);
        let last = *l.blocks.last().unwrap();
        assert!(l.end() <= (last + 1) * 64, "{l:?}");
    }
}
