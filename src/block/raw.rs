//! The raw driver: the file is the disk. Guest I/O only; no internal snapshots.

use std::path::Path;

use super::storage::{self, Storage};
use super::{check_range, lock, BlockDriver, Error, Format, OpenOptions, Result};

/// A raw image.
#[derive(Debug)]
pub struct Raw {
    storage: Box<dyn Storage>,
    read_only: bool,
    size: u64,
}

impl Raw {
    /// Opens a raw image file, taking QEMU-compatible locks unless `force_share`.
    ///
    /// # Errors
    /// I/O errors opening the file, or [`Error::Locked`].
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let storage = storage::open(path, !opts.read_only)
            .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
        if !opts.force_share {
            if let Some(f) = storage.file() {
                lock::lock_image(f, &path.display().to_string(), !opts.read_only)?;
            }
        }
        Self::from_storage(storage, opts.read_only)
    }

    /// Wraps any storage as a raw disk.
    ///
    /// # Errors
    /// I/O errors reading the storage size.
    pub fn from_storage(storage: Box<dyn Storage>, read_only: bool) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io("Could not get the image size", e))?;
        Ok(Self {
            storage,
            read_only,
            size,
        })
    }

    /// Creates a raw image of `size` bytes (sparse).
    ///
    /// # Errors
    /// I/O errors creating or sizing the file.
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let s = storage::create(path)
            .map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
        s.set_len(size)
            .map_err(|e| Error::io(format!("Could not resize '{}'", path.display()), e))
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl BlockDriver for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .read_at(offset, buf)
            .map_err(|e| Error::io(format!("read at {offset:#x}"), e))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .write_at(offset, buf)
            .map_err(|e| Error::io(format!("write at {offset:#x}"), e))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| Error::io(format!("discard at {offset:#x}"), e))
    }

    fn flush(&mut self) -> Result<()> {
        self.storage.flush().map_err(|e| Error::io("flush", e))
    }

    fn data_handle(&self) -> Option<storage::DataHandle> {
        if self.read_only {
            return None;
        }
        self.storage.data_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemStorage;

    #[test]
    fn raw_io_and_no_snapshots() {
        let mem = MemStorage::from_vec(vec![0; 4096]);
        let mut r = Raw::from_storage(Box::new(mem.clone()), false).unwrap();
        r.write_at(512, &[0xab; 512]).unwrap();
        let mut b = [0u8; 1024];
        r.read_at(0, &mut b).unwrap();
        assert!(b[512..].iter().all(|&x| x == 0xab));
        assert!(r.snapshots().is_none());
        assert!(matches!(
            r.write_at(4000, &[0; 512]),
            Err(Error::OutOfRange { .. })
        ));
        r.write_zeroes(512, 512).unwrap();
        r.read_at(512, &mut b[..512]).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
    }

    #[test]
    fn read_only_refuses_writes() {
        let mem = MemStorage::from_vec(vec![0; 4096]);
        let mut r = Raw::from_storage(Box::new(mem), true).unwrap();
        assert!(matches!(r.write_at(0, &[1]), Err(Error::ReadOnly)));
    }
}
