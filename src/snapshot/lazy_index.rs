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
//! Once the snapshot is created, the index is dropped from the active layer like the state
//! itself; the snapshot's own L1 table keeps it.

use crate::block::vmstate_io::VmstateWriter;
use crate::block::SnapshotStore;
use crate::interop::integrity::{self, CrcWriter};
use crate::interop::page_index_record::PageIndexRecord;
use crate::migration::page_index::PageRecorder;
use crate::vmm::VmState;

use super::progress::{Counting, ProgressFn};
use super::state_io::{self, CapturedDrive, StateIoError, PAGE_SIZE, RAM_BLOCK};

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
    /// The index's place in the vmstate area, if one was written.
    pub index: Option<(u64, u64)>,
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
    let recorder = (!lz4).then(|| PageRecorder::new(RAM_BLOCK, ram.len() as u64, PAGE_SIZE));
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
    let Some(index) = recorder.and_then(|r| r.index()) else {
        return Ok(SavedState {
            size,
            extra_tail,
            index: None,
        });
    };
    let body = index.encode();
    let at = index_offset(size);
    store
        .vmstate_write(at, &body)
        .map_err(|e| StateIoError::Io(std::io::Error::other(e)))?;
    let record = PageIndexRecord {
        index_offset: at,
        index_len: body.len() as u64,
        ram_len: ram.len() as u64,
        setup_end: layout.setup_end,
        ram_end_section: layout.ram_end_section,
        page_size: PAGE_SIZE,
        index_crc: crc32fast::hash(&body),
    };
    extra_tail.extend_from_slice(&record.encode());
    Ok(SavedState {
        size,
        extra_tail,
        index: Some((at, body.len() as u64)),
    })
}

impl SavedState {
    /// After the snapshot was created: drops the index from the active layer (the snapshot
    /// keeps it). Only space is at stake: an error leaves it allocated, nothing else.
    pub fn drop_index_from_active(&self, store: &mut dyn SnapshotStore) {
        if let Some((at, len)) = self.index {
            // The cluster the state ends in was dropped with the state.
            let _ = store.vmstate_discard(at, len);
        }
    }
}
