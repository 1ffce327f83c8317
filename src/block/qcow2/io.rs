//! Guest reads and writes: L1/L2 lookup, copy-on-write, zero and discard.
//!
//! Write ordering for one cluster (crash safety): allocate (refcount 1 on disk) → write the
//! data → point the L2 entry at it → drop the reference the entry held before. A new or copied
//! L2 table is written in full before the L1 entry points to it.

use byteorder::{BigEndian, ByteOrder};

use super::entry::{
    subcluster_kind, ClusterKind, L1Entry, L2Entry, BITMAP_ALL_ALLOC, BITMAP_ALL_ZEROES,
    L1_RESERVED, OFLAG_COPIED, OFLAG_ZERO,
};
use super::overlap::ol;
use super::{corrupt, Qcow2, Qcow2Error};
use crate::block::{DetachedRun, Result};

/// How much VM state is written between two writeback kicks.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl Qcow2 {
    pub(crate) fn load_l2(&mut self, offset: u64) -> Result<&mut Vec<u8>> {
        if self.l2_cache.get(offset).is_none() {
            if offset % self.layout.cluster_size() != 0 {
                return Err(corrupt(format!(
                    "L2 table offset {offset:#x} is not aligned"
                )));
            }
            let mut buf = vec![0u8; self.layout.cluster_size() as usize];
            self.sread(offset, &mut buf)?;
            self.l2_cache.insert(offset, buf);
        }
        self.l2_cache
            .get(offset)
            .ok_or_else(|| corrupt("L2 cache lost an entry".into()))
    }

    /// A copy of a whole L2 table for a walk over many tables, read in one piece and kept
    /// in the cache (sized to cover the disk, so a second walk over the same tables, as in
    /// snapshot delete or check, reads nothing again).
    pub(crate) fn read_l2_table(&mut self, l2: u64) -> Result<Vec<u8>> {
        self.load_l2(l2).map(|t| t.clone())
    }

    /// The L2 table at `l2` taken out of the cache (read first when not cached), for a walk
    /// that changes it and writes it back, or hands it back with [`Qcow2::return_l2_table`]
    /// (no copy of the table either way).
    pub(crate) fn take_l2_table(&mut self, l2: u64) -> Result<Vec<u8>> {
        self.load_l2(l2)?;
        self.l2_cache
            .take(l2)
            .ok_or_else(|| corrupt("L2 cache lost an entry".into()))
    }

    /// Puts an unchanged table taken with [`Qcow2::take_l2_table`] back into the cache.
    pub(crate) fn return_l2_table(&mut self, l2: u64, table: Vec<u8>) {
        self.l2_cache.insert(l2, table);
    }

    /// Reads entry `idx` (and its bitmap with extended L2) of the L2 table at `l2`.
    pub(crate) fn l2_get(&mut self, l2: u64, idx: u64) -> Result<(L2Entry, u64)> {
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        let t = self.load_l2(l2)?;
        let p = idx as usize * es;
        let e = BigEndian::read_u64(&t[p..]);
        let bm = if ext {
            BigEndian::read_u64(&t[p + 8..])
        } else {
            0
        };
        Ok((L2Entry(e), bm))
    }

    /// Writes entry `idx` of the L2 table at `l2` through to storage.
    pub(crate) fn l2_set(&mut self, l2: u64, idx: u64, e: L2Entry, bitmap: u64) -> Result<()> {
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        let p = idx as usize * es;
        self.overlap_check(ol::ACTIVE_L2, l2 + p as u64, es as u64)?;
        let t = self.load_l2(l2)?;
        BigEndian::write_u64(&mut t[p..], e.0);
        if ext {
            BigEndian::write_u64(&mut t[p + 8..], bitmap);
        }
        let bytes = t[p..p + es].to_vec();
        self.swrite_meta(ol::ACTIVE_L2, l2 + p as u64, &bytes)
    }

    /// Writes consecutive entries from `first` of the L2 table at `l2` with one write.
    pub(crate) fn l2_set_many(
        &mut self,
        l2: u64,
        first: u64,
        entries: &[(L2Entry, u64)],
    ) -> Result<()> {
        let es = self.layout.l2_entry_size() as usize;
        let ext = self.layout.extended_l2;
        let start = first as usize * es;
        let end = start + entries.len() * es;
        self.overlap_check(ol::ACTIVE_L2, l2 + start as u64, (end - start) as u64)?;
        let t = self.load_l2(l2)?;
        if end > t.len() {
            return Err(corrupt(format!(
                "L2 update of {} entries from index {first} runs past the table at {l2:#x}",
                entries.len()
            )));
        }
        for (k, (e, bm)) in entries.iter().enumerate() {
            let p = start + k * es;
            BigEndian::write_u64(&mut t[p..], e.0);
            if ext {
                BigEndian::write_u64(&mut t[p + 8..], *bm);
            }
        }
        let bytes = t[start..end].to_vec();
        self.swrite_meta(ol::ACTIVE_L2, l2 + start as u64, &bytes)
    }

    /// The L2 entry mapping `guest` through `l1` (None: the active table).
    fn lookup(&mut self, l1: Option<&[u64]>, guest: u64) -> Result<(L2Entry, u64)> {
        let i1 = self.layout.l1_index(guest) as usize;
        let l1e = match l1 {
            Some(t) => t.get(i1).copied(),
            None => self.l1.get(i1).copied(),
        };
        let raw = l1e.unwrap_or(0);
        if raw & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {i1} has reserved bits set ({raw:#x})"
            )));
        }
        let l2 = L1Entry(raw).l2_offset();
        if l2 == 0 {
            return Ok((L2Entry(0), 0));
        }
        self.l2_get(l2, self.layout.l2_index(guest))
    }

    fn read_backing(&mut self, guest: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        if let Some(b) = self.backing.as_mut() {
            let size = b.size();
            if guest < size {
                let n = ((size - guest) as usize).min(buf.len());
                b.read_at(guest, &mut buf[..n])?;
            }
        }
        Ok(())
    }

    /// Decompressed contents of a compressed cluster.
    fn decompress(&mut self, e: L2Entry) -> Result<&[u8]> {
        let (start, end) = e.compressed_range(self.layout.csize_shift());
        if !matches!(&self.decompressed, Some((o, _)) if *o == start) {
            let cs = self.layout.cluster_size() as usize;
            let file_len = self
                .storage
                .len()
                .map_err(|err| crate::block::Error::io("image size", err))?;
            let end = end.min(file_len);
            if start >= end {
                return Err(Qcow2Error::Decompress {
                    offset: start,
                    reason: "compressed data lies beyond the end of the file".into(),
                }
                .into());
            }
            let mut input = vec![0u8; (end - start) as usize];
            self.sread(start, &mut input)?;
            let out = if self.header.compression_type == 1 {
                decompress_zstd(&input, cs)
            } else {
                decompress_deflate(&input, cs)
            }
            .map_err(|reason| Qcow2Error::Decompress {
                offset: start,
                reason,
            })?;
            self.decompressed = Some((start, out));
        }
        match &self.decompressed {
            Some((_, d)) => Ok(d),
            None => Err(corrupt("decompression cache empty".into())),
        }
    }

    /// Reads guest data through `l1` (None: the active L1 table).
    pub(crate) fn read_guest(
        &mut self,
        l1: Option<&[u64]>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let ext = self.layout.extended_l2;
        let unit = self.layout.subcluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = self.layout.offset_in_cluster(guest);
            let (e, bm) = self.lookup(l1, guest)?;
            // Serve up to the end of the cluster (or subcluster with extended L2).
            let span_end = if ext {
                (guest / unit + 1) * unit
            } else {
                self.layout.cluster_start(guest) + self.layout.cluster_size()
            };
            let mut n = ((span_end - guest) as usize).min(buf.len() - done);
            let kind = if ext {
                subcluster_kind(e, bm, (in_cluster / unit) as u32)
            } else {
                e.kind(false)
            };
            if kind == ClusterKind::Normal && !ext {
                n += self.contiguous_after(
                    l1,
                    span_end,
                    e.offset() + in_cluster + n as u64,
                    buf.len() - done - n,
                )?;
            }
            let out = &mut buf[done..done + n];
            match kind {
                ClusterKind::Unallocated => self.read_backing(guest, out)?,
                ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc => out.fill(0),
                ClusterKind::Normal => self.sread(e.offset() + in_cluster, out)?,
                ClusterKind::Compressed => {
                    let d = self.decompress(e)?;
                    out.copy_from_slice(&d[in_cluster as usize..in_cluster as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// How many bytes from cluster-aligned `guest` on (at most `max`) are normal clusters
    /// stored right after each other from host offset `host` on, so that one read serves a
    /// whole run (VM state and sequential reads are mostly such runs).
    fn contiguous_after(
        &mut self,
        l1: Option<&[u64]>,
        guest: u64,
        host: u64,
        max: usize,
    ) -> Result<usize> {
        let cs = self.layout.cluster_size();
        let mut n = 0usize;
        while n < max {
            let (e, _) = self.lookup(l1, guest + n as u64)?;
            if e.kind(false) != ClusterKind::Normal || e.offset() != host + n as u64 {
                break;
            }
            n += (cs as usize).min(max - n);
        }
        Ok(n)
    }

    /// The active L2 table for `guest`, allocated or copied so that it may be written
    /// (refcount 1, COPIED set in L1). Grows the L1 table as needed.
    fn writable_l2(&mut self, guest: u64) -> Result<u64> {
        let i1 = self.layout.l1_index(guest);
        if i1 >= self.l1.len() as u64 {
            self.grow_l1(i1 + 1, false)?;
        }
        let e = L1Entry(self.l1[i1 as usize]);
        if e.0 & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {i1} has reserved bits set ({:#x})",
                e.0
            )));
        }
        let cs = self.layout.cluster_size();
        // The table (or entry) this write will change is checked before anything is
        // allocated, so that a refusal leaves the file as it was.
        if e.l2_offset() != 0 && e.copied() {
            self.check_l2_inside(i1, e.l2_offset())?;
            self.overlap_check(ol::ACTIVE_L2, e.l2_offset(), cs)?;
            return Ok(e.l2_offset());
        }
        let l1_off = self.header.l1_table_offset + i1 * 8;
        self.overlap_check(ol::ACTIVE_L1, l1_off, 8)?;
        if e.l2_offset() != 0 {
            self.check_referenced(e.l2_offset(), cs)?;
        }
        // The table, then the data cluster: refuse now rather than after the table is made.
        self.check_next_allocations(2)?;
        let new = self.alloc_clusters(1)?;
        let content = if e.l2_offset() == 0 {
            vec![0u8; cs as usize]
        } else {
            let old = e.l2_offset();
            self.load_l2(old)?.clone()
        };
        self.swrite_meta(ol::ACTIVE_L2, new, &content)?;
        self.l2_cache.insert(new, content);
        self.write_l1_entry(i1 as usize, L1Entry::new(new, true).0)?;
        if e.l2_offset() != 0 {
            self.free_range(e.l2_offset(), cs)?;
        }
        Ok(new)
    }

    /// Refuses an active L2 table (of L1 entry `i1`) to be written in place that lies past
    /// the end of the file as it was opened and has grown since: it reads as zeroes, and
    /// writing an entry there would fail (a device's end) or grow the file to reach it.
    fn check_l2_inside(&self, i1: u64, l2: u64) -> Result<()> {
        if l2 >> self.layout.cluster_bits < self.end_cluster {
            return Ok(());
        }
        Err(corrupt(format!(
            "the L2 table of L1 entry {i1} ({l2:#x}) lies past the end of the image file; \
             nothing was written (run 'vmsnap check -r all')"
        )))
    }

    /// The host range whose clusters hold the reference an L2 entry makes, if any.
    fn referenced_range(&self, e: L2Entry) -> Option<(u64, u64)> {
        let cs = self.layout.cluster_size();
        match e.kind(self.layout.extended_l2) {
            ClusterKind::Compressed => {
                let (s, end) = e.compressed_range(self.layout.csize_shift());
                Some((s & !511, end - (s & !511)))
            }
            ClusterKind::Normal | ClusterKind::ZeroAlloc => Some((e.offset(), cs)),
            // Extended L2 entries may keep a host cluster with no allocated subclusters.
            _ if e.offset() != 0 && !e.compressed() => Some((e.offset(), cs)),
            _ => None,
        }
    }

    /// Drops the reference an old L2 entry held (after the entry no longer holds it).
    fn release(&mut self, e: L2Entry) -> Result<()> {
        match self.referenced_range(e) {
            Some((start, len)) => self.update_refcount(start, len, -1),
            None => Ok(()),
        }
    }

    /// Refuses when a cluster touching `[start, start + len)` has stored refcount 0.
    pub(crate) fn check_referenced(&mut self, start: u64, len: u64) -> Result<()> {
        self.check_releases(&[(start, len)])
    }

    /// Refuses when dropping one reference per range in `ranges` (a cluster touched by two
    /// ranges loses two) would take a cluster's stored refcount below zero, or rewrite a
    /// refcount block that lies over other metadata: the ranges an operation releases at
    /// its end, checked before its first write.
    pub(crate) fn check_releases(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut count: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
        for &(start, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = self.layout.cluster_index(start);
            let last = self.layout.cluster_index(start + len - 1);
            for c in first..=last {
                *count.entry(c).or_default() += 1;
            }
        }
        let rbits = self.layout.refblock_bits();
        let mut block = None;
        for (c, n) in count {
            // The refcount block the release rewrites must lie over no other structure.
            let rt = c >> rbits;
            if block != Some(rt) {
                block = Some(rt);
                let raw = self.reftable.get(rt as usize).copied().unwrap_or(0);
                let off = raw & super::entry::REFT_OFFSET_MASK;
                if off != 0 {
                    self.overlap_check(ol::REFCOUNT_BLOCK, off, self.layout.cluster_size())?;
                }
            }
            if self.get_refcount(c)? < n {
                return Err(corrupt(format!(
                    "refcount of cluster {:#x} would drop below zero; nothing was written \
                     (run 'vmsnap check -r all')",
                    c << self.layout.cluster_bits
                )));
            }
        }
        Ok(())
    }

    /// The L2 table that making the table for `guest` writable frees (a table shared with a
    /// snapshot is copied, and the old one loses the active layer's reference).
    fn l2_copy_release(&self, guest: u64) -> Option<(u64, u64)> {
        let e = L1Entry(*self.l1.get(self.layout.l1_index(guest) as usize)?);
        (e.0 & L1_RESERVED == 0 && e.l2_offset() != 0 && !e.copied())
            .then(|| (e.l2_offset(), self.layout.cluster_size()))
    }

    /// Writes guest data to the active layer.
    pub(crate) fn write_guest(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let cs = self.layout.cluster_size();
        self.probe_partial_tail(offset, buf.len() as u64)?;
        // A write over several clusters allocates cluster by cluster, and a write past the
        // L1 table (VM state) grows it first: when one of the clusters the allocator would
        // hand out holds metadata or is counted by a refcount block outside the file
        // (damaged refcounts), refuse before the first is written. (Every cluster, an L2
        // table per L1 entry spanned, and each growth of the L1 table, at most.)
        let first = self.layout.cluster_start(offset);
        let span = (offset + buf.len() as u64)
            .saturating_sub(first)
            .div_ceil(cs);
        let (i1_first, i1_last) = (
            self.layout.l1_index(offset),
            self.layout.l1_index(offset + (buf.len() as u64).max(1) - 1),
        );
        let cur = self.l1.len() as u64;
        let growths = (i1_last + 1).saturating_sub(i1_first.max(cur));
        if span > 1 || growths > 0 {
            let grown = self.l1_grown_size(i1_last + 1, false);
            let l1_clusters = self.layout.clusters_for(grown.saturating_mul(8));
            self.check_next_allocations(
                span + (i1_last - i1_first + 1) + growths.saturating_mul(l1_clusters),
            )?;
        }
        if span > 1 {
            self.precheck_span(offset, buf.len() as u64, None)?;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = self.layout.offset_in_cluster(guest);
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            // Whole-cluster runs into fresh clusters go out as one large write.
            if in_cluster == 0 && buf.len() - done >= 2 * cs as usize {
                let k = self.write_run(guest, &buf[done..], done)?;
                if k > 0 {
                    done += k;
                    continue;
                }
            }
            if self.layout.extended_l2 {
                self.write_cluster_ext(guest, &buf[done..done + n])?;
            } else {
                self.write_cluster(guest, &buf[done..done + n])?;
            }
            done += n;
        }
        Ok(())
    }

    /// Refuses, before the first byte goes out, a guest write (`zeroing` None) or a zeroing
    /// (`Some(discard)`) over several clusters that would fail at a later cluster, so that
    /// a refusal leaves the file as it was:
    ///
    /// - an L1 entry of the range with reserved bits, or whose L2 table (or the L1 entry,
    ///   when the table is copied first) lies over other metadata;
    /// - a cluster written in place over other metadata (overlap categories of
    ///   [`super::overlap`]);
    /// - clusters whose old references the write drops (old data clusters, L2 tables copied
    ///   from a snapshot's) with a stored refcount below the references dropped.
    ///
    /// A cluster written in place past the end of the file (an entry pointing there; QEMU
    /// writes through it, growing the file) has the file extended over it first, so that a
    /// device too small for it fails before anything is written.
    fn precheck_span(&mut self, offset: u64, len: u64, zeroing: Option<bool>) -> Result<()> {
        let cs = self.layout.cluster_size();
        let end = offset.saturating_add(len);
        let cur = self.l1.len() as u64;
        let i1_last = self
            .layout
            .l1_index(end.max(1) - 1)
            .min(cur.saturating_sub(1));
        let mut releases = Vec::new();
        for i1 in self.layout.l1_index(offset)..=i1_last {
            if i1 >= cur {
                break;
            }
            let e = L1Entry(self.l1[i1 as usize]);
            if e.0 & L1_RESERVED != 0 {
                return Err(corrupt(format!(
                    "L1 entry {i1} has reserved bits set ({:#x}); nothing was written \
                     (run 'vmsnap check -r all')",
                    e.0
                )));
            }
            if e.l2_offset() != 0 && e.copied() {
                self.check_l2_inside(i1, e.l2_offset())?;
                self.overlap_check(ol::ACTIVE_L2, e.l2_offset(), cs)?;
            } else {
                self.overlap_check(ol::ACTIVE_L1, self.header.l1_table_offset + i1 * 8, 8)?;
                if e.l2_offset() != 0 {
                    releases.push((e.l2_offset(), cs));
                }
            }
        }
        let ext = self.layout.extended_l2;
        // Zeroing whole clusters changes entries, not data, but for version 2 with a backing
        // file (no zero flag: zeroes are written).
        let entries_only = ext || self.header.version >= 3 || self.backing.is_none();
        let mut far_end = 0u64;
        let mut pos = offset;
        while pos < end {
            let cstart = self.layout.cluster_start(pos);
            let n = (cstart + cs).min(end) - pos;
            if self.layout.l1_index(pos) >= cur {
                break;
            }
            let whole = n == cs;
            pos += n;
            let (e, _) = self.lookup(None, cstart)?;
            match zeroing {
                Some(true) if !whole => continue,
                Some(_) if whole && entries_only => {
                    releases.extend(self.referenced_range(e));
                    continue;
                }
                _ => {}
            }
            let in_place = e.copied()
                && if ext {
                    !e.compressed() && e.offset() != 0
                } else {
                    e.kind(false) == ClusterKind::Normal
                };
            if in_place {
                let host = e.offset() + (pos - n - cstart);
                self.overlap_check(ol::DATA, host, n)?;
                far_end = far_end.max(host + n);
            } else {
                releases.extend(self.referenced_range(e));
            }
        }
        self.check_releases(&releases)?;
        // Clusters below the end the image had at open or has allocated since are inside
        // the file: only a target past that costs a look at the file's length.
        if far_end > self.end_cluster << self.layout.cluster_bits {
            self.cover(
                far_end,
                "extending the image over clusters written in place",
            )?;
        }
        Ok(())
    }

    /// A write over several clusters that ends inside a cluster keeps that cluster's other
    /// bytes, read just before its part is written: read them first, so that a cluster that
    /// cannot be read (compressed data that does not inflate, a backing file error) refuses
    /// the whole write before its first clusters are written. (The first cluster's own read
    /// comes before anything is written anyway.)
    fn probe_partial_tail(&mut self, offset: u64, len: u64) -> Result<()> {
        let cs = self.layout.cluster_size();
        let end = offset.saturating_add(len);
        let tail = self.layout.cluster_start(end);
        if len == 0 || end == tail || tail <= self.layout.cluster_start(offset) {
            return Ok(());
        }
        let (e, _) = self.lookup(None, tail)?;
        if e.copied() && !e.compressed() && e.offset() != 0 {
            // Written in place: nothing is read.
            return Ok(());
        }
        let mut old = vec![0u8; cs as usize];
        self.read_guest(None, tail, &mut old)
    }

    /// Writes whole clusters starting at `guest` whose entries are unallocated or plain zero,
    /// within one L2 table, into one freshly allocated run. Returns bytes written (0 if the
    /// first cluster does not qualify).
    ///
    /// While a detached write runs (`self.detached`), the data is not written: the run is
    /// checked and recorded (`at`: where `buf` starts in the caller's buffer) for the caller.
    fn write_run(&mut self, guest: u64, buf: &[u8], at: usize) -> Result<usize> {
        let cs = self.layout.cluster_size();
        let l2 = self.writable_l2(guest)?;
        let first = self.layout.l2_index(guest);
        // Runs stay below half a refcount block's range: every range holds its own block, so
        // a run as long as a range could never be placed (512-byte clusters, wide refcounts).
        let max = (self.layout.l2_entries() - first)
            .min(buf.len() as u64 / cs)
            .min((self.layout.refblock_entries() / 2).max(1));
        let mut count = 0;
        while count < max {
            let (e, bm) = self.l2_get(l2, first + count)?;
            let free = if self.layout.extended_l2 {
                e.0 == 0 && (bm == 0 || bm == BITMAP_ALL_ZEROES)
            } else {
                e.0 == 0 || e.0 == OFLAG_ZERO
            };
            if !free {
                break;
            }
            count += 1;
        }
        if count < 2 {
            return Ok(0);
        }
        let host = self.alloc_clusters(count)?;
        let bytes = (count * cs) as usize;
        if self.detached.is_some() {
            self.overlap_check(ol::DATA, host, bytes as u64)?;
            self.cover(
                host + bytes as u64,
                "extending the image over a detached run",
            )?;
            self.unflushed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(runs) = self.detached.as_mut() {
                runs.push(DetachedRun {
                    host,
                    start: at,
                    len: bytes,
                });
            }
        } else {
            self.swrite(host, &buf[..bytes])?;
        }
        if self.writeback_runs {
            self.unsent += bytes as u64;
            if self.unsent >= WRITEBACK_EVERY {
                // A hint: a failure here costs only the overlap.
                let _ = self.storage.start_writeback(host, bytes as u64);
                self.unsent = 0;
            }
        }
        let bm = if self.layout.extended_l2 {
            BITMAP_ALL_ALLOC
        } else {
            0
        };
        let entries: Vec<(L2Entry, u64)> = (0..count)
            .map(|i| (L2Entry((host + i * cs) | OFLAG_COPIED), bm))
            .collect();
        self.l2_set_many(l2, first, &entries)?;
        Ok(bytes)
    }

    /// Extends the file to `end` unless it already reaches that far (`what`: the error's
    /// context). For a detached run: the L2 entries written next must not point past the
    /// end of the file when the caller's data write never comes (the process killed in
    /// between), which `qemu-img check` reports as corruption. The extension is sparse;
    /// until a snapshot takes the VM state area its contents do not matter.
    fn cover(&self, end: u64, what: &str) -> Result<()> {
        let file_len = self
            .storage
            .len()
            .map_err(|e| crate::block::Error::io("image size", e))?;
        if file_len < end {
            self.storage
                .set_len(end)
                .map_err(|e| crate::block::Error::io(what, e))?;
        }
        Ok(())
    }

    /// Writes within one cluster (standard L2 entries).
    ///
    /// The old contents a partial write keeps are read before anything is allocated or
    /// written: a cluster that cannot be read (compressed data that does not inflate, a
    /// backing file error) refuses the write with the image's bytes unchanged.
    fn write_cluster(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let cs = self.layout.cluster_size();
        let in_cluster = self.layout.offset_in_cluster(guest) as usize;
        let (e, _) = self.lookup(None, guest)?;
        let in_place = e.copied() && e.kind(false) == ClusterKind::Normal;
        let whole = data.len() as u64 == cs;
        let content = if whole {
            data.to_vec()
        } else if in_place {
            Vec::new()
        } else {
            let start = self.layout.cluster_start(guest);
            let mut c = vec![0u8; cs as usize];
            self.read_guest(None, start, &mut c)?;
            c[in_cluster..in_cluster + data.len()].copy_from_slice(data);
            c
        };
        // The cluster is released at the end unless written in place or reused.
        let reused = e.copied() && e.kind(false) == ClusterKind::ZeroAlloc;
        let mut releases: Vec<(u64, u64)> = self.l2_copy_release(guest).into_iter().collect();
        if !(in_place || reused) {
            releases.extend(self.referenced_range(e));
        }
        self.check_releases(&releases)?;
        let l2 = self.writable_l2(guest)?;
        let idx = self.layout.l2_index(guest);
        let looked_up = e;
        let (e, _) = self.l2_get(l2, idx)?;
        if e != looked_up {
            return Err(corrupt(format!(
                "L2 entry for guest offset {guest:#x} changed from {:#x} to {:#x} while its \
                 table was made writable",
                looked_up.0, e.0
            )));
        }
        let kind = e.kind(false);
        if in_place {
            return self.swrite(e.offset() + in_cluster as u64, data);
        }
        if e.copied() && kind == ClusterKind::ZeroAlloc {
            // Reuse the cluster: it is ours alone.
            self.swrite(e.offset(), &content)?;
            return self.l2_set(l2, idx, L2Entry(e.offset() | OFLAG_COPIED), 0);
        }
        let host = self.alloc_clusters(1)?;
        self.swrite(host, &content)?;
        self.l2_set(l2, idx, L2Entry(host | OFLAG_COPIED), 0)?;
        self.release(e)
    }

    /// Writes within one cluster (extended L2 entries: per-subcluster allocation).
    fn write_cluster_ext(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let cs = self.layout.cluster_size();
        let sc = self.layout.subcluster_size();
        let start = self.layout.cluster_start(guest);
        let in_cluster = guest - start;
        let first_sc = in_cluster / sc;
        let last_sc = (in_cluster + data.len() as u64 - 1) / sc;
        // What is read is read before anything is allocated or written (see write_cluster).
        // Content of the touched subclusters as the guest sees them, with the new data.
        let span_start = first_sc * sc;
        let span_len = ((last_sc + 1) * sc - span_start) as usize;
        let mut span = vec![0u8; span_len];
        if data.len() != span_len {
            self.read_guest(None, start + span_start, &mut span)?;
        }
        let rel = (in_cluster - span_start) as usize;
        span[rel..rel + data.len()].copy_from_slice(data);
        // A compressed cluster is copied out whole; every subcluster becomes allocated.
        let whole = if self.lookup(None, guest)?.0.compressed() {
            let mut c = vec![0u8; cs as usize];
            self.read_guest(None, start, &mut c)?;
            Some(c)
        } else {
            None
        };
        let (looked_up, _) = self.lookup(None, guest)?;
        let mut releases: Vec<(u64, u64)> = self.l2_copy_release(guest).into_iter().collect();
        if !(looked_up.copied() && !looked_up.compressed() && looked_up.offset() != 0) {
            releases.extend(self.referenced_range(looked_up));
        }
        self.check_releases(&releases)?;
        let l2 = self.writable_l2(guest)?;
        let idx = self.layout.l2_index(guest);
        let (e, bm) = self.l2_get(l2, idx)?;
        let touched: u64 = ((1u64 << (last_sc + 1)) - 1) & !((1u64 << first_sc) - 1);
        let in_place = e.copied() && !e.compressed() && e.offset() != 0;
        let (host, mut new_bm) = if in_place {
            (e.offset(), bm)
        } else {
            let host = self.alloc_clusters(1)?;
            let bm_out = if let (true, Some(c)) = (e.compressed(), &whole) {
                self.swrite(host, c)?;
                BITMAP_ALL_ALLOC
            } else if e.offset() != 0 && bm & BITMAP_ALL_ALLOC != 0 {
                // Shared cluster: copy the subclusters it has allocated.
                let mut c = vec![0u8; cs as usize];
                self.sread(e.offset(), &mut c)?;
                self.swrite(host, &c)?;
                bm
            } else {
                bm & !BITMAP_ALL_ALLOC
            };
            (host, bm_out)
        };
        self.swrite(host + span_start, &span)?;
        new_bm |= touched;
        new_bm &= !(touched << 32);
        self.l2_set(l2, idx, L2Entry(host | OFLAG_COPIED), new_bm)?;
        if !in_place {
            self.release(e)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes (`discard`: only whole clusters are
    /// affected, as QEMU ignores partial-cluster discards).
    pub(crate) fn zero_guest(&mut self, offset: u64, len: u64, discard: bool) -> Result<()> {
        let cs = self.layout.cluster_size();
        let end = offset + len;
        if self.layout.cluster_start(end.max(1) - 1) > self.layout.cluster_start(offset) {
            self.precheck_span(offset, len, Some(discard))?;
        }
        let mut pos = offset;
        while pos < end {
            let cstart = self.layout.cluster_start(pos);
            let n = (cstart + cs).min(end) - pos;
            if pos == cstart && n == cs {
                // Whole clusters: as many as the range holds within this L2 table.
                let left_in_table = self.layout.l2_entries() - self.layout.l2_index(pos);
                let count = ((end - pos) / cs).min(left_in_table);
                self.zero_clusters(pos, count, discard)?;
                pos += count * cs;
                continue;
            } else if !discard {
                self.write_guest(pos, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Zeroes (or discards) `count` whole clusters from `guest`, all within one L2 table:
    /// one write of the changed entries, then the old clusters lose their references in one
    /// refcount batch (after the entries no longer hold them).
    fn zero_clusters(&mut self, guest: u64, count: u64, discard: bool) -> Result<()> {
        let cs = self.layout.cluster_size();
        let v3 = self.header.version >= 3;
        let ext = self.layout.extended_l2;
        let has_backing = self.backing.is_some();
        if !ext && !v3 && has_backing && !discard {
            // Version 2 has no zero flag: write real zeroes over the backing data.
            let zeroes = vec![0u8; cs as usize];
            for k in 0..count {
                self.write_guest(guest + k * cs, &zeroes)?;
            }
            return Ok(());
        }
        let mut changes: Vec<(u64, L2Entry, u64)> = Vec::new();
        let mut releases: Vec<(u64, u64)> = self.l2_copy_release(guest).into_iter().collect();
        for k in 0..count {
            let (e, bm) = self.lookup(None, guest + k * cs)?;
            let allocated = e.offset() != 0 || e.compressed();
            let (new_e, new_bm) = if ext {
                if !allocated && !has_backing && bm & BITMAP_ALL_ALLOC == 0 {
                    continue; // Already reads as zeroes.
                }
                (0, BITMAP_ALL_ZEROES)
            } else if v3 {
                if !allocated && (e.0 == OFLAG_ZERO || !has_backing) {
                    continue;
                }
                (OFLAG_ZERO, 0)
            } else {
                if !allocated {
                    continue;
                }
                (0, 0)
            };
            if new_e != e.0 || new_bm != bm {
                changes.push((k, L2Entry(new_e), new_bm));
                releases.extend(self.referenced_range(e));
            }
        }
        let (Some(&(lo, ..)), Some(&(hi, ..))) = (changes.first(), changes.last()) else {
            return Ok(());
        };
        // The references the entries lose go last, in one batch: a cluster whose stored
        // refcount is below the references dropped refuses the whole table's change first.
        self.check_releases(&releases)?;
        let l2 = self.writable_l2(guest)?;
        let first = self.layout.l2_index(guest);
        // Re-read: making the L2 table writable does not change entries.
        let mut entries = Vec::with_capacity((hi - lo + 1) as usize);
        let mut released = Vec::with_capacity(changes.len());
        let mut next = changes.iter().peekable();
        for k in lo..=hi {
            let (e, bm) = self.l2_get(l2, first + k)?;
            match next.next_if(|c| c.0 == k) {
                Some(&(_, new_e, new_bm)) => {
                    entries.push((new_e, new_bm));
                    released.push(e);
                }
                None => entries.push((e, bm)),
            }
        }
        self.l2_set_many(l2, first + lo, &entries)?;
        self.batched(|q| released.into_iter().try_for_each(|e| q.release(e)))
    }
}

fn decompress_deflate(input: &[u8], out_len: usize) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::with_capacity(out_len);
    let mut d = flate2::read::DeflateDecoder::new(input).take(out_len as u64);
    d.read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.len() != out_len {
        return Err(format!("inflated {} bytes, expected {out_len}", out.len()));
    }
    Ok(out)
}

fn decompress_zstd(input: &[u8], out_len: usize) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::with_capacity(out_len);
    let d = zstd::stream::read::Decoder::new(input).map_err(|e| e.to_string())?;
    d.take(out_len as u64)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() != out_len {
        return Err(format!("zstd gave {} bytes, expected {out_len}", out.len()));
    }
    Ok(out)
}
