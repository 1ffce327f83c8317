//! Postcopy, the destination's side: the postcopy header after the pre-copy stream, and a
//! [`PageSource`] over the channel for the userfaultfd page server (`vmm::page_server`,
//! the same one lazy loadvm uses).
//!
//! `fill` reads the source's page records in order and installs them; `fetch` (a vCPU
//! touched a missing page) sends REQ_PAGE on the return path and waits until the fill
//! thread has read that page. If the channel breaks, postcopy pauses (QEMU's
//! `postcopy-paused`): the fill thread keeps the pages it has and waits for
//! `migrate_recover` to hand it a new channel (`recover`), and `fetch` keeps the faulting
//! vCPU waiting; a malformed record still fails, and the page server then stops the VM
//! rather than let the guest run on pages it never received.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex};

use crate::vmm::page_server::{PageSink, PageSource, PageSourceError};

use super::postcopy::{self, PAGE, REC_EOS, REC_PAGE, REC_ZERO};
use super::recover::{self, Link, Relink};
use super::uri::Incoming;

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

/// Why reading the page records stopped early.
enum ReadEnd {
    /// The channel broke: postcopy pauses (why).
    Broken(String),
    /// The records are malformed: postcopy fails.
    Bad(PageSourceError),
}

/// The postcopy page source over the migration channel.
pub struct ChannelPages {
    reader: Mutex<Option<Box<dyn Read + Send>>>,
    writer: Mutex<Box<dyn Write + Send>>,
    ram_len: u64,
    /// Pages this side has (bit i = page i): those pre-copy left, then every record read.
    /// The fill thread takes it.
    received: Mutex<Option<Vec<u64>>>,
    waits: Mutex<Waits>,
    arrived: Condvar,
    relink: Relink,
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
    /// `writer`; `missing` is the header's bitmap (the other pages are here already).
    pub fn new(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        ram_len: u64,
        missing: &[u64],
    ) -> ChannelPages {
        let pages = ram_len / PAGE;
        ChannelPages {
            reader: Mutex::new(Some(reader)),
            writer: Mutex::new(writer),
            ram_len,
            received: Mutex::new(Some(recover::missing_of(missing, pages))),
            waits: Mutex::new(Waits::default()),
            arrived: Condvar::new(),
            relink: Relink::default(),
        }
    }

    /// Where the channel stands (paused, recovering).
    pub fn link(&self) -> Link {
        self.relink.link()
    }

    /// Whether `migrate_recover` would be taken now (before binding its listener).
    pub fn check_recover(&self) -> Result<(), recover::Refusal> {
        self.relink.check_offer()
    }

    /// `migrate_recover`: the paused fill accepts the new channel on `listener`. Refused
    /// unless postcopy is paused with no recovery pending.
    pub fn recover(&self, listener: super::uri::Listener) -> Result<(), recover::Refusal> {
        self.relink.offer(listener)
    }

    /// Pages requested so far.
    pub fn requests(&self) -> u64 {
        crate::vmm::lock(&self.waits).requests
    }

    fn end(&self, r: Result<(), String>) {
        crate::vmm::lock(&self.waits).ended = Some(r);
        self.arrived.notify_all();
    }

    /// Reads page records into `sink` until EOS (true) or the sink stops (false); marks
    /// each page read in `received`.
    fn read_records(
        &self,
        r: &mut dyn Read,
        sink: &mut PageSink<'_>,
        received: &mut [u64],
    ) -> Result<bool, ReadEnd> {
        let lost = |e: io::Error| {
            ReadEnd::Broken(format!(
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
                return Err(ReadEnd::Bad(PageSourceError(format!(
                    "postcopy: bad page record {word:#018x}"
                ))));
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
            let p = off / PAGE;
            if let Some(w) = received.get_mut(usize::try_from(p / 64).unwrap_or(usize::MAX)) {
                *w |= 1 << (p % 64);
            }
        }
    }

    /// Paused: waits for `migrate_recover`'s listener, accepts the source's `migrate -r`,
    /// tells it what this side has and asks again for the pages vCPUs wait for. Returns the
    /// new channel's reader; a failed attempt pauses again.
    fn reconnect(&self, received: &[u64]) -> Box<dyn Read + Send> {
        loop {
            let listener = self.relink.next_listener();
            match self.accept_resume(listener, received) {
                Ok(r) => {
                    self.relink.up();
                    return r;
                }
                Err(why) => self
                    .relink
                    .pause(format!("postcopy recovery failed: {why}")),
            }
        }
    }

    fn accept_resume(
        &self,
        listener: super::uri::Listener,
        received: &[u64],
    ) -> Result<Box<dyn Read + Send>, String> {
        let pages = self.ram_len / PAGE;
        let mut ch: Incoming = listener.accept().map_err(|e| e.to_string())?;
        self.relink.recovering();
        ch.set_read_timeout(Some(recover::RESUME_WAIT))
            .map_err(|e| format!("setting the read timeout: {e}"))?;
        recover::read_resume_header(&mut ch, pages)?;
        ch.set_read_timeout(None)
            .map_err(|e| format!("clearing the read timeout: {e}"))?;
        let mut w = ch
            .return_path()
            .ok_or("postcopy recovery needs a tcp: or unix: channel")?
            .map_err(|e| format!("opening the return path: {e}"))?;
        recover::write_received(&mut *w, pages, received)
            .map_err(|e| format!("sending the received bitmap: {e}"))?;
        // Faults that wait, again on the new channel (a fault that comes after the swap
        // sends its own request there).
        let mut writer = crate::vmm::lock(&self.writer);
        *writer = w;
        let waiting: Vec<u64> = crate::vmm::lock(&self.waits)
            .pages
            .iter()
            .filter(|(_, d)| d.is_none())
            .map(|(off, _)| *off)
            .collect();
        for off in waiting {
            send(&mut **writer, postcopy::RP_REQ_PAGE, off)
                .map_err(|e| format!("asking again for page {off:#x}: {e}"))?;
        }
        Ok(Box::new(ch))
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
        // A channel that broke pauses postcopy: the request is sent again on the recovered
        // channel, and the vCPU waits until then.
        let _ = send(
            &mut **crate::vmm::lock(&self.writer),
            postcopy::RP_REQ_PAGE,
            offset,
        );
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
        let (Some(mut r), Some(mut received)) = (
            crate::vmm::lock(&self.reader).take(),
            crate::vmm::lock(&self.received).take(),
        ) else {
            return Err(PageSourceError("postcopy pages read twice".into()));
        };
        loop {
            match self.read_records(&mut *r, sink, &mut received) {
                Ok(true) => {
                    self.end(Ok(()));
                    // Every page is in the sink's hands: tell the source it may let go.
                    let _ = send(&mut **crate::vmm::lock(&self.writer), postcopy::RP_DONE, 0);
                    return Ok(());
                }
                Ok(false) => {
                    self.end(Err("postcopy stopped".into()));
                    return Ok(());
                }
                Err(ReadEnd::Broken(why)) => {
                    eprintln!("vmsnap: {why}; postcopy paused, waiting for migrate_recover");
                    self.relink.pause(why);
                    r = self.reconnect(&received);
                }
                Err(ReadEnd::Bad(e)) => {
                    self.end(Err(e.0.clone()));
                    return Err(e);
                }
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

    /// Reads one return-path word.
    fn word(r: &mut dyn Read) -> u64 {
        let mut w = [0u8; 8];
        r.read_exact(&mut w).unwrap();
        u64::from_be_bytes(w)
    }

    #[test]
    fn a_cut_channel_pauses_and_a_recovered_one_carries_on() {
        use std::os::unix::net::UnixStream;
        use std::sync::Arc;
        let mut b = Vec::new();
        b.extend_from_slice(&(PAGE | REC_ZERO).to_be_bytes());
        b.extend_from_slice(&((2 * PAGE) | REC_PAGE).to_be_bytes());
        b.extend_from_slice(&[5u8; 100]); // cut inside the page
                                          // Pages 1, 2, 3 missing; page 0 came with pre-copy.
        let pages = Arc::new(ChannelPages::new(
            Box::new(io::Cursor::new(b)),
            Box::new(Vec::new()),
            4 * PAGE,
            &[0b1110],
        ));
        let got = Arc::new(Mutex::new(Vec::new()));
        let fill = {
            let (pages, got) = (Arc::clone(&pages), Arc::clone(&got));
            std::thread::spawn(move || {
                pages.fill(&mut |off, _, data| {
                    crate::vmm::lock(&got).push((off, data.map(|d| d[0])));
                    true
                })
            })
        };
        while !matches!(pages.link(), Link::Paused(_)) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*crate::vmm::lock(&got), [(PAGE, None)]);
        // A vCPU faults on page 3 while paused: it waits.
        let fetch = {
            let pages = Arc::clone(&pages);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; PAGE as usize];
                pages.fetch(3 * PAGE, &mut buf).map(|d| (d, buf[0]))
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!fetch.is_finished());
        let dir = tempfile::tempdir().unwrap();
        let uri = super::super::MigrateUri::Unix(dir.path().join("r.sock"));
        pages
            .recover(super::super::uri::Listener::bind(&uri).unwrap())
            .unwrap();
        let super::super::MigrateUri::Unix(path) = &uri else {
            unreachable!()
        };
        let mut src = UnixStream::connect(path).unwrap();
        recover::write_resume_header(&mut src, 4).unwrap();
        assert_eq!(word(&mut src), postcopy::RP_RECV_BITMAP);
        // Pages 0 (pre-copy) and 1 (read before the cut) are here.
        assert_eq!(recover::read_received(&mut src, 4).unwrap(), vec![0b0011]);
        assert_eq!(word(&mut src), (3 * PAGE) | postcopy::RP_REQ_PAGE);
        let mut rec = Vec::new();
        for p in [3u64, 2] {
            rec.extend_from_slice(&((p * PAGE) | REC_PAGE).to_be_bytes());
            rec.extend_from_slice(&[p as u8; PAGE as usize]);
        }
        rec.extend_from_slice(&REC_EOS.to_be_bytes());
        src.write_all(&rec).unwrap();
        assert_eq!(word(&mut src), postcopy::RP_DONE);
        assert!(fill.join().unwrap().is_ok());
        assert_eq!(fetch.join().unwrap().unwrap(), (true, 3));
        assert_eq!(pages.link(), Link::Up);
        assert_eq!(
            *crate::vmm::lock(&got),
            [(PAGE, None), (3 * PAGE, Some(3)), (2 * PAGE, Some(2))]
        );
    }

    #[test]
    fn a_bad_record_fails_fill_and_fetch() {
        let b = ((2 * PAGE) | 0x20).to_be_bytes().to_vec();
        let pages = ChannelPages::new(
            Box::new(io::Cursor::new(b)),
            Box::new(Vec::new()),
            4 * PAGE,
            &[0b1110],
        );
        let e = pages.fill(&mut |_, _, _| true).unwrap_err();
        assert!(e.0.contains("bad page record"), "{}", e.0);
        let mut buf = vec![0u8; PAGE as usize];
        assert!(pages.fetch(3 * PAGE, &mut buf).is_err());
    }
}
