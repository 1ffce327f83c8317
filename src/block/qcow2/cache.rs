//! A write-through cache of metadata clusters (L2 tables, refcount blocks).
//!
//! Entries are whole clusters keyed by host offset, evicted least recently used first
//! (O(log n) per access: an ordered map by offset, no hashing, and an ordered map by last
//! use that a run of accesses to the same cluster, as in a refcount walk, leaves alone). Updates are written
//! to storage at once (only the bytes that changed), so the cache never holds dirty data and a
//! crash can only lose what the caller had not yet written. A cluster that is freed must be
//! dropped with [`MetaCache::forget`] before its offset is reused.

use std::collections::BTreeMap;

/// Most L2 cache memory an image gets (QEMU's default maximum on Linux).
pub const MAX_L2_CACHE_BYTES: u64 = 32 << 20;

/// Most entries of one cache (bounds the bookkeeping for tiny clusters).
pub const MAX_CACHE_ENTRIES: u64 = 8192;

/// LRU of metadata clusters.
#[derive(Debug)]
pub struct MetaCache {
    /// Offset → (cluster, stamp of last use).
    entries: BTreeMap<u64, (Vec<u8>, u64)>,
    /// Stamp of last use → offset; the first entry is the least recently used.
    by_use: BTreeMap<u64, u64>,
    capacity: usize,
    clock: u64,
}

impl MetaCache {
    /// A cache holding at most `capacity` clusters.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            by_use: BTreeMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// Capacity in clusters of an L2 cache covering a disk that needs `l2_tables` tables
    /// (plus a few for the VM state area), within [`MAX_L2_CACHE_BYTES`].
    pub fn l2_capacity(l2_tables: u64, cluster_size: u64) -> usize {
        (l2_tables + 4)
            .min(MAX_L2_CACHE_BYTES / cluster_size.max(1))
            .clamp(4, MAX_CACHE_ENTRIES) as usize
    }

    /// Number of clusters held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached cluster at `offset` (now the most recently used).
    pub fn get(&mut self, offset: u64) -> Option<&mut Vec<u8>> {
        let e = self.entries.get_mut(&offset)?;
        if e.1 != self.clock {
            self.clock += 1;
            self.by_use.remove(&e.1);
            e.1 = self.clock;
            self.by_use.insert(self.clock, offset);
        }
        Some(&mut e.0)
    }

    /// Inserts a cluster, evicting the least recently used one when full.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>) -> &mut Vec<u8> {
        self.forget(offset);
        if self.entries.len() >= self.capacity {
            if let Some((_, old)) = self.by_use.pop_first() {
                self.entries.remove(&old);
            }
        }
        self.clock += 1;
        self.by_use.insert(self.clock, offset);
        &mut self.entries.entry(offset).or_insert((data, self.clock)).0
    }

    /// Takes the cluster at `offset` out of the cache.
    pub fn take(&mut self, offset: u64) -> Option<Vec<u8>> {
        let (data, stamp) = self.entries.remove(&offset)?;
        self.by_use.remove(&stamp);
        Some(data)
    }

    /// Drops the cluster at `offset` (it was freed or rewritten elsewhere).
    pub fn forget(&mut self, offset: u64) {
        self.take(offset);
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_use.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_oldest() {
        let mut c = MetaCache::new(2);
        c.insert(1, vec![1]);
        c.insert(2, vec![2]);
        assert!(c.get(1).is_some());
        c.insert(3, vec![3]);
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).unwrap()[0], 1);
        assert_eq!(c.take(1), Some(vec![1]));
        assert!(c.get(1).is_none());
        assert_eq!(c.len(), 1);
        c.insert(3, vec![4]);
        assert_eq!((c.len(), c.get(3).unwrap()[0]), (1, 4));
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn capacity_covers_the_image_within_bounds() {
        // 100 GiB with 64 KiB clusters: 200 tables (+4), well within 32 MiB.
        assert_eq!(MetaCache::l2_capacity(200, 65536), 204);
        // 2 MiB clusters: 32 MiB holds 16 tables.
        assert_eq!(MetaCache::l2_capacity(1000, 2 << 20), 16);
        // Tiny images still get a few; tiny clusters are bounded by entry count.
        assert_eq!(MetaCache::l2_capacity(0, 65536), 4);
        assert_eq!(
            MetaCache::l2_capacity(1 << 20, 512),
            MAX_CACHE_ENTRIES as usize
        );
    }
}
