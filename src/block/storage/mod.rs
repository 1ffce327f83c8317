//! Where image bytes live: a host file, or memory (with fault injection for crash tests).
//!
//! Drivers only see [`Storage`]; they never know which backend they are on. All methods take
//! `&self` so that a driver can share its storage with helpers (locks, checkers) without
//! `RefCell` juggling; the file backend uses `pread`/`pwrite`, the memory backend a mutex.

mod data_handle;
mod file;
mod memory;
pub mod nbd;
mod nbd_behind;
mod nbd_pool;
mod nbd_prefetch;
mod nbd_readahead;
mod nbd_redial;
mod nbd_shared;
pub mod nbd_uri;
pub use nbd_redial::set_reconnect_delay;
mod nbd_wire;

pub use data_handle::{DataHandle, WriteBehind};
pub use file::FileStorage;
pub use memory::{Fault, MemStorage};
pub use nbd::{NbdError, NbdStorage};
pub use nbd_uri::NbdUri;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

/// Whether `path` is an NBD URI (QEMU's syntax) rather than a host file name.
pub fn is_nbd(path: &Path) -> bool {
    path.to_str().is_some_and(NbdUri::is_nbd)
}

/// Opens the storage `path` names: an NBD export for `nbd://…` and `nbd+unix://…`, else a
/// host file.
///
/// # Errors
/// The file's open error, or an [`NbdError`] (wrapped).
pub fn open(path: &Path, writable: bool) -> io::Result<Box<dyn Storage>> {
    match path.to_str().filter(|s| NbdUri::is_nbd(s)) {
        Some(uri) => Ok(Box::new(
            NbdStorage::open(uri, writable).map_err(io::Error::other)?,
        )),
        None => Ok(Box::new(FileStorage::open(path, writable)?)),
    }
}

/// Storage for a new image: a created (or truncated) host file, or an existing NBD export,
/// whose size the server fixes.
///
/// # Errors
/// As [`open`].
pub fn create(path: &Path) -> io::Result<Box<dyn Storage>> {
    match path.to_str().filter(|s| NbdUri::is_nbd(s)) {
        Some(uri) => Ok(Box::new(
            NbdStorage::open(uri, true).map_err(io::Error::other)?,
        )),
        None => Ok(Box::new(FileStorage::create(path)?)),
    }
}

/// Writes `len` zero bytes at `offset`, 1 MiB at a time.
pub(crate) fn write_zeroes<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
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
    /// The most bytes the storage can ever hold, for storage of a fixed size (an NBD export);
    /// `None` when it grows on demand (a file, memory).
    fn capacity(&self) -> Option<u64> {
        None
    }
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
    /// A handle that writes and syncs this storage's file without the driver (see
    /// [`DataHandle`]); `None` where there is no host file (memory, NBD).
    fn data_handle(&self) -> Option<DataHandle> {
        self.file().and_then(|f| DataHandle::reopen(f).ok())
    }
}
