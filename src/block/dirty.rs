//! Chunks of a virtual disk written since a point in time: what block migration (`migrate
//! -b`) must send again. The guest's write path marks ranges ([`DirtyChunks::mark`]); the
//! migration takes chunks one at a time ([`DirtyChunks::take_next`]) and reads them. Both do
//! so under the VM's device lock, so a chunk taken and read is never half old, half new.
//!
//! The chunk is QEMU's block-migration unit (`BLK_MIG_BLOCK_SIZE`, 1 MiB). The bitmap has
//! one bit per chunk: 12.5 KiB for a 100 GiB disk.

use std::sync::Mutex;

/// Bytes per chunk.
pub const CHUNK: u64 = 1 << 20;

/// A dirty bitmap over a disk of a given size.
#[derive(Debug)]
pub struct DirtyChunks {
    size: u64,
    bits: Mutex<Vec<u64>>,
}

impl DirtyChunks {
    /// A bitmap for a disk of `size` bytes, every chunk dirty (nothing was sent yet).
    pub fn all_dirty(size: u64) -> Self {
        let n = size.div_ceil(CHUNK);
        let mut bits = vec![u64::MAX; n.div_ceil(64) as usize];
        if n % 64 != 0 {
            if let Some(last) = bits.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        DirtyChunks {
            size,
            bits: Mutex::new(bits),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Marks every chunk that `[offset, offset + len)` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut bits = self.lock();
        for c in offset / CHUNK..end.div_ceil(CHUNK) {
            if let Some(w) = bits.get_mut((c / 64) as usize) {
                *w |= 1 << (c % 64);
            }
        }
    }

    /// Clears and returns the first dirty chunk at or after chunk `from` (wrapping around to
    /// the start), as its byte range `(offset, len)`; None when nothing is dirty.
    pub fn take_next(&self, from: u64) -> Option<(u64, u64)> {
        let mut bits = self.lock();
        let n = bits.len() as u64 * 64;
        let start = if from >= n { 0 } else { from };
        let found = (start..n).chain(0..start).find(|&c| {
            bits.get((c / 64) as usize)
                .is_some_and(|w| w & (1 << (c % 64)) != 0)
        })?;
        if let Some(w) = bits.get_mut((found / 64) as usize) {
            *w &= !(1 << (found % 64));
        }
        let offset = found * CHUNK;
        Some((offset, CHUNK.min(self.size - offset)))
    }

    /// Bytes of the dirty chunks (the last chunk counted at its real length).
    pub fn dirty_bytes(&self) -> u64 {
        let bits = self.lock();
        let count: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        let last = self.size.div_ceil(CHUNK).saturating_sub(1);
        let last_dirty = bits
            .get((last / 64) as usize)
            .is_some_and(|w| w & (1 << (last % 64)) != 0);
        let short = if last_dirty && self.size % CHUNK != 0 {
            CHUNK - self.size % CHUNK
        } else {
            0
        };
        count * CHUNK - short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_all_dirty_and_hands_out_each_chunk_once() {
        let d = DirtyChunks::all_dirty(2 * CHUNK + 4096);
        assert_eq!(d.dirty_bytes(), 2 * CHUNK + 4096);
        assert_eq!(d.take_next(0), Some((0, CHUNK)));
        assert_eq!(d.take_next(1), Some((CHUNK, CHUNK)));
        assert_eq!(d.take_next(2), Some((2 * CHUNK, 4096)));
        assert_eq!(d.take_next(3), None);
        assert_eq!(d.dirty_bytes(), 0);
    }

    #[test]
    fn marks_every_chunk_a_write_touches_and_wraps_around() {
        let d = DirtyChunks::all_dirty(100 * CHUNK);
        while d.take_next(0).is_some() {}
        d.mark(CHUNK - 512, 1024);
        d.mark(99 * CHUNK + 10, u64::MAX);
        d.mark(200 * CHUNK, 512);
        assert_eq!(d.dirty_bytes(), 3 * CHUNK);
        assert_eq!(d.take_next(50), Some((99 * CHUNK, CHUNK)));
        assert_eq!(d.take_next(50), Some((0, CHUNK)));
        assert_eq!(d.take_next(0), Some((CHUNK, CHUNK)));
        assert_eq!(d.take_next(0), None);
    }
}
