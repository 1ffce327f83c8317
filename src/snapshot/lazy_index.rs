//! savevm's side of lazy loadvm: the VM state is written with a page index recorded as it
//! goes, and the index is stored past the state in the vmstate area, found through a kind-2
//! record in the snapshot's extra data (`formats/lazy-loadvm.md`).
//!
//! ```text
//!  vmstate area:  [0, vm_state_size)  the QEMU stream (all QEMU and qemu-img ever read)
//!                 [index_offset, +index_len)   one be64 per RAM page (page_index.rs)
//!  extra data:    kind 1 (CRC32 of the stream) | kind 2 (where the index is, its CRC32)
//! ```
//!
//! Snapshot creation moves the whole vmstate area (state and index) from the active layer to
//! the snapshot's own L1 table. `savevm -l` records the index the same way while its pre-copy
//! rounds write the stream (each page's last copy is the one the index keeps).

use crate::block::vmstate_io::VmstateWriter;
use crate::block::SnapshotStore;
use crate::interop::integrity::{self, CrcWriter};
use crate::interop::page_index_record::PageIndexRecord;
use crate::migration::page_index::PageRecorder;
use crate::vmm::VmState;

use super::progress::{Counting, ProgressFn};
use super::state_io::{self, CapturedDrive, StateIoError, StreamLayout, PAGE_SIZE, RAM_BLOCK};

/// Where the index goes: the first page boundary after the state.
fn index_offset(state_len: u64) -> u64 {
    state_len.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// A VM state written into the active layer's vmstate area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState {
    /// `vm_state_size`.
    pub size: u64,
    /// The extra-data tail for the snapshot entry (checksum and, if any, index records).
    pub extra_tail: Vec<u8>,
}

/// Writes `state` and `ram` as a stream from vmstate offset 0, checksummed, and (unless the
/// pages are LZ4-compressed) the page index after it.
pub fn write(
    store: &mut dyn SnapshotStore,
    state: &VmState,
    ram: &[u8],
    captured: &[CapturedDrive],
    lz4: bool,
    progress: ProgressFn<'_>,
) -> Result<SavedState, StateIoError> {
    let recorder = (!lz4).then(|| new_recorder(ram.len() as u64));
    let (size, crc, layout) = {
        let total = ram.len() as u64;
        let mut w = CrcWriter::new(Counting::new(VmstateWriter::new(store), total, progress));
        let (n, layout) =
            state_io::write_state_recorded(state, ram, captured, lz4, recorder.clone(), &mut w)?;
        std::io::Write::flush(&mut w)?;
        let (len, crc) = w.finish();
        debug_assert_eq!(len, n);
        (n, crc, layout)
    };
    let mut extra_tail = integrity::tail_for(crc, size);
    if let Some(r) = recorder {
        extra_tail.extend(store_index(store, &r, ram.len() as u64, &layout)?);
    }
    Ok(SavedState { size, extra_tail })
}

/// A recorder for the guest RAM block of a VM with `ram_len` bytes of RAM.
pub fn new_recorder(ram_len: u64) -> PageRecorder {
    PageRecorder::new(RAM_BLOCK, ram_len, PAGE_SIZE)
}

/// Stores the index `recorder` collected while the stream of `layout` was written into the
/// vmstate area past the stream, and returns the kind-2 extra-data record that finds it
/// (nothing if a page went out in a form the index cannot point at).
pub fn store_index(
    store: &mut dyn SnapshotStore,
    recorder: &PageRecorder,
    ram_len: u64,
    layout: &StreamLayout,
) -> Result<Vec<u8>, StateIoError> {
    let Some(index) = recorder.index() else {
        return Ok(Vec::new());
    };
    write_index_after(store, &index.encode(), ram_len, layout)
}

/// Writes the index `body` right after the stream of `layout`; returns its record.
fn write_index_after(
    store: &mut dyn SnapshotStore,
    body: &[u8],
    ram_len: u64,
    layout: &StreamLayout,
) -> Result<Vec<u8>, StateIoError> {
    let at = index_offset(layout.len);
    write_area(store, at, body)?;
    Ok(index_record(body, at, ram_len, layout))
}

/// Where a live save writes its index ahead of the pause: past the largest stream it may
/// write (twice the RAM, see `live::SizeBound`, plus `extra` bytes of device state and
/// captured drives), so that the stream does not reach it ([`store_index_ahead`] checks).
pub fn ahead_offset(ram_len: u64, extra: u64) -> u64 {
    index_offset(ram_len.saturating_mul(2).saturating_add(extra))
}

/// The index of a live save, written ahead of the pause at `at` as `written`: in the pause
/// only the 4 KiB blocks that the final copy changed are written again, so the pause does
/// not grow with the index (2 MiB per GiB of RAM). Falls back to [`store_index`] when the
/// stream ended past `at` or the index changed size.
pub fn store_index_ahead(
    store: &mut dyn SnapshotStore,
    recorder: &PageRecorder,
    ram_len: u64,
    layout: &StreamLayout,
    at: u64,
    written: &[u8],
) -> Result<Vec<u8>, StateIoError> {
    let Some(index) = recorder.index() else {
        return Ok(Vec::new());
    };
    let body = index.encode();
    if layout.len > at || body.len() != written.len() {
        return write_index_after(store, &body, ram_len, layout);
    }
    for (start, end) in changed_runs(written, &body, BLOCK) {
        write_area(store, at + start as u64, &body[start..end])?;
    }
    Ok(index_record(&body, at, ram_len, layout))
}

/// Granularity of the rewrite in the pause.
const BLOCK: usize = 4096;

/// The byte ranges of `new` whose `block`-sized blocks differ from `old` (same length),
/// adjacent blocks merged.
fn changed_runs(old: &[u8], new: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (a, b)) in old.chunks(block).zip(new.chunks(block)).enumerate() {
        if a != b {
            let (start, end) = (i * block, i * block + b.len());
            match runs.last_mut() {
                Some(r) if r.1 == start => r.1 = end,
                _ => runs.push((start, end)),
            }
        }
    }
    runs
}

fn write_area(store: &mut dyn SnapshotStore, at: u64, data: &[u8]) -> Result<(), StateIoError> {
    store
        .vmstate_write(at, data)
        .map_err(|e| StateIoError::Io(std::io::Error::other(e)))
}

/// The kind-2 extra-data record of an index `body` stored at `at`.
fn index_record(body: &[u8], at: u64, ram_len: u64, layout: &StreamLayout) -> Vec<u8> {
    PageIndexRecord {
        index_offset: at,
        index_len: body.len() as u64,
        ram_len,
        setup_end: layout.setup_end,
        ram_end_section: layout.ram_end_section,
        page_size: PAGE_SIZE,
        index_crc: crc32fast::hash(body),
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::vmstate_io::tests::Mem;

    #[test]
    fn an_index_written_ahead_gets_only_its_changed_blocks_in_the_pause() {
        let pages = 2048u64;
        let ram_len = pages * PAGE_SIZE;
        let r = new_recorder(ram_len);
        for p in 0..pages {
            r.page(RAM_BLOCK, p * PAGE_SIZE, Some(100 + p * 4104));
        }
        let at = ahead_offset(ram_len, 1 << 20);
        let ahead = r.index().unwrap().encode();
        let mut area = Mem::default();
        area.vmstate_write(at, &ahead).unwrap();
        // The final copy re-sends two pages far apart and makes one a zero page.
        r.page(RAM_BLOCK, 3 * PAGE_SIZE, Some(9_000_000));
        r.page(RAM_BLOCK, 1500 * PAGE_SIZE, None);
        let layout = StreamLayout {
            setup_end: 50,
            ram_end_section: 9_000_000,
            len: 9_100_000,
        };
        let writes = area.calls;
        let tail = store_index_ahead(&mut area, &r, ram_len, &layout, at, &ahead).unwrap();
        let body = r.index().unwrap().encode();
        assert_eq!(area.calls - writes, 2, "two changed blocks, written alone");
        assert_eq!(&area.area[at as usize..at as usize + body.len()], &body[..]);
        let rec = PageIndexRecord::find(&tail).unwrap().unwrap();
        assert_eq!(
            (rec.index_offset, rec.index_crc),
            (at, crc32fast::hash(&body))
        );
        // A stream that ran past the place written ahead: the whole index after it.
        let long = StreamLayout {
            len: at + 1,
            ..layout
        };
        let tail = store_index_ahead(&mut area, &r, ram_len, &long, at, &ahead).unwrap();
        let rec = PageIndexRecord::find(&tail).unwrap().unwrap();
        assert_eq!(rec.index_offset, index_offset(at + 1));
        let start = rec.index_offset as usize;
        assert_eq!(&area.area[start..start + body.len()], &body[..]);
    }

    #[test]
    fn changed_runs_merge_adjacent_blocks_and_keep_a_short_tail() {
        let old = vec![0u8; 10];
        let mut new = old.clone();
        assert!(changed_runs(&old, &new, 4).is_empty());
        new[1] = 1; // block 0
        new[5] = 1; // block 1, adjacent: merged
        new[9] = 1; // block 2, the short tail
        assert_eq!(changed_runs(&old, &new, 4), [(0, 10)]);
        new[5] = 0;
        assert_eq!(changed_runs(&old, &new, 4), [(0, 4), (8, 10)]);
    }
}
