//! A host file accessed with positioned I/O (`pread`/`pwrite`/`fdatasync`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::OnceLock;

use super::{write_zeroes, Storage};

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

#[cfg(test)]
mod tests {
    use super::*;

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
