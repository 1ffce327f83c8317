//! Postcopy, the destination's side: the postcopy header after the pre-copy stream, and a
//! [`PageSource`] over the channel for the userfaultfd page server (`vmm::page_server`,
//! the same one lazy loadvm uses).
//!
//! `fill` reads the source's page records in order and installs them; `fetch` (a vCPU
//! touched a missing page) sends REQ_PAGE on the return path and waits until the fill
//! thread has read that page. If the channel breaks, both fail: the page server stops the
//! VM rather than let the guest run on pages it never received.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex};

use crate::vmm::page_server::{PageSink, PageSource, PageSourceError};

use super::postcopy::{self, PAGE, REC_EOS, REC_PAGE, REC_ZERO};

/// Why the postcopy part could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// Reading or writing the channel failed.
    #[error("postcopy: {0}")]
    Io(#[from] io::Error),
    /// The header does not fit this VM.
    #[error("postcopy: {0}")]
    Header(String),
}

/// Sends a return-path message.
pub fn send(w: &mut dyn Write, kind: u64, offset: u64) -> io::Result<()> {
    w.write_all(&postcopy::rp_word(kind, offset))?;
    w.flush()
}

/// Reads the postcopy header for a RAM of `pages` pages: the missing-page bitmap, or None
/// when the source ended the stream there (it has postcopy-ram off).
pub fn read_header(r: &mut dyn Read, pages: u64) -> Result<Option<Vec<u64>>, PostcopyError> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut magic[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if u32::from_be_bytes(magic) != postcopy::MAGIC {
        return Err(PostcopyError::Header(format!(
            "expected the postcopy header, found {:#010x}",
            u32::from_be_bytes(magic)
        )));
    }
    let mut w = [0u8; 8];
    r.read_exact(&mut w)?;
    let theirs = u64::from_be_bytes(w);
    if theirs != pages {
        return Err(PostcopyError::Header(format!(
            "the source has {theirs} pages of RAM, this VM {pages}"
        )));
    }
    // Sized by our own RAM, never by the stream.
    let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
    let mut bits = vec![0u64; words];
    for b in bits.iter_mut() {
        r.read_exact(&mut w)?;
        *b = u64::from_be_bytes(w);
    }
    if pages % 64 != 0 {
        if let Some(last) = bits.last() {
            if last >> (pages % 64) != 0 {
                return Err(PostcopyError::Header("missing pages beyond RAM".into()));
            }
        }
    }
    Ok(Some(bits))
}

/// What `fetch` waits for, filled in by the fill thread.
#[derive(Debug, Default)]
struct Waits {
    /// Page offset → its data once read (empty = zero page).
    pages: HashMap<u64, Option<Vec<u8>>>,
    /// The fill ended: why, if it failed.
    ended: Option<Result<(), String>>,
    requests: u64,
}

/// The postcopy page source over the migration channel.
pub struct ChannelPages {
    reader: Mutex<Option<Box<dyn Read + Send>>>,
    writer: Mutex<Box<dyn Write + Send>>,
    ram_len: u64,
    waits: Mutex<Waits>,
    arrived: Condvar,
}

impl std::fmt::Debug for ChannelPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPages")
            .field("ram_len", &self.ram_len)
            .finish_non_exhaustive()
    }
}

impl ChannelPages {
    /// Pages of a RAM of `ram_len` bytes from `reader` (after the header), requests on
    /// `writer`.
    pub fn new(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        ram_len: u64,
    ) -> ChannelPages {
        ChannelPages {
            reader: Mutex::new(Some(reader)),
            writer: Mutex::new(writer),
            ram_len,
            waits: Mutex::new(Waits::default()),
            arrived: Condvar::new(),
        }
    }

    /// Pages requested so far.
    pub fn requests(&self) -> u64 {
        crate::vmm::lock(&self.waits).requests
    }

    fn end(&self, r: Result<(), String>) {
        crate::vmm::lock(&self.waits).ended = Some(r);
        self.arrived.notify_all();
    }

    fn read_records(
        &self,
        r: &mut dyn Read,
        sink: &mut PageSink<'_>,
    ) -> Result<bool, PageSourceError> {
        let lost = |e: io::Error| {
            PageSourceError(format!(
                "the migration source is gone during postcopy ({e}); the guest's RAM is \
                 incomplete"
            ))
        };
        let mut page = vec![0u8; PAGE as usize];
        loop {
            let mut w = [0u8; 8];
            r.read_exact(&mut w).map_err(lost)?;
            let word = u64::from_be_bytes(w);
            let (off, flags) = (word & !(PAGE - 1), word & (PAGE - 1));
            if flags == REC_EOS && off == 0 {
                return Ok(true);
            }
            if off >= self.ram_len || !(flags == REC_PAGE || flags == REC_ZERO) {
                return Err(PageSourceError(format!(
                    "postcopy: bad page record {word:#018x}"
                )));
            }
            let data = if flags == REC_PAGE {
                r.read_exact(&mut page).map_err(lost)?;
                Some(&page[..])
            } else {
                None
            };
            {
                let mut w = crate::vmm::lock(&self.waits);
                if let Some(slot) = w.pages.get_mut(&off) {
                    *slot = Some(data.map(<[u8]>::to_vec).unwrap_or_default());
                    self.arrived.notify_all();
                }
            }
            if !sink(off, PAGE, data) {
                return Ok(false);
            }
        }
    }
}

impl PageSource for ChannelPages {
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<bool, PageSourceError> {
        let mut w = crate::vmm::lock(&self.waits);
        if let Some(Err(why)) = &w.ended {
            return Err(PageSourceError(why.clone()));
        }
        w.pages.insert(offset, None);
        w.requests += 1;
        drop(w);
        send(
            &mut **crate::vmm::lock(&self.writer),
            postcopy::RP_REQ_PAGE,
            offset,
        )
        .map_err(|e| {
            PageSourceError(format!(
                "asking the migration source for page {offset:#x}: {e}; the guest's RAM is \
                 incomplete"
            ))
        })?;
        let mut w = crate::vmm::lock(&self.waits);
        loop {
            if let Some(Some(data)) = w.pages.get(&offset) {
                let zero = data.is_empty();
                if !zero {
                    buf.copy_from_slice(data);
                }
                w.pages.remove(&offset);
                return Ok(!zero);
            }
            match &w.ended {
                Some(Err(why)) => return Err(PageSourceError(why.clone())),
                // Every page went through the fill, this one too: it is installed.
                Some(Ok(())) => {
                    w.pages.remove(&offset);
                    return Ok(false);
                }
                None => {}
            }
            w = self.arrived.wait(w).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fill(&self, sink: &mut PageSink<'_>) -> Result<(), PageSourceError> {
        let Some(mut r) = crate::vmm::lock(&self.reader).take() else {
            return Err(PageSourceError("postcopy pages read twice".into()));
        };
        match self.read_records(&mut *r, sink) {
            Ok(true) => {
                self.end(Ok(()));
                // Every page is in the sink's hands: tell the source it may let go.
                let _ = send(&mut **crate::vmm::lock(&self.writer), postcopy::RP_DONE, 0);
                Ok(())
            }
            Ok(false) => {
                self.end(Err("postcopy stopped".into()));
                Ok(())
            }
            Err(e) => {
                self.end(Err(e.0.clone()));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_checked_against_our_ram() {
        let mut b = Vec::new();
        postcopy::write_header(&mut b, 70, &[1, 0b10]).unwrap();
        assert_eq!(read_header(&mut &b[..], 70).unwrap(), Some(vec![1, 0b10]));
        assert!(read_header(&mut &b[..], 64)
            .unwrap_err()
            .to_string()
            .contains("70 pages"));
        assert_eq!(read_header(&mut &[][..], 70).unwrap(), None);
        assert!(read_header(&mut &b[..7], 70).is_err());
        let mut bad = Vec::new();
        postcopy::write_header(&mut bad, 70, &[0, 1 << 6]).unwrap();
        assert!(read_header(&mut &bad[..], 70).is_err());
    }

    #[test]
    fn a_cut_channel_fails_fill_and_fetch() {
        let mut b = Vec::new();
        b.extend_from_slice(&(PAGE | REC_ZERO).to_be_bytes());
        b.extend_from_slice(&((2 * PAGE) | REC_PAGE).to_be_bytes());
        b.extend_from_slice(&[5u8; 100]); // cut inside the page
        let pages = ChannelPages::new(Box::new(io::Cursor::new(b)), Box::new(Vec::new()), 4 * PAGE);
        let mut got = Vec::new();
        let e = pages
            .fill(&mut |off, _, data| {
                got.push((off, data.is_some()));
                true
            })
            .unwrap_err();
        assert_eq!(got, [(PAGE, false)]);
        assert!(e.0.contains("source is gone"), "{}", e.0);
        let mut buf = vec![0u8; PAGE as usize];
        assert!(pages.fetch(3 * PAGE, &mut buf).is_err());
    }
}
