//! Reference counts per host cluster for the preflight of a snapshot operation, in dense
//! arrays indexed by cluster.
//!
//! ```text
//!  tables: L2 table cluster → (references from every L1 table, from the one that gets +1,
//!          name of the walked L1 table that reaches it)          (one entry per L1 entry read)
//!  all[c]    references every table holds to cluster c           u32, saturating
//!  inc[c]    references the operation adds to c                  u32 (create, goto)
//!  walked    clusters the operation changes, one bit each
//! ```
//!
//! The arrays cover the clusters of the file and a margin of three (compressed data that
//! starts inside the file may end up to two clusters past it): 4 + 4 + 1/8 bytes per cluster
//! of the file, sized from the file and nothing else (`qemu-img check` keeps 2 bytes per
//! cluster). A reference beyond them is to a cluster outside the file: not counted (no table
//! walked here can reach one; the preflight refuses those entries first).
//!
//! Dense arrays instead of hash maps: a snapshot walk on a 100 GiB image touches ~65,000
//! clusters several times, and hashing every count cost more than the snapshot operation
//! itself (issue 11, `snapshot -c` at 2× qemu-img).

use std::collections::BTreeMap;

/// How a walked L1 table's references count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Its clusters change and get +1 (create: the active table; goto: the snapshot's).
    Inc,
    /// Its clusters change (−1 or COPIED flags) but get nothing added.
    Walked,
}

/// The references to one L2 table.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TableRefs {
    /// L1 entries of every table that name it.
    pub(crate) all: u32,
    /// L1 entries of the table that gets +1 that name it.
    pub(crate) inc: u32,
    /// The walked L1 table that reaches it first, if any.
    pub(crate) from: Option<&'static str>,
}

/// The counts of one preflight.
#[derive(Debug)]
pub(crate) struct Tally {
    cluster_bits: u32,
    all: Vec<u32>,
    inc: Vec<u32>,
    walked: Vec<u64>,
    tables: BTreeMap<u64, TableRefs>,
}

impl Tally {
    /// Counts for a file of `file_len` bytes; `with_inc` when the operation adds references.
    pub(crate) fn new(file_len: u64, cluster_bits: u32, with_inc: bool) -> Self {
        let n = usize::try_from(file_len.div_ceil(1 << cluster_bits) + 3).unwrap_or(usize::MAX);
        Tally {
            cluster_bits,
            all: vec![0; n],
            inc: if with_inc { vec![0; n] } else { Vec::new() },
            walked: vec![0; n.div_ceil(64)],
            tables: BTreeMap::new(),
        }
    }

    /// One L1 entry of a walked table (already validated) names the L2 table at host
    /// cluster `c`.
    pub(crate) fn walked_table(&mut self, c: u64, role: Role, from: &'static str) {
        let t = self.tables.entry(c).or_default();
        if role == Role::Inc {
            t.inc = t.inc.saturating_add(1);
        }
        t.from.get_or_insert(from);
    }

    /// One L1 entry of any table (walked or not) names the L2 table at host cluster `c`.
    pub(crate) fn any_table(&mut self, c: u64) {
        let t = self.tables.entry(c).or_default();
        t.all = t.all.saturating_add(1);
    }

    /// The L2 tables named so far, lowest offset first, with their references; the
    /// references to the table clusters themselves are counted here.
    pub(crate) fn take_tables(&mut self) -> Vec<(u64, TableRefs)> {
        let tables = std::mem::take(&mut self.tables);
        for (&c, t) in &tables {
            self.add(c, t.all, t.inc, t.from.is_some());
        }
        tables.into_iter().collect()
    }

    /// Adds `all` references from every table and `inc` from the one that gets +1 to
    /// cluster `c`, and marks it walked when `walked`.
    pub(crate) fn add(&mut self, c: u64, all: u32, inc: u32, walked: bool) {
        let Some(v) = usize::try_from(c).ok().and_then(|i| self.all.get_mut(i)) else {
            return;
        };
        *v = v.saturating_add(all);
        let i = c as usize;
        if let Some(v) = self.inc.get_mut(i) {
            *v = v.saturating_add(inc);
        }
        if walked {
            if let Some(w) = self.walked.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
    }

    /// Every cluster from the first of `[start, end)` to the last gets [`Tally::add`].
    pub(crate) fn add_range(&mut self, start: u64, end: u64, all: u32, inc: u32, walked: bool) {
        let cb = self.cluster_bits;
        for c in start >> cb..=(end.max(start + 1) - 1) >> cb {
            self.add(c, all, inc, walked);
        }
    }

    /// References every table holds to `c` (`None`: too many to count in 32 bits).
    pub(crate) fn all(&self, c: u64) -> Option<u64> {
        let v = usize::try_from(c)
            .ok()
            .and_then(|i| self.all.get(i))
            .copied()
            .unwrap_or(0);
        (v != u32::MAX).then_some(u64::from(v))
    }

    /// References the operation adds to `c`.
    pub(crate) fn inc(&self, c: u64) -> u64 {
        usize::try_from(c)
            .ok()
            .and_then(|i| self.inc.get(i))
            .map_or(0, |&v| u64::from(v))
    }

    /// The walked clusters, ascending.
    pub(crate) fn walked(&self) -> impl Iterator<Item = u64> + '_ {
        self.walked.iter().enumerate().flat_map(|(k, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(k as u64 * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_tables_then_data_and_lists_walked_clusters_in_order() {
        // 64 KiB clusters, a file of 10 clusters: arrays of 13.
        let mut t = Tally::new(10 << 16, 16, true);
        t.walked_table(5, Role::Inc, "the active L1 table");
        t.any_table(5);
        t.any_table(5);
        t.any_table(7);
        let tables = t.take_tables();
        assert_eq!(tables.len(), 2);
        assert_eq!((tables[0].0, tables[0].1.all, tables[0].1.inc), (5, 2, 1));
        assert_eq!(tables[1].1.from, None);
        t.add(9, 2, 1, true);
        t.add_range(0x1_0000 * 2 + 0x100, 0x1_0000 * 4, 1, 0, true);
        t.add(13, 1, 1, true);
        t.add(1 << 40, 1, 1, true);
        assert_eq!(t.walked().collect::<Vec<_>>(), [2, 3, 5, 9]);
        assert_eq!(
            (t.all(5), t.inc(5), t.all(7), t.inc(7)),
            (Some(2), 1, Some(1), 0)
        );
        assert_eq!((t.all(3), t.inc(3), t.all(1 << 40)), (Some(1), 0, Some(0)));
        assert_eq!((t.all(12), t.all(13)), (Some(0), Some(0)));
        t.add(4, u32::MAX, 0, false);
        assert_eq!(t.all(4), None);
    }
}
