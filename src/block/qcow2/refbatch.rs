//! Refcount blocks changed in memory during a metadata walk and written back together.
//!
//! ```text
//!  walk: +1/−1 on many clusters ──> DirtyBlocks (whole blocks, one changed byte range each)
//!  write_back: one write per block, lowest offset first ──> clean blocks go to the LRU cache
//! ```
//!
//! A snapshot walk changes the counts of every cluster a table reaches; written through, that
//! is one small write per cluster. While a batch is open the changed blocks stay here instead,
//! and the walk writes them back before any table whose flags rely on the new counts (see
//! `snapshot.rs`). Writing a batch back early is always allowed: it is the same state the
//! write-through path would have reached at that point of the walk.

use std::collections::BTreeMap;

/// One refcount block held while a batch is open.
#[derive(Debug)]
pub(crate) struct DirtyBlock {
    /// The whole block.
    pub(crate) data: Vec<u8>,
    /// Changed byte range `lo..hi` (empty when `lo >= hi`).
    lo: usize,
    hi: usize,
}

impl DirtyBlock {
    /// A block with nothing changed yet.
    pub(crate) fn new(data: Vec<u8>) -> Self {
        Self {
            lo: usize::MAX,
            hi: 0,
            data,
        }
    }

    /// Records that bytes `a..b` changed.
    pub(crate) fn touch(&mut self, a: usize, b: usize) {
        self.lo = self.lo.min(a);
        self.hi = self.hi.max(b);
    }

    /// The changed range, if any.
    pub(crate) fn range(&self) -> Option<(usize, usize)> {
        (self.lo < self.hi).then_some((self.lo, self.hi))
    }
}

/// The blocks of an open batch, keyed by host offset.
#[derive(Debug, Default)]
pub(crate) struct DirtyBlocks {
    /// By offset; a walk holds few blocks, and an ordered map needs no hashing per count.
    blocks: BTreeMap<u64, DirtyBlock>,
    bytes: usize,
}

impl DirtyBlocks {
    /// True when the block at `offset` is held here.
    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.blocks.contains_key(&offset)
    }

    /// The block at `offset` for changing, if held.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut DirtyBlock> {
        self.blocks.get_mut(&offset)
    }

    /// Starts holding `data` as the block at `offset`.
    pub(crate) fn insert(&mut self, offset: u64, data: Vec<u8>) -> &mut DirtyBlock {
        self.bytes += data.len();
        self.blocks
            .entry(offset)
            .or_insert_with(|| DirtyBlock::new(data))
    }

    /// Stops holding the block at `offset` (its cluster was freed).
    pub(crate) fn remove(&mut self, offset: u64) {
        if let Some(b) = self.blocks.remove(&offset) {
            self.bytes -= b.data.len();
        }
    }

    /// Bytes held (memory bound for the caller).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes every block out, lowest offset first.
    pub(crate) fn drain_sorted(&mut self) -> Vec<(u64, DirtyBlock)> {
        self.bytes = 0;
        std::mem::take(&mut self.blocks).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_order() {
        let mut d = DirtyBlocks::default();
        d.insert(0x30000, vec![0; 16]).touch(4, 6);
        d.get_mut(0x30000).unwrap().touch(10, 12);
        d.insert(0x10000, vec![0; 16]);
        assert_eq!(d.bytes(), 32);
        assert!(d.contains(0x10000));
        assert_eq!(d.get_mut(0x30000).unwrap().range(), Some((4, 12)));
        assert_eq!(d.get_mut(0x10000).unwrap().range(), None);
        let v = d.drain_sorted();
        assert_eq!(
            v.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [0x10000, 0x30000]
        );
        assert_eq!(d.bytes(), 0);
        d.insert(1, vec![0; 8]);
        d.remove(1);
        assert!(!d.contains(1));
        assert_eq!(d.bytes(), 0);
    }
}
