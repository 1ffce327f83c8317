//! Giving freed clusters back to the host, as QEMU's `pass-discard-snapshot=on` (its default)
//! does when snapshots are deleted or applied.
//!
//! While an operation runs under [`Qcow2::discarding`], every cluster whose refcount drops to
//! zero is remembered, and every cluster allocated again is forgotten (it holds new data).
//! When the operation has finished and its metadata is flushed, the remembered ranges are
//! punched out of the file. Only unreferenced clusters are ever punched, after nothing can
//! reference them any more, so a crash at any point leaves at most clusters that are leaked or
//! not yet punched. Discard is a hint: a file system that cannot punch holes keeps the bytes.

use super::Qcow2;
use crate::block::Result;

/// Freed cluster ranges `[start, end)` (cluster indices) waiting to be punched.
#[derive(Debug, Default)]
pub(crate) struct Discards {
    ranges: Vec<(u64, u64)>,
}

impl Discards {
    /// Remembers one freed cluster (frees mostly come in ascending runs: extend the last range).
    pub(crate) fn add(&mut self, cluster: u64) {
        if let Some(last) = self.ranges.last_mut() {
            if last.1 == cluster {
                last.1 += 1;
                return;
            }
            if (last.0..last.1).contains(&cluster) {
                return;
            }
        }
        self.ranges.push((cluster, cluster + 1));
    }

    /// Forgets `[start, start + n)`: those clusters were allocated again.
    pub(crate) fn remove(&mut self, start: u64, n: u64) {
        let end = start + n;
        if !self.ranges.iter().any(|&(a, b)| a < end && b > start) {
            return; // the common case while writing: fresh clusters past the freed ones
        }
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b <= start || a >= end {
                kept.push((a, b));
                continue;
            }
            if a < start {
                kept.push((a, start));
            }
            if b > end {
                kept.push((end, b));
            }
        }
        self.ranges = kept;
    }

    /// The ranges sorted and merged.
    pub(crate) fn merged(mut self) -> Vec<(u64, u64)> {
        self.ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for (a, b) in self.ranges {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }
}

impl Qcow2 {
    /// Runs `f`, then punches the clusters it freed (and did not reuse) out of the file once
    /// everything `f` wrote is flushed. Nothing is punched if `f` fails. Inside an open
    /// scope ([`Qcow2::begin_discard_scope`]) the scope's end does the punching.
    pub(crate) fn discarding<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.discards.is_some() {
            return f(self);
        }
        self.discards = Some(Discards::default());
        let r = f(self);
        let v = r.inspect_err(|_| self.discards = None)?;
        self.end_discard_scope(true)?;
        Ok(v)
    }

    /// Starts collecting freed clusters (no effect if a scope is open already).
    pub(crate) fn begin_discard_scope(&mut self) {
        if self.discards.is_none() {
            self.discards = Some(Discards::default());
        }
    }

    /// Closes the scope: with `punch`, flushes and punches what was freed and not reused.
    pub(crate) fn end_discard_scope(&mut self, punch: bool) -> Result<()> {
        let Some(freed) = self.discards.take() else {
            return Ok(());
        };
        if !punch {
            return Ok(());
        }
        self.sflush()?;
        let bits = self.layout.cluster_bits;
        for (a, b) in freed.merged() {
            // Optional, as in QEMU: a failed discard only keeps the bytes allocated.
            let _ = self.storage.discard(a << bits, (b - a) << bits);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_grow_merge_and_lose_reallocated_clusters() {
        let mut d = Discards::default();
        for c in [10, 11, 12, 3, 4, 12, 20] {
            d.add(c);
        }
        d.add(5);
        d.remove(11, 1);
        d.remove(19, 5);
        assert_eq!(d.merged(), vec![(3, 6), (10, 11), (12, 13)]);
        let mut d = Discards::default();
        d.add(7);
        d.add(6);
        d.add(8);
        assert_eq!(d.merged(), vec![(6, 9)]);
    }
}
