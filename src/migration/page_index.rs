//! A page index of a RAM section: for each page of one RAM block, where the stream holds its
//! last copy (the offset of the page's data) or that it is a zero page. Built while the
//! stream is written ([`PageRecorder`], fed by [`super::ram::RamWriter`]), so that a lazy
//! loadvm finds any page without reading the RAM before it. Pages sent several times (live
//! savevm's rounds) keep their last copy, the one a load of the whole stream leaves in RAM.
//!
//! ```text
//!  index body: one be64 per page of the block, page 0 first
//!     0          the stream has no record of the page (it loads as zero)
//!     1          ZERO record (fill byte 0)
//!     n ≥ 2      the page's data: bytes [n, n + page_size) of the stream
//! ```
//!
//! The body is stored by `snapshot/` past the snapshot's VM state; see
//! `formats/lazy-loadvm.md`.

#![deny(unsafe_code)]

use std::sync::{Arc, Mutex};

/// Entry of a page without any record.
pub const ABSENT: u64 = 0;
/// Entry of a zero page.
pub const ZERO: u64 = 1;

/// Errors decoding a stored index.
#[derive(Debug, thiserror::Error)]
pub enum PageIndexError {
    /// The body is not one entry per page.
    #[error("page index has {len:#x} bytes, expected {want:#x} ({pages} pages)")]
    Length {
        /// Bytes found.
        len: usize,
        /// Bytes expected.
        want: u64,
        /// Pages of the block.
        pages: u64,
    },
    /// An entry points outside the stream.
    #[error("page index entry {page:#x} points at {pos:#x}, past the {state_len:#x}-byte state")]
    OutOfRange {
        /// The page.
        page: u64,
        /// The entry.
        pos: u64,
        /// Stream length.
        state_len: u64,
    },
}

/// A finished index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageIndex {
    /// Page size of the stream.
    pub page_size: u64,
    /// One entry per page ([`ABSENT`], [`ZERO`] or a data offset).
    pub entries: Vec<u64>,
}

impl PageIndex {
    /// The stored form: one be64 per page.
    pub fn encode(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    /// Decodes a stored body for a block of `pages` pages of `page_size` bytes in a stream of
    /// `state_len` bytes, checking every entry's range.
    pub fn decode(
        body: &[u8],
        pages: u64,
        page_size: u64,
        state_len: u64,
    ) -> Result<PageIndex, PageIndexError> {
        let want = pages.saturating_mul(8);
        if body.len() as u64 != want {
            return Err(PageIndexError::Length {
                len: body.len(),
                want,
                pages,
            });
        }
        let mut entries = Vec::with_capacity(body.len() / 8);
        for (page, b) in body.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            let pos = u64::from_be_bytes(w);
            if pos > ZERO
                && pos
                    .checked_add(page_size)
                    .map_or(true, |end| end > state_len)
            {
                return Err(PageIndexError::OutOfRange {
                    page: page as u64,
                    pos,
                    state_len,
                });
            }
            entries.push(pos);
        }
        Ok(PageIndex { page_size, entries })
    }
}

#[derive(Debug)]
struct Recording {
    block: String,
    page_size: u64,
    entries: Vec<u64>,
    /// A page went out in a form the index cannot point at (LZ4): no index.
    unusable: bool,
}

/// Collects the index while a stream is written; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct PageRecorder(Arc<Mutex<Recording>>);

impl PageRecorder {
    /// A recorder for the block `block` of `len` bytes in pages of `page_size` bytes.
    pub fn new(block: &str, len: u64, page_size: u64) -> PageRecorder {
        let pages = usize::try_from(len / page_size.max(1)).unwrap_or(0);
        PageRecorder(Arc::new(Mutex::new(Recording {
            block: block.to_string(),
            page_size: page_size.max(1),
            entries: vec![ABSENT; pages],
            unusable: false,
        })))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Recording) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records that page `addr` of `block` was written: its data at stream offset `data_at`,
    /// or a zero page (`None`).
    pub fn page(&self, block: &str, addr: u64, data_at: Option<u64>) {
        self.with(|r| {
            if r.block != block {
                return;
            }
            let i = usize::try_from(addr / r.page_size).unwrap_or(usize::MAX);
            if let Some(e) = r.entries.get_mut(i) {
                *e = data_at.unwrap_or(ZERO);
            }
        });
    }

    /// Records that a page of `block` went out compressed: the stream gets no index.
    pub fn page_unindexable(&self, block: &str) {
        self.with(|r| r.unusable |= r.block == block);
    }

    /// The index so far; `None` if a page could not be indexed.
    pub fn index(&self) -> Option<PageIndex> {
        self.with(|r| {
            (!r.unusable).then(|| PageIndex {
                page_size: r.page_size,
                entries: r.entries.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_copy_wins_and_other_blocks_are_ignored() {
        let r = PageRecorder::new("pc.ram", 4 * 4096, 4096);
        r.page("pc.ram", 0, Some(100));
        r.page("pc.ram", 4096, None);
        r.page("pc.ram", 0, Some(9000));
        r.page("other", 2 * 4096, Some(5));
        r.page("pc.ram", 99 * 4096, Some(5));
        let idx = r.index().unwrap();
        assert_eq!(idx.entries, [9000, ZERO, ABSENT, ABSENT]);
        let body = idx.encode();
        assert_eq!(body.len(), 32);
        assert_eq!(PageIndex::decode(&body, 4, 4096, 20_000).unwrap(), idx);
        r.page_unindexable("pc.ram");
        assert!(r.index().is_none());
    }

    #[test]
    fn bad_bodies_are_refused() {
        let idx = PageIndex {
            page_size: 4096,
            entries: vec![ZERO, 8192],
        };
        let body = idx.encode();
        let e = PageIndex::decode(&body[..8], 2, 4096, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("expected 0x10"), "{e}");
        let e = PageIndex::decode(&body, 2, 4096, 8192 + 4095).unwrap_err();
        assert!(e.to_string().contains("entry 0x1 points at 0x2000"), "{e}");
        assert!(PageIndex::decode(&body, 2, 4096, 8192 + 4096).is_ok());
    }
}
