//! Postcopy, the source's side and the wire records (QEMU's `postcopy-ram` capability and
//! `migrate_start_postcopy`; `migration/postcopy-ram.c`, `ram.c` `ram_save_queue_pages`).
//!
//! ```text
//!  destination                                   source
//!  accept ── ADVISE ───────── return path ──────▶ (wait for it: postcopy agreed)
//!  ◀── pre-copy stream (header … vmdesc) ─────── iterate; on migrate_start_postcopy: stop,
//!                                                 keep the dirty pages back, devices, vmdesc
//!  load ── LOADED ───────────────────────────────▶
//!  ◀── "VPCY", pages, missing bitmap ───────────── (empty bitmap if pre-copy finished)
//!  guest runs; a fault ── REQ_PAGE(offset) ──────▶ answered before the background pages
//!  ◀── PAGE/ZERO records …, EOS ───────────────── every missing page once (+ requested ones)
//!  all pages in ── DONE ─────────────────────────▶ completed
//! ```
//!
//! The records are vmsnap's own (QEMU multiplexes its return path with a different
//! layout); they are documented in `formats/live-migration.md`. The destination's page source
//! is `postcopy_pages`; it plugs into the userfaultfd page server lazy loadvm uses.

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// First word of the postcopy part, after the pre-copy stream's vmdesc: "VPCY".
pub const MAGIC: u32 = 0x5650_4359;
/// Page record flags (the RAM section's values): a page of data follows.
pub const REC_PAGE: u64 = 0x08;
/// A zero page (no data).
pub const REC_ZERO: u64 = 0x02;
/// The last record: every missing page was sent.
pub const REC_EOS: u64 = 0x10;
/// Return path: the destination has postcopy-ram on and listens for pages.
pub const RP_ADVISE: u64 = 0x01;
/// Return path: the pre-copy stream is loaded; send the postcopy part.
pub const RP_LOADED: u64 = 0x02;
/// Return path: the guest needs the page at the word's offset (QEMU's REQ_PAGES).
pub const RP_REQ_PAGE: u64 = 0x03;
/// Return path: every page is in; the source may let go.
pub const RP_DONE: u64 = 0x04;
/// Return path, on a recovered channel: the pages the destination has (be64 page count,
/// then the bitmap; QEMU's MIG_RP_MSG_RECV_BITMAP). See `recover`.
pub const RP_RECV_BITMAP: u64 = 0x05;
/// Page size of the records.
pub const PAGE: u64 = 4096;
const KIND_MASK: u64 = PAGE - 1;

/// How long the source waits for the destination's ADVISE (sent as soon as it accepted the
/// connection; a destination without postcopy-ram never sends it).
pub const ADVISE_WAIT: Duration = Duration::from_secs(10);
/// How long the source waits for LOADED and DONE (the destination's work on data it has).
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(60);
/// Requests queued on the source at most (the destination asks one page at a time).
const QUEUE: usize = 1024;

/// A return-path message, as the source's reader thread hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMsg {
    /// [`RP_ADVISE`].
    Advise,
    /// [`RP_LOADED`].
    Loaded,
    /// [`RP_REQ_PAGE`] with the page's RAM offset.
    Request(u64),
    /// [`RP_DONE`].
    Done,
    /// [`RP_RECV_BITMAP`] with its bitmap (bit i = page i received), checked against our
    /// RAM's page count.
    RecvBitmap(Vec<u64>),
    /// The return path ended (EOF) or failed, or sent something unknown: why.
    Closed(String),
}

/// Encodes a return-path message (`be64 offset | kind`).
pub fn rp_word(kind: u64, offset: u64) -> [u8; 8] {
    ((offset & !KIND_MASK) | kind).to_be_bytes()
}

/// Decodes a return-path word.
pub fn rp_decode(word: u64) -> RpMsg {
    let off = word & !KIND_MASK;
    match word & KIND_MASK {
        RP_ADVISE if off == 0 => RpMsg::Advise,
        RP_LOADED if off == 0 => RpMsg::Loaded,
        RP_REQ_PAGE => RpMsg::Request(off),
        RP_DONE if off == 0 => RpMsg::Done,
        _ => RpMsg::Closed(format!("unknown return-path message {word:#018x}")),
    }
}

/// The source's end of the return path: a thread reads the destination's messages.
#[derive(Debug)]
pub struct ReturnPath {
    rx: Receiver<RpMsg>,
}

impl ReturnPath {
    /// Starts reading `r` (the channel's receiving half) on a thread of its own, which ends
    /// with the channel. `pages` is the guest RAM's page count (a received bitmap must
    /// match it; it bounds what the reader allocates).
    pub fn start(mut r: Box<dyn Read + Send>, pages: u64) -> io::Result<ReturnPath> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("mig-return-path".into())
            .spawn(move || loop {
                let mut w = [0u8; 8];
                let msg = match r.read_exact(&mut w) {
                    Ok(()) if u64::from_be_bytes(w) == RP_RECV_BITMAP => {
                        match super::recover::read_received(&mut r, pages) {
                            Ok(bits) => RpMsg::RecvBitmap(bits),
                            Err(e) => RpMsg::Closed(e.to_string()),
                        }
                    }
                    Ok(()) => rp_decode(u64::from_be_bytes(w)),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        RpMsg::Closed("the destination closed the connection".into())
                    }
                    Err(e) => RpMsg::Closed(format!("reading the return path: {e}")),
                };
                let last = matches!(msg, RpMsg::Closed(_));
                if tx.send(msg).is_err() || last {
                    return;
                }
            })?;
        Ok(ReturnPath { rx })
    }

    /// Waits up to `wait` for `want` (requests before it are dropped: none can come before
    /// LOADED).
    pub fn expect(&self, want: &RpMsg, wait: Duration, what: &str) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) if m == *want => return Ok(()),
                Ok(RpMsg::Closed(why)) => return Err(format!("{what}: {why}")),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{what}: no answer in {wait:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("{what}: the return path is gone"))
                }
            }
        }
    }
}

impl ReturnPath {
    /// Waits up to `wait` for the destination's received bitmap (the first message on a
    /// recovered channel).
    pub fn expect_bitmap(&self, wait: Duration) -> Result<Vec<u64>, String> {
        let what = "waiting for the destination's received-page bitmap";
        match self.rx.recv_timeout(wait) {
            Ok(RpMsg::RecvBitmap(bits)) => Ok(bits),
            Ok(RpMsg::Advise) => Err(format!(
                "{what}: the destination waits for a new migration, not a paused postcopy"
            )),
            Ok(RpMsg::Closed(why)) => Err(format!("{what}: {why}")),
            Ok(m) => Err(format!("{what}: unexpected return-path message {m:?}")),
            Err(RecvTimeoutError::Timeout) => Err(format!("{what}: no answer in {wait:?}")),
            Err(RecvTimeoutError::Disconnected) => Err(format!("{what}: the return path is gone")),
        }
    }
}

/// Postcopy figures for `info migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyCounters {
    /// Pages the destination asked for (QEMU's `postcopy-requests`).
    pub requests: u64,
    /// Bytes sent in the postcopy phase.
    pub bytes: u64,
    /// Missing pages not sent yet.
    pub remaining: u64,
    /// Zero pages sent.
    pub zero: u64,
    /// Pages with data sent.
    pub normal: u64,
}

/// Writes the postcopy header: magic, page count, the missing-page bitmap. Returns bytes.
pub fn write_header(out: &mut dyn Write, pages: u64, missing: &[u64]) -> io::Result<u64> {
    let mut b = Vec::with_capacity(12 + missing.len() * 8);
    b.extend_from_slice(&MAGIC.to_be_bytes());
    b.extend_from_slice(&pages.to_be_bytes());
    for w in missing {
        b.extend_from_slice(&w.to_be_bytes());
    }
    out.write_all(&b)?;
    out.flush()?;
    Ok(b.len() as u64)
}

fn clear(bits: &mut [u64], p: u64) -> bool {
    match bits.get_mut(usize::try_from(p / 64).unwrap_or(usize::MAX)) {
        Some(w) if *w & (1 << (p % 64)) != 0 => {
            *w &= !(1 << (p % 64));
            true
        }
        _ => false,
    }
}

fn next_set(bits: &[u64], from: u64) -> Option<u64> {
    let mut i = usize::try_from(from / 64).ok()?;
    let mut mask = !0u64 << (from % 64);
    while let Some(w) = bits.get(i) {
        let b = w & mask;
        if b != 0 {
            return Some(i as u64 * 64 + u64::from(b.trailing_zeros()));
        }
        i += 1;
        mask = !0;
    }
    None
}

/// Sends the missing pages of `ram` (stable: the source's guest is stopped), answering the
/// destination's requests first, then EOS, and waits for DONE. The background pages go at
/// most at `bandwidth` bytes per second (0 = no limit; QEMU's `max-postcopy-bandwidth`).
/// `progress` sees the figures now and then. An error means the channel broke: the guest's
/// RAM is split between the two sides from here on.
pub fn send_pages(
    out: &mut dyn Write,
    ram: &[u8],
    mut missing: Vec<u64>,
    rp: &ReturnPath,
    bandwidth: u64,
    progress: &mut dyn FnMut(&PostcopyCounters),
) -> Result<PostcopyCounters, String> {
    let pages = ram.len() as u64 / PAGE;
    let mut c = PostcopyCounters {
        remaining: missing.iter().map(|w| u64::from(w.count_ones())).sum(),
        ..PostcopyCounters::default()
    };
    let mut rec = Vec::with_capacity(8 + PAGE as usize);
    let mut send = |out: &mut dyn Write, p: u64, c: &mut PostcopyCounters| -> Result<(), String> {
        let at = usize::try_from(p * PAGE).unwrap_or(usize::MAX);
        let page = ram
            .get(at..at + PAGE as usize)
            .ok_or_else(|| format!("page {p} is outside guest RAM"))?;
        rec.clear();
        if crate::migration::ram::is_zero(page) {
            rec.extend_from_slice(&((p * PAGE) | REC_ZERO).to_be_bytes());
            c.zero += 1;
        } else {
            rec.extend_from_slice(&((p * PAGE) | REC_PAGE).to_be_bytes());
            rec.extend_from_slice(page);
            c.normal += 1;
        }
        out.write_all(&rec)
            .map_err(|e| format!("sending page {:#x}: {e}", p * PAGE))?;
        c.bytes += rec.len() as u64;
        Ok(())
    };
    let mut cursor = 0u64;
    let mut last_report = Instant::now();
    let started = Instant::now();
    let mut background = 0u64;
    loop {
        // The destination's requests first: a vCPU waits for each.
        loop {
            match rp.rx.try_recv() {
                Ok(RpMsg::Request(off)) if off / PAGE < pages => {
                    c.requests += 1;
                    send(out, off / PAGE, &mut c)?;
                    if clear(&mut missing, off / PAGE) {
                        c.remaining -= 1;
                    }
                    out.flush().map_err(|e| e.to_string())?;
                }
                Ok(RpMsg::Request(off)) => {
                    return Err(format!(
                        "the destination asked for page {off:#x}, outside guest RAM"
                    ))
                }
                Ok(RpMsg::Closed(why)) => return Err(why),
                Ok(m) => return Err(format!("unexpected return-path message {m:?}")),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err("the return path is gone".into()),
            }
        }
        if last_report.elapsed() >= Duration::from_millis(100) {
            progress(&c);
            last_report = Instant::now();
        }
        if bandwidth > 0 {
            let due = Duration::from_secs_f64(background as f64 / bandwidth as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                // Short naps, so that requests are still answered at once.
                std::thread::sleep(wait.min(Duration::from_millis(2)));
                continue;
            }
        }
        let Some(p) = next_set(&missing, cursor) else {
            break;
        };
        let before = c.bytes;
        send(out, p, &mut c)?;
        background += c.bytes - before;
        clear(&mut missing, p);
        c.remaining -= 1;
        cursor = p + 1;
    }
    out.write_all(&REC_EOS.to_be_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("ending the postcopy pages: {e}"))?;
    c.bytes += 8;
    progress(&c);
    // Requests still arriving raced with the last pages: they are in by now.
    rp.expect(
        &RpMsg::Done,
        HANDSHAKE_WAIT,
        "waiting for the destination to have every page",
    )?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_path_words_round_trip_and_bad_ones_close() {
        for (kind, off, want) in [
            (RP_ADVISE, 0, RpMsg::Advise),
            (RP_LOADED, 0, RpMsg::Loaded),
            (RP_REQ_PAGE, 0x7000, RpMsg::Request(0x7000)),
            (RP_DONE, 0, RpMsg::Done),
        ] {
            assert_eq!(rp_decode(u64::from_be_bytes(rp_word(kind, off))), want);
        }
        assert!(matches!(rp_decode(0x1005), RpMsg::Closed(_)));
        assert!(matches!(rp_decode(0x1001), RpMsg::Closed(_)));
    }

    #[test]
    fn requested_pages_go_first_then_the_rest_once_each() {
        let mut ram = vec![0u8; 8 * PAGE as usize];
        ram[5 * PAGE as usize] = 7;
        ram[2 * PAGE as usize + 9] = 1;
        // Pages 1, 2, 5 missing; the destination asks for 5 and says DONE once it has EOS.
        let missing = vec![0b10_0110u64];
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.write_all(&rp_word(RP_REQ_PAGE, 5 * PAGE)).unwrap();
        let rp = ReturnPath::start(Box::new(ours), 8).unwrap();
        // Let the reader queue the request before sending starts.
        std::thread::sleep(Duration::from_millis(50));
        struct Dest(Vec<u8>, std::os::unix::net::UnixStream);
        impl Write for Dest {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.extend_from_slice(b);
                if b == REC_EOS.to_be_bytes() {
                    self.1.write_all(&rp_word(RP_DONE, 0))?;
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut dest = Dest(Vec::new(), theirs);
        let c = send_pages(&mut dest, &ram, missing, &rp, 0, &mut |_| {}).unwrap();
        let out = dest.0;
        assert_eq!((c.requests, c.remaining, c.normal, c.zero), (1, 0, 2, 1));
        let word = |at: usize| u64::from_be_bytes(out[at..at + 8].try_into().unwrap());
        assert_eq!(word(0), (5 * PAGE) | REC_PAGE);
        assert_eq!(out[8], 7);
        let at = 8 + PAGE as usize;
        assert_eq!(word(at), PAGE | REC_ZERO);
        assert_eq!(word(at + 8), (2 * PAGE) | REC_PAGE);
        assert_eq!(word(at + 16 + PAGE as usize), REC_EOS);
        assert_eq!(out.len(), at + 24 + PAGE as usize);
    }

    #[test]
    fn a_closed_return_path_is_an_error_not_a_hang() {
        let rp = ReturnPath::start(Box::new(io::Cursor::new(Vec::new())), 2).unwrap();
        let ram = vec![0u8; 2 * PAGE as usize];
        let e = send_pages(&mut Vec::new(), &ram, vec![0b11], &rp, 0, &mut |_| {}).unwrap_err();
        assert!(e.contains("closed"), "{e}");
    }
}
