//! Where image bytes live: a host file, or memory (with fault injection for crash tests).
//!
//! Drivers only see [`Storage`]; they never know which backend they are on. All methods take
//! `&self` so that a driver can share its storage with helpers (locks, checkers) without
//! `RefCell` juggling; the file backend uses `pread`/`pwrite`, the memory backend a mutex.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Writes `len` zero bytes at `offset`, 1 MiB at a time.
fn write_zeroes<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(zeroes.len() as u64) as usize;
        s.write_at(pos, &zeroes[..n])?;
        pos += n as u64;
    }
    Ok(())
}

/// Byte storage under an image driver.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zero.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;
    /// Starts writing what was written so far (at least `[offset, offset + len)`) back to the
    /// device without waiting for it. A hint: durability still comes from
    /// [`Storage::flush`]; it lets a long sequential write overlap with the device instead of
    /// leaving everything to the final flush. Writing back early never breaks an ordering
    /// that flushes establish.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Gives `[offset, offset + len)` back to the host if the storage can do so cheaply (a
    /// hint for bytes nothing references: they may read as before or as zero afterwards).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Gives `[offset, offset + len)` back to the host; reads as zero afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeroes(self, offset, len)
    }
    /// The host path, for messages and locks (None for memory).
    fn path(&self) -> Option<&Path> {
        None
    }
    /// The host file, for OFD locks (None for memory).
    fn file(&self) -> Option<&File> {
        None
    }
}

/// A host file accessed with positioned I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    /// Background `fdatasync` for [`Storage::start_writeback`], started on first use.
    flusher: OnceLock<Option<SyncSender<()>>>,
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            flusher: OnceLock::new(),
        })
    }

    /// Creates (or truncates) a file.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            flusher: OnceLock::new(),
        })
    }
}

impl FileStorage {
    /// The flusher thread's queue. The thread syncs through its own descriptor of the file
    /// (opened by path, so it shares no OFD lock with ours) and ends with this storage.
    fn flusher(&self) -> Option<&SyncSender<()>> {
        self.flusher
            .get_or_init(|| {
                let file = File::open(&self.path).ok()?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
                std::thread::Builder::new()
                    .name("vmsnap-flush".into())
                    .spawn(move || {
                        while rx.recv().is_ok() {
                            let _ = file.sync_data();
                        }
                    })
                    .ok()?;
                Some(tx)
            })
            .as_ref()
    }
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Asks the flusher thread for an `fdatasync` (an ask while it is busy folds into the
    /// next one); the caller goes on writing meanwhile.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        if let Some(tx) = self.flusher() {
            let _ = tx.try_send(());
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // FALLOC_FL_PUNCH_HOLE must be combined with KEEP_SIZE.
        let mode = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        nix::fcntl::fallocate(self.file.as_raw_fd(), mode, off, l)?;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Punch if the file system can, else write zeroes.
        if self.discard(offset, len).is_ok() {
            return Ok(());
        }
        write_zeroes(self, offset, len)
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

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

    /// Whether an armed fault has fired.
    pub fn fault_fired(&self) -> bool {
        self.lock().dead
    }

    /// Every completed write.
    pub fn data(&self) -> Vec<u8> {
        self.lock().data.clone()
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
        g.durable = g.data.clone();
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

    #[test]
    fn file_roundtrip_and_punch_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        s.write_at(0, &[7u8; 8192]).unwrap();
        s.punch_hole(4096, 4096).unwrap();
        let mut buf = [1u8; 8192];
        s.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        assert_eq!(s.len().unwrap(), 8192);
    }

    #[test]
    fn early_writeback_leaves_the_data_and_the_locks_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        for i in 0..8u8 {
            s.write_at(u64::from(i) << 20, &[i; 1 << 20]).unwrap();
            s.start_writeback(u64::from(i) << 20, 1 << 20).unwrap();
        }
        // The flusher has its own open file description: the OFD locks taken through ours
        // go away with our storage, however long the flusher lives.
        let name = p.display().to_string();
        crate::block::lock::lock_image(&s.file, &name, true).unwrap();
        s.flush().unwrap();
        drop(s);
        let again = FileStorage::open(&p, true).unwrap();
        let lock = crate::block::lock::lock_image(&again.file, &name, true);
        assert!(lock.is_ok(), "{lock:?}");
        let mut b = vec![0u8; 1 << 20];
        again.read_at(7 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }
}
