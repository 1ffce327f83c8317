//! The walk over the layers: for every output cluster of every region, its key; new keys
//! are read (coalescing runs of source clusters into one read), zero-checked, compressed
//! or not, and appended; known keys reuse the output entry made for them.

use std::collections::HashMap;

use byteorder::{BigEndian, ByteOrder};

use super::super::entry::BITMAP_ALL_ALLOC;
use super::super::layout::Layout;
use super::source::{Key, Layer, Mapper, Region, SourceImage};
use super::tables::{is_compressed, write_tail, L2Store, OutLayer};
use super::writer::{Codec, DataWriter};
use super::{CopyOptions, CopyReport, Result};
use crate::block::storage::Storage;

/// Guest bytes read and handled at once.
const CHUNK_BYTES: u64 = 4 << 20;

/// An all-zero block to compare data against.
static ZEROES: [u8; 4096] = [0; 4096];

fn is_zero(data: &[u8]) -> bool {
    data.chunks(ZEROES.len()).all(|c| c == &ZEROES[..c.len()])
}

/// State of one copy.
struct Walk<'m, 'a, 'b, 'o> {
    mapper: Mapper<'a, 'b>,
    writer: DataWriter<'o>,
    layout: Layout,
    /// Output entries made so far by key (0: reads as zero), when several layers are copied.
    seen: Option<HashMap<Key, u64>>,
    codec: Option<Codec>,
    report: &'m mut CopyReport,
    buf: Vec<u8>,
}

/// Copies `layers` of `src` into `out`; the first layer without a snapshot entry becomes
/// the output's active layer.
pub(super) fn copy_layers(
    src: &mut SourceImage<'_>,
    layers: &[Layer],
    out: &dyn Storage,
    opts: &CopyOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyReport> {
    let layout = Layout {
        cluster_bits: opts.cluster_size.trailing_zeros(),
        extended_l2: opts.extended_l2,
        refcount_order: opts.refcount_bits.trailing_zeros(),
    };
    let cs = layout.cluster_size();
    let mut report = CopyReport::default();
    let mut w = Walk {
        mapper: Mapper::new(src),
        writer: DataWriter::new(out, layout, cs),
        layout,
        seen: (layers.len() > 1).then(HashMap::new),
        codec: opts.compress.then_some(if opts.zstd {
            Codec::Zstd
        } else {
            Codec::Deflate
        }),
        report: &mut report,
        buf: Vec::new(),
    };
    let total: u64 = layers.iter().flat_map(|l| &l.regions).map(|r| r.len).sum();
    let mut done = 0u64;
    let mut store = L2Store::default();
    let mut out_layers = Vec::with_capacity(layers.len());
    let span = layout.bytes_per_l1_entry();
    for layer in layers {
        let l1_size = layer
            .regions
            .iter()
            .map(|r| layout.size_to_l1(r.out + r.len))
            .max()
            .unwrap_or(0);
        if l1_size > (super::super::layout::MAX_L1_BYTES / 8) {
            return Err(super::CopyError::Limit(format!(
                "a layer needs {l1_size} L1 entries, more than QEMU's 32 MiB L1 limit allows"
            )));
        }
        let mut l1 = vec![None; l1_size as usize];
        for (ri, r) in layer.regions.iter().enumerate() {
            // VM state (region 1) stays uncompressed, as QEMU writes it.
            let compress = ri == 0;
            let end = r.out + r.len;
            let mut g = r.out;
            while g < end {
                let i1 = g / span;
                let stop = ((i1 + 1) * span).min(end);
                let s = r.src + (g - r.out);
                if !w.mapper.range_is_empty(layer, s, stop - g) {
                    if let Some(t) = w.table(layer, r, g, stop, compress)? {
                        l1[i1 as usize] = Some(store.insert(t));
                    }
                }
                done += stop - g;
                progress(done, total);
                g = stop;
            }
        }
        out_layers.push(OutLayer {
            l1,
            entry: layer.entry.clone(),
        });
    }
    let data_end = w.writer.finish()?;
    let size = layers.first().map_or(0, |l| l.disk_size);
    report.snapshots = out_layers.iter().filter(|l| l.entry.is_some()).count();
    report.file_len = write_tail(
        out,
        opts,
        layout,
        size,
        data_end,
        &mut store,
        &mut out_layers,
    )?;
    Ok(report)
}

impl Walk<'_, '_, '_, '_> {
    /// The output L2 table for output guest range `[g, stop)` (inside one L1 entry's range)
    /// of region `r`; None if every entry is empty.
    fn table(
        &mut self,
        layer: &Layer,
        r: &Region,
        g: u64,
        stop: u64,
        compress: bool,
    ) -> Result<Option<Vec<u8>>> {
        let cs = self.layout.cluster_size();
        let mut table = vec![0u8; cs as usize];
        let mut any = false;
        let per_chunk = (CHUNK_BYTES / cs).max(1);
        let mut c0 = g;
        while c0 < stop {
            let c1 = (c0 + per_chunk * cs).min(stop);
            for (og, e) in self.chunk(layer, r, c0, c1, compress)? {
                let es = self.layout.l2_entry_size() as usize;
                let at = self.layout.l2_index(og) as usize * es;
                BigEndian::write_u64(&mut table[at..], e);
                if es == 16 && !is_compressed(e) {
                    BigEndian::write_u64(&mut table[at + 8..], BITMAP_ALL_ALLOC);
                }
                any = true;
            }
            c0 = c1;
        }
        Ok(any.then_some(table))
    }

    /// Output entries (output guest offset, L2 entry) for the clusters of `[c0, c1)`.
    fn chunk(
        &mut self,
        layer: &Layer,
        r: &Region,
        c0: u64,
        c1: u64,
        compress: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let cs = self.layout.cluster_size();
        let mut entries = Vec::new();
        // New keys to read in this chunk: (key, source offset, length), and for every
        // cluster that needs one, which read serves it.
        let mut reads: Vec<(Key, u64, u64)> = Vec::new();
        let mut local: HashMap<Key, usize> = HashMap::new();
        let mut uses: Vec<(u64, usize)> = Vec::new();
        let mut og = c0;
        while og < c1 {
            let len = cs.min(r.out + r.len - og);
            let s = r.src + (og - r.out);
            let key = self.mapper.key(layer, s, len)?;
            og += cs;
            if key.is_zero() {
                continue;
            }
            if let Some(&e) = self.seen.as_ref().and_then(|m| m.get(&key)) {
                if e != 0 {
                    entries.push((og - cs, e));
                    self.report.shared += 1;
                }
                continue;
            }
            let slot = match local.get(&key) {
                Some(&i) => i,
                None => {
                    local.insert(key.clone(), reads.len());
                    reads.push((key, s, len));
                    reads.len() - 1
                }
            };
            uses.push((og - cs, slot));
        }
        if reads.is_empty() {
            return Ok(entries);
        }
        // Read: runs of whole source clusters in one read each, anything else by guest read.
        let csz = cs as usize;
        self.buf.clear();
        self.buf.resize(reads.len() * csz, 0);
        let mut i = 0;
        while i < reads.len() {
            if let Some(h) = reads[i].0.host_run(cs) {
                let mut j = i + 1;
                while j < reads.len() && reads[j].0.host_run(cs) == Some(h + (j - i) as u64 * cs) {
                    j += 1;
                }
                self.mapper.read_host(h, &mut self.buf[i * csz..j * csz])?;
                i = j;
            } else {
                let (_, s, len) = reads[i];
                self.mapper
                    .read(layer, s, &mut self.buf[i * csz..i * csz + len as usize])?;
                i += 1;
            }
        }
        // Emit.
        let mut made = Vec::with_capacity(reads.len());
        for k in 0..reads.len() {
            let data = &self.buf[k * csz..(k + 1) * csz];
            let e = if is_zero(data) {
                0
            } else {
                self.report.data_clusters += 1;
                match self.codec.filter(|_| compress) {
                    Some(codec) => match self.writer.compressed(data, codec)? {
                        Some(e) => e,
                        None => self.writer.cluster(data)?,
                    },
                    None => self.writer.cluster(data)?,
                }
            };
            made.push(e);
        }
        let mut first_use = vec![true; reads.len()];
        for (og, slot) in uses {
            if made[slot] != 0 {
                entries.push((og, made[slot]));
                if !std::mem::replace(&mut first_use[slot], false) {
                    self.report.shared += 1;
                }
            }
        }
        if let Some(seen) = self.seen.as_mut() {
            for ((key, _, _), e) in reads.into_iter().zip(made) {
                seen.insert(key, e);
            }
        }
        Ok(entries)
    }
}
