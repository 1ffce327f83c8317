//! Read-ahead for an NBD export: one window of bytes fetched in a single large request once
//! reads run sequentially.
//!
//! Every NBD request costs a round trip to the server (the client has one request in flight),
//! so a long sequential read in small pieces (the migration stream reader asks for 64 KiB at a
//! time while loadvm parses a VM state) is bound by latency, not bandwidth. The second read
//! in a row that starts where the previous one ended fetches a window instead; later reads
//! inside it are served from memory. The window grows with the run, as the kernel's
//! read-ahead does (four times what the run has read so far, from 128 KiB up to 8 MiB), so
//! that a few sequential metadata reads at open do not pull megabytes. A read elsewhere leaves the window in place (the
//! qcow2 layer's occasional metadata reads between two pieces of VM state do not throw it
//! away). Writes through the same storage patch the window, so it never serves stale bytes;
//! the storage is the export's single writer (`formats/nbd.md`).
//!
//! A local file has the page cache for this; the file storage does not use it.

/// Largest window: large enough that the round trip is small next to the transfer.
pub(crate) const WINDOW: usize = 8 << 20;
/// Smallest window.
const MIN_WINDOW: usize = 128 << 10;

/// The window and the sequential-read detector.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    /// Export offset of `data[0]`.
    start: u64,
    data: Vec<u8>,
    /// Where the last read ended: a read starting here continues a sequential run.
    next: Option<u64>,
    /// Bytes read by the current sequential run.
    run: u64,
}

impl ReadAhead {
    /// Copies `[offset, offset + buf.len())` out of the window if it holds all of it.
    pub(crate) fn serve(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Some(rel) = offset.checked_sub(self.start) else {
            return false;
        };
        let Ok(rel) = usize::try_from(rel) else {
            return false;
        };
        match rel.checked_add(buf.len()) {
            Some(end) if end <= self.data.len() => {
                buf.copy_from_slice(&self.data[rel..end]);
                true
            }
            _ => false,
        }
    }

    /// Whether a read of `len` bytes at `offset` should fetch a window: it is smaller than
    /// one and continues the previous read, or runs on past the window's end (a sequential
    /// reader whose run was interleaved with reads elsewhere).
    pub(crate) fn wants_window(&self, offset: u64, len: usize) -> bool {
        let window_end = self.start + self.data.len() as u64;
        len < WINDOW
            && (self.next == Some(offset)
                || (!self.data.is_empty() && offset >= self.start && offset <= window_end))
    }

    /// How many bytes the next window should hold.
    pub(crate) fn window_len(&self) -> usize {
        usize::try_from(self.run.saturating_mul(4))
            .unwrap_or(WINDOW)
            .clamp(MIN_WINDOW, WINDOW)
    }

    /// A buffer of `len` bytes for the next window (the old window's allocation, reused).
    pub(crate) fn take_buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.data);
        b.resize(len, 0);
        b
    }

    /// Installs `data`, read from `start` on, as the window.
    pub(crate) fn fill(&mut self, start: u64, data: Vec<u8>) {
        self.start = start;
        self.data = data;
    }

    /// Installs `data` as [`ReadAhead::fill`] does and returns the old window's buffer.
    pub(crate) fn replace(&mut self, start: u64, data: Vec<u8>) -> Vec<u8> {
        self.start = start;
        std::mem::replace(&mut self.data, data)
    }

    /// The window after this one, `(start, len)`, while a sequential run is reading through
    /// this one (its last read ended inside it): what to fetch ahead.
    pub(crate) fn next_window(&self) -> Option<(u64, usize)> {
        let end = self.start + self.data.len() as u64;
        match self.next {
            Some(n) if !self.data.is_empty() && n > self.start && n <= end && self.run > 0 => {
                Some((end, self.window_len()))
            }
            _ => None,
        }
    }

    /// Records a read of `len` bytes at `offset` (after it was served).
    pub(crate) fn note_read(&mut self, offset: u64, len: usize) {
        let window_end = self.start + self.data.len() as u64;
        let sequential = self.next == Some(offset)
            || (!self.data.is_empty() && offset >= self.start && offset <= window_end);
        self.run = if sequential {
            self.run.saturating_add(len as u64)
        } else {
            len as u64
        };
        self.next = Some(offset + len as u64);
    }

    /// Bytes written at `offset` replace what the window holds of them.
    pub(crate) fn patch(&mut self, offset: u64, bytes: &[u8]) {
        let w_end = self.start + self.data.len() as u64;
        let b_end = offset + bytes.len() as u64;
        let lo = offset.max(self.start);
        let hi = b_end.min(w_end);
        if lo < hi {
            let (wa, ba) = ((lo - self.start) as usize, (lo - offset) as usize);
            let n = (hi - lo) as usize;
            self.data[wa..wa + n].copy_from_slice(&bytes[ba..ba + n]);
        }
    }

    /// Drops the window (after a trim, whose bytes may read as anything, or an error).
    pub(crate) fn forget(&mut self) {
        self.data.clear();
        self.next = None;
        self.run = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_fetch_a_window_and_writes_patch_it() {
        let mut ra = ReadAhead::default();
        // The first read of a run fetches no window; the one after it does.
        assert!(!ra.wants_window(4096, 4096));
        ra.note_read(4096, 4096);
        assert!(!ra.wants_window(100_000, 4096));
        assert!(ra.wants_window(8192, 4096));
        assert_eq!(
            ra.window_len(),
            MIN_WINDOW,
            "a short run gets a small window"
        );
        assert!(
            !ra.wants_window(8192, WINDOW),
            "a read as large as a window goes direct"
        );
        let mut w = ra.take_buffer(64);
        for (i, b) in w.iter_mut().enumerate() {
            *b = i as u8;
        }
        ra.fill(8192, w);
        let mut out = [0u8; 8];
        assert!(ra.serve(8192 + 10, &mut out));
        assert_eq!(out, [10, 11, 12, 13, 14, 15, 16, 17]);
        assert!(!ra.serve(8192 + 60, &mut out), "past the window's end");
        assert!(!ra.serve(8000, &mut out), "before the window");
        // A read that runs past the end of the window starts the next one.
        assert!(ra.wants_window(8192 + 60, 8));
        // A write over the window's end changes the bytes it holds, nothing else.
        ra.patch(8192 + 62, &[0xaa; 4]);
        let mut tail = [0u8; 2];
        assert!(ra.serve(8192 + 62, &mut tail));
        assert_eq!(tail, [0xaa, 0xaa]);
        ra.patch(0, &[0xbb; 8192]);
        assert!(ra.serve(8192, &mut out));
        assert_eq!(out[0], 0);
        // The window grows with the run, up to its largest size.
        for _ in 0..100 {
            ra.note_read(8192 + 64, 1 << 20);
        }
        assert_eq!(ra.window_len(), WINDOW);
        ra.note_read(1 << 40, 4096);
        assert_eq!(
            ra.window_len(),
            MIN_WINDOW,
            "a read elsewhere starts a new run"
        );
        ra.forget();
        assert!(!ra.serve(8192, &mut out));
        assert!(!ra.wants_window(8192 + 8, 8));
    }
}
