//! The page source of a lazy loadvm: guest RAM pages from a snapshot's VM state, found
//! through the snapshot's page index, read through a second, read-only open of the image.
//!
//! The index (one be64 per page, `migration::page_index`) is not read before the resume: it
//! grows with RAM (2 MiB per GiB), and reading and checking it whole made the restore grow
//! too (4.4 / 7.9 / 20 ms at 1 / 2 / 4 GiB). It is read in chunks of [`CHUNK_PAGES`]
//! entries as faults first need them, each entry range-checked against the state as it is
//! decoded; the background fill then reads it whole, compares its CRC-32 with the record
//! before it installs a single page, and the whole stream's CRC-32 at the end, as before.
//! A damaged index or state stops the VM with an error naming the snapshot (the page
//! server's failure path): it never runs on silently. So the resume waits only for
//! constant work: the records, the device part of the stream, the goto.

use std::sync::{Mutex, OnceLock};

use crate::block::{self, BlockDriver, OpenOptions};
use crate::interop::integrity::{self, StateChecksum};
use crate::interop::page_index_record::PageIndexRecord;
use crate::migration::page_index::{PageIndex, ZERO};
use crate::vmm::page_server::{PageSink, PageSource, PageSourceError};

use super::lazy::DrivePath;
use super::state_io::PAGE_SIZE;
use super::{Result, SnapshotError};

/// Index entries read at a time on a fault: 64 KiB of index, 32 MiB of guest RAM.
pub const CHUNK_PAGES: u64 = 8192;
/// Pages per run handed to the page server by the fill (256 KiB).
const RUN_PAGES: usize = 64;
/// Bytes of stream read at a time by the fill.
const FILL_CHUNK: u64 = 4 << 20;

/// Where the index is and what it must add up to.
#[derive(Debug, Clone, Copy)]
pub struct IndexAt {
    /// Offset of the body in the VM state area.
    pub offset: u64,
    /// Pages (entries).
    pub pages: u64,
    /// CRC-32 of the body.
    pub crc: u32,
}

impl IndexAt {
    /// From the snapshot's record (already checked to fit the state).
    pub fn of(record: &PageIndexRecord, pages: u64) -> IndexAt {
        IndexAt {
            offset: record.index_offset,
            pages,
            crc: record.index_crc,
        }
    }
}

/// Guest RAM pages from a snapshot's VM state, through a read-only open of its image.
pub struct SnapshotPages {
    tag: String,
    id: String,
    image: Mutex<Box<dyn BlockDriver>>,
    index: IndexAt,
    /// Decoded chunks of the index, read on first use.
    chunks: Vec<OnceLock<Box<[u64]>>>,
    state_len: u64,
    checksum: StateChecksum,
}

impl SnapshotPages {
    /// Opens the image of `drive` a second time, read-only and lock-free, for snapshot
    /// `id` (`tag` for messages) whose state is `state_len` bytes with checksum `checksum`.
    pub fn open(
        drive: &DrivePath,
        tag: &str,
        id: &str,
        state_len: u64,
        checksum: StateChecksum,
        index: IndexAt,
    ) -> Result<Self> {
        let opts = OpenOptions {
            read_only: true,
            format: drive.format,
            force_share: true,
        };
        let image = block::open_image(&drive.path, opts).map_err(|source| SnapshotError::Read {
            tag: tag.to_string(),
            source,
        })?;
        let chunks = (0..index.pages.div_ceil(CHUNK_PAGES))
            .map(|_| OnceLock::new())
            .collect();
        Ok(SnapshotPages {
            tag: tag.to_string(),
            id: id.to_string(),
            image: Mutex::new(image),
            index,
            chunks,
            state_len,
            checksum,
        })
    }

    fn read(&self, pos: u64, buf: &mut [u8]) -> std::result::Result<(), PageSourceError> {
        let mut image = self.image.lock().unwrap_or_else(|e| e.into_inner());
        let store = image.snapshots().ok_or_else(|| {
            PageSourceError(format!("snapshot '{}': image lost its snapshots", self.tag))
        })?;
        store
            .snapshot_vmstate_read(&self.id, pos, buf)
            .map_err(|e| {
                PageSourceError(format!(
                    "snapshot '{}': reading the VM state at {pos:#x}: {e}",
                    self.tag
                ))
            })
    }

    fn damaged_index(&self, why: impl std::fmt::Display) -> PageSourceError {
        PageSourceError(format!(
            "snapshot '{}': VM state is damaged: page index is damaged: {why}",
            self.tag
        ))
    }

    /// Decodes index bytes for `pages` entries, each checked to lie inside the state.
    fn decode(&self, body: &[u8], pages: u64) -> std::result::Result<Vec<u64>, PageSourceError> {
        PageIndex::decode(body, pages, PAGE_SIZE, self.state_len)
            .map(|i| i.entries)
            .map_err(|e| self.damaged_index(e))
    }

    /// Chunk `c` of the index, read and decoded on first use.
    fn chunk(&self, c: usize) -> std::result::Result<&[u64], PageSourceError> {
        let cell = &self.chunks[c];
        if let Some(entries) = cell.get() {
            return Ok(entries);
        }
        let first = c as u64 * CHUNK_PAGES;
        let pages = CHUNK_PAGES.min(self.index.pages - first);
        let mut body = vec![0u8; usize::try_from(pages * 8).unwrap_or(0)];
        self.read(self.index.offset + first * 8, &mut body)?;
        let entries = self.decode(&body, pages)?;
        // Two faults may race to the same chunk: both decoded the same bytes.
        let _ = cell.set(entries.into_boxed_slice());
        Ok(cell.get().map_or(&[][..], |e| &e[..]))
    }

    /// The whole index, read in one pass and checked against its CRC-32.
    fn whole_index(&self) -> std::result::Result<Vec<u64>, PageSourceError> {
        let mut body = vec![0u8; usize::try_from(self.index.pages * 8).unwrap_or(0)];
        self.read(self.index.offset, &mut body)?;
        let crc = crc32fast::hash(&body);
        if crc != self.index.crc {
            return Err(self.damaged_index(format_args!(
                "CRC32 is {crc:#010x}, stored {:#010x}",
                self.index.crc
            )));
        }
        self.decode(&body, self.index.pages)
    }

    /// Hands runs of zero (or absent) pages of `entries` to `sink`.
    fn fill_zero(entries: &[u64], sink: &mut PageSink<'_>) -> bool {
        let mut p = 0;
        while p < entries.len() {
            if entries[p] > ZERO {
                p += 1;
                continue;
            }
            let start = p;
            while p < entries.len() && entries[p] <= ZERO && p - start < 4096 {
                p += 1;
            }
            let n = (p - start) as u64;
            if !sink(start as u64 * PAGE_SIZE, n * PAGE_SIZE, None) {
                return false;
            }
        }
        true
    }
}

impl PageSource for SnapshotPages {
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<bool, PageSourceError> {
        let page = offset / PAGE_SIZE;
        if page >= self.index.pages {
            return Err(PageSourceError(format!(
                "snapshot '{}': page {offset:#x} is outside guest RAM",
                self.tag
            )));
        }
        let chunk = self.chunk(usize::try_from(page / CHUNK_PAGES).unwrap_or(usize::MAX))?;
        match chunk.get(usize::try_from(page % CHUNK_PAGES).unwrap_or(usize::MAX)) {
            Some(&pos) if pos > ZERO => self.read(pos, buf).map(|()| true),
            _ => Ok(false),
        }
    }

    /// The index whole (CRC-checked) first, then zero pages, then the whole stream once in
    /// order: each page's last copy is handed on as the pass reaches it, and the CRC-32 of all
    /// bytes is compared with the snapshot's checksum record at the end.
    fn fill(&self, sink: &mut PageSink<'_>) -> std::result::Result<(), PageSourceError> {
        let entries = self.whole_index()?;
        if !Self::fill_zero(&entries, sink) {
            return Ok(());
        }
        let mut order: Vec<(u64, u32)> = entries
            .iter()
            .enumerate()
            .filter(|(_, &pos)| pos > ZERO)
            .map(|(p, &pos)| (pos, u32::try_from(p).unwrap_or(u32::MAX)))
            .collect();
        drop(entries);
        order.sort_unstable();
        let ps = PAGE_SIZE as usize;
        let mut crc = crc32fast::Hasher::new();
        // `window` holds stream bytes [base, base + window.len()).
        let (mut window, mut base, mut read_to) = (Vec::new(), 0u64, 0u64);
        let mut run: Vec<u8> = Vec::with_capacity(RUN_PAGES * ps);
        let mut run_start: Option<u64> = None;
        let mut next = 0;
        while read_to < self.state_len || next < order.len() {
            if read_to < self.state_len {
                let n = FILL_CHUNK.min(self.state_len - read_to);
                let old = window.len();
                window.resize(old + usize::try_from(n).unwrap_or(0), 0);
                self.read(read_to, &mut window[old..])?;
                crc.update(&window[old..]);
                read_to += n;
                crate::killpoint::at("loadvm-lazy:fill-read");
            }
            // Every page whose data is in the window now.
            while let Some(&(pos, page)) = order.get(next) {
                if pos + PAGE_SIZE > read_to {
                    break;
                }
                let at = usize::try_from(pos - base).unwrap_or(usize::MAX);
                let page = u64::from(page);
                let contiguous = run_start.is_some_and(|s| {
                    s + (run.len() / ps) as u64 == page && run.len() < RUN_PAGES * ps
                });
                if !contiguous {
                    if let Some(s) = run_start.take() {
                        if !sink(s * PAGE_SIZE, run.len() as u64, Some(&run)) {
                            return Ok(());
                        }
                    }
                    run.clear();
                    run_start = Some(page);
                }
                run.extend_from_slice(&window[at..at + ps]);
                next += 1;
            }
            if read_to >= self.state_len && order.get(next).is_some() {
                return Err(PageSourceError(format!(
                    "snapshot '{}': page data past the end of the VM state",
                    self.tag
                )));
            }
            // Keep only what the next page still needs.
            let keep_from = order
                .get(next)
                .map_or(read_to, |&(pos, _)| pos.min(read_to));
            let drop = usize::try_from(keep_from - base)
                .unwrap_or(0)
                .min(window.len());
            window.drain(..drop);
            base += drop as u64;
        }
        if let Some(s) = run_start {
            if !sink(s * PAGE_SIZE, run.len() as u64, Some(&run)) {
                return Ok(());
            }
        }
        integrity::verify(&self.tag, &self.checksum, self.state_len, crc.finalize())
            .map_err(|e| PageSourceError(e.to_string()))?;
        crate::killpoint::at("loadvm-lazy:filled");
        Ok(())
    }
}
