//! The source's XBZRLE path (capability `xbzrle`), QEMU 7.2's `save_xbzrle_page` rules:
//!
//! - Off during the first round through RAM (every page goes out whole once anyway).
//! - A page not in the cache is a cache miss: it is cached (outside the final stage) and sent
//!   as a normal page, from the cached copy, so that cache and destination agree.
//! - A cached page is encoded against its cached copy: equal pages are not sent at all; an
//!   encoding that would not fit one page is an overflow and the page goes out whole; else
//!   an XBZRLE record. The cache takes the new contents in every case but the unchanged one
//!   (and never in the final stage, when nothing will be re-sent).
//! - Zero pages go out as ZERO records and are cached as zero.
//!
//! The cache is [`PageCache`], bounded by the `xbzrle-cache-size` parameter. Figures for
//! `info migrate` are QEMU's `xbzrle_counters`.

use crate::migration::ram::RamWriter;
use crate::migration::savevm::Sink;
use crate::migration::xbzrle::{encode, PageCache};

use super::info::XbzrleInfo;

/// What became of a page handed to [`XbzrleSender::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent as an XBZRLE record.
    Encoded,
    /// Equal to what was sent before: nothing written.
    Unchanged,
    /// The caller sends it as a normal page (cache miss or overflow).
    Normal,
}

/// XBZRLE state of one migration.
#[derive(Debug)]
pub struct XbzrleSender {
    cache: PageCache,
    page_size: usize,
    /// Set once the first round through RAM is complete.
    enabled: bool,
    /// The final stage: the cache is no longer updated.
    pub last_stage: bool,
    encoded: Vec<u8>,
    zero: Vec<u8>,
    info: XbzrleInfo,
    /// (cache misses, pages sent, xbzrle pages, xbzrle bytes) at the last rate update.
    prev: (u64, u64, u64, u64),
}

impl XbzrleSender {
    /// A sender with a cache of `cache_size` bytes of `page_size` pages.
    pub fn new(cache_size: u64, page_size: usize) -> Self {
        let cache = PageCache::new(cache_size, page_size);
        XbzrleSender {
            info: XbzrleInfo {
                cache_size: cache.size(),
                ..XbzrleInfo::default()
            },
            cache,
            page_size,
            enabled: false,
            last_stage: false,
            encoded: Vec::with_capacity(page_size),
            zero: vec![0; page_size],
            prev: (0, 0, 0, 0),
        }
    }

    /// The first round through RAM is complete: re-sent pages may be encoded from now on.
    pub fn round_complete(&mut self) {
        self.enabled = true;
    }

    /// The figures for `info migrate`.
    pub fn info(&self) -> XbzrleInfo {
        self.info
    }

    /// A zero page at `addr` was sent (as a ZERO record) at dirty sync `age`.
    pub fn zero_page(&mut self, addr: u64, age: u64) {
        if self.enabled && !self.last_stage {
            let zero = std::mem::take(&mut self.zero);
            self.cache.insert(addr, &zero, age);
            self.zero = zero;
        }
    }

    /// Sends `page` (a stable copy of the page at `addr`, not all zero) as XBZRLE if it can;
    /// [`Outcome::Normal`] leaves the sending to the caller, with `page` as the data.
    pub fn save(
        &mut self,
        w: &mut RamWriter,
        f: &mut Sink<'_>,
        block: &str,
        addr: u64,
        page: &[u8],
        age: u64,
    ) -> Result<Outcome, String> {
        if !self.enabled {
            return Ok(Outcome::Normal);
        }
        let last = self.last_stage;
        let Some(cached) = self.cache.get_mut(addr, age) else {
            self.info.cache_miss += 1;
            if !last {
                self.cache.insert(addr, page, age);
            }
            return Ok(Outcome::Normal);
        };
        self.info.pages += 1;
        let n = encode(cached, page, self.page_size, &mut self.encoded);
        if !last && n != Some(0) {
            cached.copy_from_slice(page);
        }
        match n {
            Some(0) => Ok(Outcome::Unchanged),
            None => {
                self.info.overflow += 1;
                self.info.bytes += self.page_size as u64;
                Ok(Outcome::Normal)
            }
            Some(_) => {
                let start = f.position();
                w.write_xbzrle_page(f, block, addr, &self.encoded)
                    .map_err(|e| e.to_string())?;
                // QEMU leaves the 8-byte record word out of the figure.
                self.info.bytes += f.position() - start - 8;
                Ok(Outcome::Encoded)
            }
        }
    }

    /// Updates the cache-miss and encoding rates over the period since the last call, in
    /// which `pages_sent` pages (all kinds, counted since the start) went out.
    pub fn update_rates(&mut self, pages_sent: u64) {
        let i = &mut self.info;
        let (miss0, sent0, pages0, bytes0) = self.prev;
        let sent = pages_sent.saturating_sub(sent0);
        if sent > 0 {
            i.cache_miss_rate = (i.cache_miss - miss0) as f64 / sent as f64;
        }
        let encoded = i.bytes - bytes0;
        i.encoding_rate = if i.pages == pages0 || encoded == 0 {
            0.0
        } else {
            ((i.pages - pages0) * self.page_size as u64) as f64 / encoded as f64
        };
        self.prev = (i.cache_miss, pages_sent, i.pages, i.bytes);
    }
}
