//! Room on fixed-size storage (an NBD export, like a logical volume): a qcow2 image there
//! cannot grow its file, so every allocation must end inside the storage, and the room left
//! is what `info` and `check` report.
//!
//! The checks run before anything is written: an allocation past the end fails with
//! [`Qcow2Error::ExportFull`] without touching a refcount, and VM state that cannot fit is
//! refused before its first byte (qemu-img itself fails `snapshot -c` with -22 on a qcow2
//! export that has no room left, after trying).

use super::{Qcow2, Qcow2Error, Result};

impl Qcow2 {
    /// Refuses `n` clusters from cluster index `start` on when they end past the storage's
    /// fixed size.
    pub(crate) fn check_room(&self, start: u64, n: u64) -> Result<()> {
        let Some(size) = self.storage.capacity() else {
            return Ok(());
        };
        let cb = self.layout.cluster_bits;
        let end = start.saturating_add(n).checked_shl(cb).unwrap_or(u64::MAX);
        if end > size {
            return Err(Qcow2Error::ExportFull {
                offset: start << cb,
                len: n << cb,
                size,
            }
            .into());
        }
        Ok(())
    }

    /// The fixed size of the storage under the image (an NBD export); `None` for a file.
    pub fn fixed_size(&self) -> Option<u64> {
        self.storage.capacity()
    }

    /// Bytes that new clusters can still take on fixed-size storage: the free clusters below
    /// its end. `None` for storage that grows (a file).
    ///
    /// # Errors
    /// I/O errors reading refcount blocks.
    pub fn room_left(&mut self) -> Result<Option<u64>> {
        let Some(size) = self.storage.capacity() else {
            return Ok(None);
        };
        let cb = self.layout.cluster_bits;
        let mut free = 0u64;
        for c in 0..size >> cb {
            if self.get_refcount(c)? == 0 {
                free += 1;
            }
        }
        Ok(Some(free << cb))
    }

    /// Refuses VM state of `len` bytes that cannot fit in the room left, before any of it is
    /// written.
    pub(crate) fn check_vmstate_room(&mut self, len: u64) -> Result<()> {
        let Some(room) = self.room_left()? else {
            return Ok(());
        };
        if len > room {
            let size = self.storage.capacity().unwrap_or(0);
            return Err(Qcow2Error::VmStateNoRoom { len, room, size }.into());
        }
        Ok(())
    }
}
