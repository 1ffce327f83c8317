//! Kind 2 of vmsnap's snapshot extra-data records (see [`super::integrity`]): where a
//! snapshot's RAM page index is, so that loadvm can resume before reading RAM.
//!
//! ```text
//!  kind 2 v1 (56 bytes):
//!    0  header "VSNX", kind 2, version 1, record_len 56
//!    8  index_offset     u64 BE  offset of the index body in the vmstate area (≥ vm_state_size)
//!   16  index_len        u64 BE  bytes of index body (8 per page)
//!   24  ram_len          u64 BE  bytes of the indexed RAM block ("pc.ram")
//!   32  setup_end        u64 BE  stream offset where the RAM setup section ends
//!   40  ram_end_section  u64 BE  stream offset of the last RAM section (devices follow it)
//!   48  page_shift       u8      log2 of the page size (12)
//!   49  reserved         3 bytes (0)
//!   52  index_crc        u32 BE  CRC-32 (zlib) of the index body
//! ```
//!
//! Written after the kind-1 checksum record, which a lazy load needs as well (it verifies
//! the whole state once the fill has read it). Bump rule as for every kind: fields are only
//! appended in higher versions; readers take the version-1 fields of any version ≥ 1.
//! Spec: `formats/lazy-loadvm.md`.

use super::integrity::{find_record, IntegrityError, RECORD_MAGIC};

/// Record kind: location of the RAM page index.
pub const KIND_PAGE_INDEX: u8 = 2;
/// Version written.
pub const PAGE_INDEX_VERSION: u8 = 1;
/// Length of a version-1 record.
pub const PAGE_INDEX_LEN: usize = 56;

/// A parsed page-index record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageIndexRecord {
    /// Offset of the index body in the vmstate area.
    pub index_offset: u64,
    /// Length of the index body.
    pub index_len: u64,
    /// Bytes of the indexed RAM block.
    pub ram_len: u64,
    /// Stream offset where the RAM setup section ends.
    pub setup_end: u64,
    /// Stream offset of the last RAM section.
    pub ram_end_section: u64,
    /// Page size (a power of two).
    pub page_size: u64,
    /// CRC-32 of the index body.
    pub index_crc: u32,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

impl PageIndexRecord {
    /// The record's bytes, to append to a snapshot's extra-data tail.
    pub fn encode(&self) -> Vec<u8> {
        let mut r = Vec::with_capacity(PAGE_INDEX_LEN);
        r.extend_from_slice(&RECORD_MAGIC);
        r.push(KIND_PAGE_INDEX);
        r.push(PAGE_INDEX_VERSION);
        r.extend_from_slice(&(PAGE_INDEX_LEN as u16).to_be_bytes());
        for v in [
            self.index_offset,
            self.index_len,
            self.ram_len,
            self.setup_end,
            self.ram_end_section,
        ] {
            r.extend_from_slice(&v.to_be_bytes());
        }
        r.push(u8::try_from(self.page_size.trailing_zeros()).unwrap_or(12));
        r.extend_from_slice(&[0; 3]);
        r.extend_from_slice(&self.index_crc.to_be_bytes());
        r
    }

    /// Finds the page-index record in an extra-data tail (walking records as
    /// [`super::integrity::parse_tail`] does). `Ok(None)` when there is none.
    ///
    /// # Errors
    /// A malformed record of ours: [`IntegrityError::Truncated`] or
    /// [`IntegrityError::BadLength`].
    pub fn find(tail: &[u8]) -> Result<Option<PageIndexRecord>, IntegrityError> {
        let Some((offset, rec)) = find_record(tail, KIND_PAGE_INDEX)? else {
            return Ok(None);
        };
        let shift = rec.get(48).copied().unwrap_or(0);
        if rec.len() < PAGE_INDEX_LEN || !(9..=21).contains(&shift) {
            return Err(IntegrityError::BadLength {
                offset,
                record_len: u16::try_from(rec.len()).unwrap_or(u16::MAX),
            });
        }
        Ok(Some(PageIndexRecord {
            index_offset: be64(rec, 8),
            index_len: be64(rec, 16),
            ram_len: be64(rec, 24),
            setup_end: be64(rec, 32),
            ram_end_section: be64(rec, 40),
            page_size: 1 << shift,
            index_crc: u32::from_be_bytes([rec[52], rec[53], rec[54], rec[55]]),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::integrity::{parse_tail, tail_for};

    fn rec() -> PageIndexRecord {
        PageIndexRecord {
            index_offset: 0x20_3000,
            index_len: 0x2000,
            ram_len: 0x40_0000,
            setup_end: 0x5a,
            ram_end_section: 0x20_1234,
            page_size: 4096,
            index_crc: 0xdead_beef,
        }
    }

    #[test]
    fn layout_and_round_trip_after_the_checksum_record() {
        let b = rec().encode();
        assert_eq!(b.len(), PAGE_INDEX_LEN);
        assert_eq!(&b[..8], b"VSNX\x02\x01\x00\x38");
        assert_eq!(b[48], 12);
        assert_eq!(&b[52..], &[0xde, 0xad, 0xbe, 0xef]);
        let mut tail = tail_for(0x1234, 0x20_2000);
        tail.extend_from_slice(&b);
        // Both records are found; the checksum reader skips nothing it needs.
        assert_eq!(PageIndexRecord::find(&tail).unwrap(), Some(rec()));
        assert_eq!(parse_tail(&tail).unwrap().unwrap().checksum, 0x1234);
        assert_eq!(PageIndexRecord::find(&tail_for(1, 2)).unwrap(), None);
        assert_eq!(PageIndexRecord::find(b"").unwrap(), None);
    }

    #[test]
    fn damaged_records_are_errors() {
        let mut b = rec().encode();
        b[7] = 48; // shorter than a version-1 record
        assert!(PageIndexRecord::find(&b).is_err());
        let mut b = rec().encode();
        b[48] = 40; // absurd page size
        assert!(PageIndexRecord::find(&b).is_err());
        let b = rec().encode();
        assert!(PageIndexRecord::find(&b[..40]).is_err());
    }
}
