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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::qcow2::CreateOptions;
    use crate::block::{BlockDriver, Error, MemStorage, SnapshotStore, Storage};
    use std::io;

    /// Memory storage of a fixed size, as an NBD export is.
    #[derive(Debug, Clone)]
    struct Fixed(MemStorage, u64);

    impl Storage for Fixed {
        fn len(&self) -> io::Result<u64> {
            Ok(self.1)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            assert!(offset + buf.len() as u64 <= self.1, "write past the end");
            self.0.write_at(offset, buf)
        }
        fn capacity(&self) -> Option<u64> {
            Some(self.1)
        }
        fn set_len(&self, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.0.flush()
        }
    }

    #[test]
    fn allocation_past_a_fixed_size_fails_before_writing_and_room_is_reported() {
        let cs = 65536u64;
        let fixed = Fixed(MemStorage::new(), 16 * cs);
        let opts = CreateOptions {
            size: 64 << 20,
            ..Default::default()
        };
        Qcow2::create_on(Box::new(fixed.clone()), &opts).unwrap();
        let mut img = Qcow2::open_storage(Box::new(fixed.clone()), false).unwrap();
        assert_eq!(img.fixed_size(), Some(16 * cs));
        // Header, refcount table, refcount block, L1: 12 clusters left.
        assert_eq!(img.room_left().unwrap(), Some(12 * cs));
        img.write_at(0, &vec![0x5a; 4 * cs as usize]).unwrap();
        assert_eq!(img.room_left().unwrap(), Some(7 * cs));
        let before = fixed.0.data();
        let e = img
            .write_at(8 << 20, &vec![1; 8 * cs as usize])
            .unwrap_err();
        assert!(
            matches!(e, Error::Qcow2(Qcow2Error::ExportFull { len, .. }) if len == 8 * cs),
            "{e}"
        );
        assert!(e.to_string().starts_with("export full"), "{e}");
        assert_eq!(fixed.0.data(), before, "bytes written before the refusal");
        assert_eq!(img.room_left().unwrap(), Some(7 * cs));
        // VM state larger than the room is refused up front.
        let e = img.vmstate_reserve(8 * cs).unwrap_err();
        assert!(
            matches!(e, Error::Qcow2(Qcow2Error::VmStateNoRoom { room, .. }) if room == 7 * cs),
            "{e}"
        );
        // What fits still works, and the image is consistent.
        img.write_at(8 << 20, &vec![1; 6 * cs as usize]).unwrap();
        img.flush().unwrap();
        let r = img.check(None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0));
    }

    #[test]
    fn growable_storage_has_no_fixed_size() {
        let mem = MemStorage::new();
        Qcow2::create_on(Box::new(mem.clone()), &CreateOptions::default()).unwrap();
        let mut img = Qcow2::open_storage(Box::new(mem), false).unwrap();
        assert_eq!(img.fixed_size(), None);
        assert_eq!(img.room_left().unwrap(), None);
    }
}
