//! `snapshot_extra`: vmsnap's records in a snapshot entry's extra data (which an image carries
//! from anyone): the VM-state checksum record, the page-index record, and a page-index body
//! decoded with the geometry the first 8 bytes of the input give (pages, page shift).

use vmsnap::interop::integrity::parse_tail;
use vmsnap::interop::page_index_record::PageIndexRecord;
use vmsnap::migration::page_index::PageIndex;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let _ = parse_tail(data);
    let _ = PageIndexRecord::find(data);
    if data.len() >= 8 {
        let (geo, body) = data.split_at(8);
        let pages = u64::from(u32::from_be_bytes([geo[0], geo[1], geo[2], geo[3]]));
        let page_size = 1u64 << (geo[4] % 24);
        let state_len = u64::from(u16::from_be_bytes([geo[5], geo[6]])) << (geo[7] % 40);
        let _ = PageIndex::decode(body, pages, page_size, state_len);
    }
}
