//! In-memory storage for tests, with fault injection (fail the Nth write or flush).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Storage;

/// What the in-memory backend is told to fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    /// Never fail.
    #[default]
    None,
    /// Fail the Nth write (1-based) and every operation after it (the "process" died).
    Write(u64),
    /// Fail the Nth flush (1-based) and every operation after it.
    Flush(u64),
}

#[derive(Debug, Default)]
struct MemInner {
    data: Vec<u8>,
    durable: Vec<u8>,
    writes: u64,
    flushes: u64,
    fault: Fault,
    dead: bool,
    max_len: Option<usize>,
}

/// In-memory storage for tests. Clones share the same bytes, so a test can keep a handle,
/// let a driver fail, and inspect what "reached the disk".
///
/// `data()` is everything written (as if the host kept every completed write); `durable()` is
/// the state at the last successful flush (as if the host lost every unflushed write).
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<MemInner>>,
}

fn beyond_max_len() -> io::Error {
    io::Error::other("beyond the in-memory storage's size limit")
}

fn injected() -> io::Error {
    io::Error::other("injected fault")
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage holding `data`, already durable.
    pub fn from_vec(data: Vec<u8>) -> Self {
        let s = Self::default();
        {
            let mut g = s.lock();
            g.durable = data.clone();
            g.data = data;
        }
        s
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Arms a fault and resets the write/flush counters.
    pub fn set_fault(&self, fault: Fault) {
        let mut g = self.lock();
        g.fault = fault;
        g.writes = 0;
        g.flushes = 0;
        g.dead = false;
    }

    /// Number of writes and flushes since the last `set_fault`.
    pub fn counts(&self) -> (u64, u64) {
        let g = self.lock();
        (g.writes, g.flushes)
    }

    /// Refuses (an I/O error) writes and growth past `bytes`, as a device of
    /// that size would: for callers that hold untrusted images in memory (the fuzz targets),
    /// where a table pointing petabytes past the end would otherwise grow the buffer.
    pub fn set_max_len(&self, bytes: usize) {
        self.lock().max_len = Some(bytes);
    }

    /// Whether an armed fault has fired.
    pub fn fault_fired(&self) -> bool {
        self.lock().dead
    }

    /// Every completed write.
    pub fn data(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Runs `f` on every completed write, without copying the bytes (a caller comparing
    /// or copying them into its own buffer, many times per second).
    pub fn with_data<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.lock().data)
    }

    /// The state at the last successful flush.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }
}

impl Storage for MemStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.lock();
        if g.dead {
            return Err(injected());
        }
        buf.fill(0);
        let len = g.data.len() as u64;
        if offset < len {
            let start = offset as usize;
            let n = buf.len().min(g.data.len() - start);
            buf[..n].copy_from_slice(&g.data[start..start + n]);
        }
        Ok(())
    }

    /// Zeroes the range (through `write_at`, so crash tests also stop inside discards).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut g = self.lock();
        if g.dead {
            return Err(injected());
        }
        g.writes += 1;
        if g.fault == Fault::Write(g.writes) {
            g.dead = true;
            return Err(injected());
        }
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(buf.len()))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if g.max_len.is_some_and(|max| end > max) {
            return Err(beyond_max_len());
        }
        if g.data.len() < end {
            g.data.resize(end, 0);
        }
        g.data[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        if g.dead {
            return Err(injected());
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if g.max_len.is_some_and(|max| len > max) {
            return Err(beyond_max_len());
        }
        g.data.resize(len, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut g = self.lock();
        if g.dead {
            return Err(injected());
        }
        g.flushes += 1;
        if g.fault == Fault::Flush(g.flushes) {
            g.dead = true;
            return Err(injected());
        }
        // Into the old buffer: no new allocation of the image's size per flush.
        let MemInner { data, durable, .. } = &mut *g;
        durable.clone_from(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_write_fault_kills_later_ops() {
        let s = MemStorage::new();
        s.set_fault(Fault::Write(2));
        s.write_at(0, b"abcd").unwrap();
        assert!(s.write_at(4, b"efgh").is_err());
        assert!(s.flush().is_err());
        assert!(s.fault_fired());
        assert_eq!(s.data(), b"abcd");
        assert_eq!(s.durable(), b"");
    }

    #[test]
    fn mem_flush_makes_durable_and_reads_past_end_are_zero() {
        let s = MemStorage::new();
        s.write_at(2, b"xy").unwrap();
        s.flush().unwrap();
        s.write_at(0, b"z").unwrap();
        assert_eq!(s.durable(), b"\0\0xy");
        let mut buf = [9u8; 6];
        s.read_at(1, &mut buf).unwrap();
        assert_eq!(&buf, b"\0xy\0\0\0");
    }
}
