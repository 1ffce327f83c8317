//! The source's XBZRLE path (capability `xbzrle`), QEMU 7.2's `save_xbzrle_page` rules:
//!
//! - No encoding during the first round through RAM (every page goes out whole once anyway).
//!   Unlike QEMU 7.2, that round fills the cache (pages that are not zero, no cache misses
//!   counted): QEMU leaves the cache empty then, so the second round misses on every page and
//!   sends it whole again; here the second round already encodes. Same stream, same decoder;
//!   one more copy per page sent in the first round.
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
        let last = self.last_stage;
        if !self.enabled {
            if !last {
                self.cache.insert(addr, page, age);
            }
            return Ok(Outcome::Normal);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::qemu_file::QemuFileReader;
    use crate::migration::ram::{RamBlockInfo, RamHeader, RamReader};

    #[test]
    fn misses_then_deltas_that_the_reader_applies() {
        let mut out: Vec<u8> = Vec::new();
        let mut f: Sink<'_> = Sink::new(&mut out);
        let mut w = RamWriter::new(4096, false).unwrap();
        let block = RamBlockInfo {
            idstr: "pc.ram".into(),
            used_length: 2 * 4096,
            mr_addr: None,
        };
        w.write_mem_size(&mut f, std::slice::from_ref(&block))
            .unwrap();
        let mut x = XbzrleSender::new(1 << 20, 4096);
        let mut page = vec![7u8; 4096];
        let mut save = |x: &mut XbzrleSender, addr, page: &[u8], age| {
            x.save(&mut w, &mut f, "pc.ram", addr, page, age).unwrap()
        };
        // First round: sent whole, and cached. Then an unchanged page, a delta.
        assert_eq!(save(&mut x, 4096, &page, 1), Outcome::Normal);
        x.round_complete();
        assert_eq!(save(&mut x, 4096, &page, 3), Outcome::Unchanged);
        page[100..108].copy_from_slice(b"changed!");
        assert_eq!(save(&mut x, 4096, &page, 4), Outcome::Encoded);
        // A page the first round did not send (it was zero): a miss, sent whole and cached.
        assert_eq!(save(&mut x, 0, &page, 4), Outcome::Normal);
        // Everything different: an overflow, sent whole (the cache follows).
        let other = vec![9u8; 4096];
        assert_eq!(save(&mut x, 4096, &other, 5), Outcome::Normal);
        let i = x.info();
        assert_eq!((i.cache_miss, i.pages, i.overflow), (1, 3, 1));
        // one delta record: name (1 + 6) + encoding byte + be16 + runs (2 + 8 bytes)
        assert_eq!(i.bytes, 7 + 3 + 10 + 4096);
        x.update_rates(5);
        assert!((x.info().cache_miss_rate - 0.2).abs() < 1e-9);
        f.flush().unwrap();
        drop(f);

        let mut r = QemuFileReader::new(&out[..]);
        let mut rr = RamReader::new(4096, false).unwrap();
        assert!(matches!(
            rr.read_header(&mut r).unwrap(),
            RamHeader::MemSize { .. }
        ));
        assert!(matches!(
            rr.read_header(&mut r).unwrap(),
            RamHeader::Page { addr: 4096, .. }
        ));
        let len = rr.xbzrle_len().expect("an XBZRLE record");
        let data = r.get_vec(len).unwrap();
        let mut dst = vec![7u8; 4096];
        crate::migration::xbzrle::decode(&data, &mut dst).unwrap();
        assert_eq!(dst, page);
    }
}
