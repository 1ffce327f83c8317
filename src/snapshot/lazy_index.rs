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
    let body = index.encode();
    let at = index_offset(layout.len);
    store
        .vmstate_write(at, &body)
        .map_err(|e| StateIoError::Io(std::io::Error::other(e)))?;
    let record = PageIndexRecord {
        index_offset: at,
        index_len: body.len() as u64,
        ram_len,
        setup_end: layout.setup_end,
        ram_end_section: layout.ram_end_section,
        page_size: PAGE_SIZE,
        index_crc: crc32fast::hash(&body),
    };
    Ok(record.encode())
}
