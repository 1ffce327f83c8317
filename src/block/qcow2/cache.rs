//! A small write-through cache of metadata clusters (L2 tables, refcount blocks).
//!
//! Entries are whole clusters keyed by host offset. Updates are written to storage at once
//! (only the bytes that changed), so the cache never holds dirty data and a crash can only
//! lose what the caller had not yet written. A cluster that is freed must be dropped with
//! [`MetaCache::forget`] before its offset is reused.

use std::collections::VecDeque;

/// LRU of metadata clusters.
#[derive(Debug)]
pub struct MetaCache {
    entries: VecDeque<(u64, Vec<u8>)>,
    capacity: usize,
}

impl MetaCache {
    /// A cache holding at most `capacity` clusters.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// The cached cluster at `offset`, most recently used first.
    pub fn get(&mut self, offset: u64) -> Option<&mut Vec<u8>> {
        let pos = self.entries.iter().position(|(o, _)| *o == offset)?;
        if pos != 0 {
            let e = self.entries.remove(pos)?;
            self.entries.push_front(e);
        }
        self.entries.front_mut().map(|(_, d)| d)
    }

    /// Inserts a cluster, evicting the least recently used one.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>) -> &mut Vec<u8> {
        self.forget(offset);
        if self.entries.len() >= self.capacity {
            self.entries.pop_back();
        }
        self.entries.push_front((offset, data));
        &mut self.entries[0].1
    }

    /// Drops the cluster at `offset` (it was freed or rewritten elsewhere).
    pub fn forget(&mut self, offset: u64) {
        self.entries.retain(|(o, _)| *o != offset);
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
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
        c.forget(1);
        assert!(c.get(1).is_none());
    }
}
