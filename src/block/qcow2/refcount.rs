//! Reference counts and cluster allocation.
//!
//! ```text
//!  refcount table (u64 offsets) ──> refcount block (cluster_size*8/refcount_bits entries)
//!  cluster index c: table index c >> refblock_bits, block index c & (entries - 1)
//!  widths below 8 bits are packed LSB first within each byte; wider ones are big-endian
//! ```
//!
//! Ordering rules (crash safety): a new refcount block is written before the table entry that
//! points to it; a grown refcount table is written and flushed before the header points to
//! it, and the old table is freed only after that. Allocation raises the count before the
//! caller references the cluster; freeing happens after the reference is gone.
//!
//! Counts are written through, except inside a batch (`refbatch`): snapshot walks, discards
//! and multi-cluster allocations change whole blocks in memory and write each changed block
//! once, before anything that relies on the new counts is written.

use byteorder::{BigEndian, ByteOrder};

use super::header::OFF_REFTABLE;
use super::overlap::ol;
use super::refbatch::{DirtyBlock, DirtyBlocks};
use super::{corrupt, Qcow2, Qcow2Error};
use crate::block::Result;

/// Reads entry `idx` of a refcount block of width `1 << order` bits.
pub(crate) fn get_in_block(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[idx / per_byte];
            u64::from(byte >> ((idx % per_byte) * bits)) & ((1u64 << bits) - 1)
        }
        3 => u64::from(block[idx]),
        4 => u64::from(BigEndian::read_u16(&block[idx * 2..])),
        5 => u64::from(BigEndian::read_u32(&block[idx * 4..])),
        _ => BigEndian::read_u64(&block[idx * 8..]),
    }
}

/// Sets entry `idx`; returns the byte range that changed. `value` must fit the width.
pub(crate) fn set_in_block(block: &mut [u8], idx: usize, order: u32, value: u64) -> (usize, usize) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[idx / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
            (idx / per_byte, idx / per_byte + 1)
        }
        3 => {
            block[idx] = value as u8;
            (idx, idx + 1)
        }
        4 => {
            BigEndian::write_u16(&mut block[idx * 2..], value as u16);
            (idx * 2, idx * 2 + 2)
        }
        5 => {
            BigEndian::write_u32(&mut block[idx * 4..], value as u32);
            (idx * 4, idx * 4 + 4)
        }
        _ => {
            BigEndian::write_u64(&mut block[idx * 8..], value);
            (idx * 8, idx * 8 + 8)
        }
    }
}

impl Qcow2 {
    /// The refcount block at `offset`: the batch's copy while a batch holds it, else the
    /// cached (clean) one.
    fn load_refblock(&mut self, offset: u64) -> Result<&mut Vec<u8>> {
        if self.rb_dirty.as_ref().is_some_and(|d| d.contains(offset)) {
            return self
                .rb_dirty
                .as_mut()
                .and_then(|d| d.get_mut(offset))
                .map(|b| &mut b.data)
                .ok_or_else(|| corrupt("refcount batch lost an entry".into()));
        }
        if self.rb_cache.get(offset).is_none() {
            if offset % self.layout.cluster_size() != 0 {
                return Err(corrupt(format!(
                    "refcount block offset {offset:#x} is not aligned"
                )));
            }
            let mut buf = vec![0u8; self.layout.cluster_size() as usize];
            self.sread(offset, &mut buf)?;
            self.rb_cache.insert(offset, buf);
        }
        self.rb_cache
            .get(offset)
            .ok_or_else(|| corrupt("refcount cache lost an entry".into()))
    }

    /// A copy of the cached refcount block at `offset`, if it is cached.
    pub(crate) fn refblock_copy(&mut self, offset: u64) -> Option<Vec<u8>> {
        self.rb_cache.get(offset).cloned()
    }

    /// Moves the block at `offset` into the open batch (from the cache or storage).
    fn batch_refblock(&mut self, offset: u64) -> Result<&mut DirtyBlock> {
        if !self.rb_dirty.as_ref().is_some_and(|d| d.contains(offset)) {
            let data = self.load_refblock(offset)?.clone();
            self.rb_cache.forget(offset);
            if let Some(d) = self.rb_dirty.as_mut() {
                d.insert(offset, data);
            }
        }
        self.rb_dirty
            .as_mut()
            .and_then(|d| d.get_mut(offset))
            .ok_or_else(|| corrupt("refcount batch lost an entry".into()))
    }

    /// Opens a batch: until [`Qcow2::end_refcount_batch`], refcount changes stay in memory
    /// and reach storage with [`Qcow2::write_refcount_batch`] (allocations excepted: they are
    /// written before `alloc_clusters` returns).
    pub(crate) fn begin_refcount_batch(&mut self) {
        if self.rb_dirty.is_none() {
            self.rb_dirty = Some(DirtyBlocks::default());
        }
    }

    /// Runs `f` inside a refcount batch (the open one, or a new one written back when `f`
    /// succeeds and dropped when it fails).
    pub(crate) fn batched<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.rb_dirty.is_some() {
            return f(self);
        }
        self.begin_refcount_batch();
        let r = f(self);
        let end = self.end_refcount_batch(r.is_ok());
        let v = r?;
        end.map(|()| v)
    }

    /// Memory held by the open batch.
    pub(crate) fn refcount_batch_bytes(&self) -> usize {
        self.rb_dirty.as_ref().map_or(0, DirtyBlocks::bytes)
    }

    /// Writes every changed block of the open batch (one write of its changed range each,
    /// in offset order) and hands the blocks to the cache. On a write error the blocks not
    /// yet written are dropped, so that memory never holds counts storage does not have.
    pub(crate) fn write_refcount_batch(&mut self) -> Result<()> {
        let Some(d) = self.rb_dirty.as_mut() else {
            return Ok(());
        };
        for (off, b) in d.drain_sorted() {
            if let Some((lo, hi)) = b.range() {
                self.swrite_meta(ol::REFCOUNT_BLOCK, off + lo as u64, &b.data[lo..hi])?;
            }
            self.rb_cache.insert(off, b.data);
        }
        Ok(())
    }

    /// Closes the batch: writes it back when `ok`, else drops what it held.
    pub(crate) fn end_refcount_batch(&mut self, ok: bool) -> Result<()> {
        let r = if ok {
            self.write_refcount_batch()
        } else {
            Ok(())
        };
        self.rb_dirty = None;
        r
    }

    /// The stored refcount of host cluster `cluster` (0 where no block covers it).
    pub(crate) fn get_refcount(&mut self, cluster: u64) -> Result<u64> {
        let rt = (cluster >> self.layout.refblock_bits()) as usize;
        let Some(&block_off) = self.reftable.get(rt) else {
            return Ok(0);
        };
        let block_off = block_off & super::entry::REFT_OFFSET_MASK;
        if block_off == 0 {
            return Ok(0);
        }
        let idx = (cluster & (self.layout.refblock_entries() - 1)) as usize;
        let order = self.layout.refcount_order;
        let block = self.load_refblock(block_off)?;
        Ok(get_in_block(block, idx, order))
    }

    /// Sets the stored refcount of `cluster`, creating its refcount block if needed.
    pub(crate) fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let rt = cluster >> self.layout.refblock_bits();
        self.ensure_refblock(rt)?;
        let block_off = self.reftable[rt as usize] & super::entry::REFT_OFFSET_MASK;
        let idx = (cluster & (self.layout.refblock_entries() - 1)) as usize;
        let order = self.layout.refcount_order;
        if self.rb_dirty.is_some() {
            let block = self.batch_refblock(block_off)?;
            let (a, b) = set_in_block(&mut block.data, idx, order, value);
            block.touch(a, b);
        } else {
            self.overlap_check(ol::REFCOUNT_BLOCK, block_off, self.layout.cluster_size())?;
            let block = self.load_refblock(block_off)?;
            let (a, b) = set_in_block(block, idx, order, value);
            let bytes = block[a..b].to_vec();
            self.swrite_meta(ol::REFCOUNT_BLOCK, block_off + a as u64, &bytes)?;
        }
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
            // Runs may go back to freed space (QEMU lowers its free_cluster_index the same way).
            self.run_hint = self.run_hint.min(cluster);
            if let Some(d) = self.discards.as_mut() {
                d.add(cluster);
            }
            let host = cluster << self.layout.cluster_bits;
            self.l2_cache.forget(host);
            self.rb_cache.forget(host);
            if let Some(d) = self.rb_dirty.as_mut() {
                d.remove(host);
            }
            if matches!(self.decompressed, Some((o, _)) if self.layout.cluster_start(o) == host) {
                self.decompressed = None;
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of every cluster touching `[offset, offset + len)`.
    pub(crate) fn update_refcount(&mut self, offset: u64, len: u64, delta: i64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = self.layout.cluster_index(offset);
        let last = self.layout.cluster_index(offset + len - 1);
        for c in first..=last {
            self.add_refcount(c, delta)?;
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of cluster `c`; returns the new count.
    pub(crate) fn add_refcount(&mut self, c: u64, delta: i64) -> Result<u64> {
        let cur = self.get_refcount(c)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
                .filter(|v| *v <= self.layout.max_refcount())
                .ok_or(Qcow2Error::RefcountOverflow {
                    cluster: c,
                    bits: self.layout.refcount_bits(),
                })?
        } else {
            cur.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                corrupt(format!(
                    "refcount of cluster {:#x} would drop below zero",
                    c << self.layout.cluster_bits
                ))
            })?
        };
        self.set_refcount(c, new)?;
        Ok(new)
    }

    /// Drops one reference from every cluster of `[offset, offset + len)`.
    pub(crate) fn free_range(&mut self, offset: u64, len: u64) -> Result<()> {
        self.update_refcount(offset, len, -1)
    }

    /// Makes sure refcount table entry `rt` points at a refcount block, placing a new block
    /// inside its own range (no block means no cluster of that range is in use).
    /// Returns whether a block was created.
    fn ensure_refblock(&mut self, rt: u64) -> Result<bool> {
        let mut grew = false;
        if rt >= self.reftable.len() as u64 {
            // The new table is placed at the end of the image, possibly where the caller
            // was about to allocate: report the change so that it searches again.
            self.grow_reftable(rt + 1)?;
            grew = true;
        }
        if self.reftable[rt as usize] & super::entry::REFT_OFFSET_MASK != 0 {
            return Ok(grew);
        }
        let entries = self.layout.refblock_entries();
        let first = rt * entries;
        let block_cluster = first.max(if rt == 0 { 1 } else { first });
        let cs = self.layout.cluster_size();
        let mut block = vec![0u8; cs as usize];
        set_in_block(
            &mut block,
            (block_cluster - first) as usize,
            self.layout.refcount_order,
            1,
        );
        let off = block_cluster * cs;
        self.swrite_meta(ol::REFCOUNT_BLOCK, off, &block)?;
        self.rb_cache.insert(off, block);
        let mut b = [0u8; 8];
        BigEndian::write_u64(&mut b, off);
        self.swrite_meta(
            ol::REFCOUNT_TABLE,
            self.header.refcount_table_offset + rt * 8,
            &b,
        )?;
        self.reftable[rt as usize] = off;
        self.tables_changed();
        self.end_cluster = self.end_cluster.max(block_cluster + 1);
        Ok(true)
    }

    /// Grows the refcount table to at least `min_entries`.
    ///
    /// The new table and the refcount blocks describing its own clusters are placed at the end
    /// of the image and written first; after a flush one 12-byte header write switches to
    /// them; the old table is freed last. A crash before the switch leaves the old table.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.layout.cluster_size();
        let per_block = self.layout.refblock_entries();
        let entries_per_cluster = cs / 8;
        let mut want = min_entries.max(self.reftable.len() as u64 * 3 / 2).max(1);
        let start = self.end_cluster.max(
            self.layout.clusters_for(
                self.storage
                    .len()
                    .map_err(|e| crate::block::Error::io("image size", e))?,
            ),
        );
        let too_big = || -> crate::block::Error {
            Qcow2Error::InvalidTable {
                what: "Refcount table",
                offset: self.header.refcount_table_offset,
                reason: "would exceed QEMU's 8 MiB limit".into(),
            }
            .into()
        };
        let (rt_clusters, new_blocks) = loop {
            let rt_clusters = want.div_ceil(entries_per_cluster);
            // Before sizing anything by it: a damaged entry can ask for a huge table.
            if rt_clusters.saturating_mul(cs) > super::MAX_REFTABLE_BYTES {
                return Err(too_big());
            }
            // Blocks needed for [start, start + rt_clusters + m): iterate to a fixed point.
            let mut m = 0u64;
            let blocks = loop {
                let end = start + rt_clusters + m;
                let blocks: Vec<u64> = (start / per_block..=(end - 1) / per_block)
                    .filter(|&i| {
                        self.reftable
                            .get(i as usize)
                            .map_or(true, |e| e & super::entry::REFT_OFFSET_MASK == 0)
                    })
                    .collect();
                if blocks.len() as u64 == m {
                    break blocks;
                }
                m = blocks.len() as u64;
            };
            let end = start + rt_clusters + m;
            let need = ((end - 1) / per_block + 1).max(min_entries);
            if need <= rt_clusters * entries_per_cluster {
                break (rt_clusters, blocks);
            }
            want = need;
        };
        let area_end = start + rt_clusters + new_blocks.len() as u64;
        let mut table = self.reftable.clone();
        table.resize((rt_clusters * entries_per_cluster) as usize, 0);
        // New blocks, each counting the area's clusters in its range.
        for (k, &rt) in new_blocks.iter().enumerate() {
            let block_cluster = start + rt_clusters + k as u64;
            let mut block = vec![0u8; cs as usize];
            for c in start.max(rt * per_block)..area_end.min((rt + 1) * per_block) {
                set_in_block(
                    &mut block,
                    (c - rt * per_block) as usize,
                    self.layout.refcount_order,
                    1,
                );
            }
            let off = block_cluster * cs;
            self.swrite_meta(ol::REFCOUNT_BLOCK, off, &block)?;
            self.rb_cache.insert(off, block);
            table[rt as usize] = off;
        }
        // Area clusters covered by existing blocks get their counts there.
        for c in start..area_end {
            let rt = c / per_block;
            if !new_blocks.contains(&rt) {
                let old_len = self.reftable.len();
                debug_assert!((rt as usize) < old_len);
                let block_off = self.reftable[rt as usize] & super::entry::REFT_OFFSET_MASK;
                let order = self.layout.refcount_order;
                let block = self.load_refblock(block_off)?;
                let (a, b) = set_in_block(block, (c % per_block) as usize, order, 1);
                let bytes = block[a..b].to_vec();
                self.swrite_meta(ol::REFCOUNT_BLOCK, block_off + a as u64, &bytes)?;
            }
        }
        let mut raw = vec![0u8; (rt_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        let new_off = start * cs;
        self.swrite_meta(ol::REFCOUNT_TABLE, new_off, &raw)?;
        self.sflush()?;
        let mut hdr = [0u8; 12];
        BigEndian::write_u64(&mut hdr[0..8], new_off);
        BigEndian::write_u32(&mut hdr[8..12], rt_clusters as u32);
        self.swrite_meta(ol::MAIN_HEADER, OFF_REFTABLE, &hdr)?;
        self.sflush()?;
        let old_off = self.header.refcount_table_offset;
        let old_bytes = u64::from(self.header.refcount_table_clusters) * cs;
        self.header.refcount_table_offset = new_off;
        self.header.refcount_table_clusters = rt_clusters as u32;
        self.reftable = table;
        self.tables_changed();
        self.end_cluster = self.end_cluster.max(area_end);
        self.free_range(old_off, old_bytes)?;
        Ok(())
    }

    /// Finds `n` contiguous clusters with stored refcount 0 at or after `from`, reading each
    /// refcount block once.
    fn find_free_run(&mut self, from: u64, n: u64) -> Result<u64> {
        let rb = self.layout.refblock_bits();
        let order = self.layout.refcount_order;
        let mut start = from;
        let mut run = 0u64;
        let mut c = from;
        while run < n {
            let rt = (c >> rb) as usize;
            let block_end = ((rt as u64) + 1) << rb;
            let block_off =
                self.reftable.get(rt).copied().unwrap_or(0) & super::entry::REFT_OFFSET_MASK;
            if block_off == 0 {
                if run == 0 {
                    start = c;
                }
                run += block_end - c;
                c = block_end;
                continue;
            }
            let block = self.load_refblock(block_off)?;
            while c < block_end && run < n {
                let idx = (c - (block_end - (1 << rb))) as usize;
                if get_in_block(block, idx, order) == 0 {
                    if run == 0 {
                        start = c;
                    }
                    run += 1;
                } else {
                    run = 0;
                }
                c += 1;
            }
        }
        Ok(start)
    }

    /// Refuses, before an operation writes anything, when one of the next `n` clusters the
    /// allocator would hand out (stored refcount 0, from the lowest free one on) holds
    /// metadata: the allocation would be refused there, after the operation's earlier
    /// writes. (The allocator's run search may pass over some of them; this covers the
    /// clusters it tries first.) The refcount blocks that count the clusters the allocator
    /// may take must lie inside the file: a damaged refcount table entry can name one far
    /// past its end, where counts read as 0 and the allocation's refcount write fails (on a
    /// file, or creates one of terabytes) after the operation's earlier writes; `check`
    /// calls it "outside image".
    pub(crate) fn check_next_allocations(&mut self, n: u64) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let cs = self.layout.cluster_size();
        let rb = self.layout.refblock_bits();
        let file_len = self
            .storage
            .len()
            .map_err(|e| crate::block::Error::io("image size", e))?;
        let file_clusters = file_len.div_ceil(cs);
        let mut c = self.free_hint;
        let mut found = 0;
        let mut last_block = None;
        // Past the end of the file too: a damaged refcount table entry can name a block there.
        while found < n {
            if self.get_refcount(c)? == 0 {
                if found == 0 {
                    // Every cluster before this one is in use: later searches start here.
                    self.free_hint = c;
                }
                found += 1;
                // The allocator's own refusal, before the operation's first write.
                self.overlap_check(ol::DATA, c << cb, cs)?;
                if last_block != Some(c >> rb) {
                    last_block = Some(c >> rb);
                    self.check_refblock_inside(c >> rb, file_clusters, file_len)?;
                }
            }
            c += 1;
        }
        // A run the allocator does not find among those is found at the end of the file, at
        // the latest: the blocks counting the clusters there too.
        let last = c.max(file_clusters).saturating_add(n);
        for rt in (file_clusters >> rb)..=(last >> rb) {
            self.check_refblock_inside(rt, file_clusters, file_len)?;
        }
        Ok(())
    }

    /// Refuses when refcount block `rt` (if any) lies outside a file of `file_clusters`
    /// clusters, as `check` counts it ("refcount block … is outside image").
    fn check_refblock_inside(&self, rt: u64, file_clusters: u64, file_len: u64) -> Result<()> {
        let cb = self.layout.cluster_bits;
        let raw = self.reftable.get(rt as usize).copied().unwrap_or(0);
        let block = raw & super::entry::REFT_OFFSET_MASK;
        if block != 0 && block >> cb >= file_clusters {
            return Err(Qcow2Error::Refused(format!(
                "refcount block {rt} at {block:#x}, which counts clusters from {:#x} on \
                 where the allocation may go, lies beyond the end of the file ({file_len:#x})",
                (rt << self.layout.refblock_bits()) << cb
            ))
            .into());
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the host offset.
    ///
    /// Single clusters fill holes from the lowest free cluster on; runs are searched from the
    /// end of the previous run, so that large sequential writes stay linear.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let n = n.max(1);
        'search: loop {
            let from = if n > 1 {
                self.free_hint.max(self.run_hint)
            } else {
                self.free_hint
            };
            let start = self.find_free_run(from, n)?;
            // A cluster with refcount 0 that still holds metadata means damaged refcounts:
            // refuse before its count is written.
            let cb = self.layout.cluster_bits;
            self.overlap_check(ol::DATA, start << cb, n << cb)?;
            self.check_room(start, n)?;
            // Creating refcount blocks may take clusters of the run: check again if so.
            let rb = self.layout.refblock_bits();
            let mut created = false;
            for rt in (start >> rb)..=((start + n - 1) >> rb) {
                created |= self.ensure_refblock(rt)?;
            }
            if created {
                for c in start..start + n {
                    if self.get_refcount(c)? != 0 {
                        continue 'search;
                    }
                }
            }
            // One write per refcount block; the caller references the clusters next, so
            // their counts are written before this returns.
            self.batched(|q| {
                for c in start..start + n {
                    q.set_refcount(c, 1)?;
                }
                q.write_refcount_batch()
            })?;
            // Every cluster between the hint and a single-cluster result is in use.
            if start == self.free_hint || n == 1 {
                self.free_hint = start + n;
            }
            if n > 1 {
                self.run_hint = start + n;
            }
            self.end_cluster = self.end_cluster.max(start + n);
            if let Some(d) = self.discards.as_mut() {
                d.remove(start, n);
            }
            return Ok(start << self.layout.cluster_bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_widths_roundtrip() {
        for order in 0..=6u32 {
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let mut block = vec![0u8; 512];
            for i in 0..16 {
                set_in_block(&mut block, i, order, max - (i as u64 % 2).min(max));
            }
            for i in 0..16 {
                assert_eq!(
                    get_in_block(&block, i, order),
                    max - (i as u64 % 2).min(max)
                );
            }
            assert_eq!(get_in_block(&block, 16, order), 0);
        }
        // QEMU's 1-bit layout: entry i is bit (i % 8) of byte i / 8.
        let mut b = vec![0u8; 2];
        set_in_block(&mut b, 9, 0, 1);
        assert_eq!(b, [0, 2]);
    }
}
