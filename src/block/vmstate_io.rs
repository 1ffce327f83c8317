//! `std::io::Read`/`Write` adapters over a qcow2 vmstate area ([`SnapshotStore`]), positioned
//! and buffered in large chunks so that savevm, loadvm and the inspector issue few, big,
//! aligned requests.

use std::io::{self, Read, Write};

use super::SnapshotStore;

/// Chunk size of the adapters (1 MiB).
pub const CHUNK: usize = 1 << 20;

/// What [`VmstateWriter`] gathers before writing (8 MiB): each write allocates clusters and
/// updates an L2 table and a refcount block, so larger pieces mean fewer metadata writes
/// (each a round trip on network storage).
pub const WRITE_CHUNK: usize = 8 << 20;

fn to_io(e: crate::block::Error) -> io::Error {
    io::Error::other(e)
}

/// Writes a stream into the active layer's vmstate area from position 0.
pub struct VmstateWriter<'a> {
    store: &'a mut dyn SnapshotStore,
    pos: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for VmstateWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmstateWriter")
            .field("pos", &self.pos)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl<'a> VmstateWriter<'a> {
    /// A writer starting at vmstate offset 0.
    pub fn new(store: &'a mut dyn SnapshotStore) -> Self {
        VmstateWriter {
            store,
            pos: 0,
            buf: Vec::with_capacity(WRITE_CHUNK),
        }
    }

    /// Bytes accepted so far (the VM state size once flushed).
    pub fn len(&self) -> u64 {
        self.pos + self.buf.len() as u64
    }

    /// True if nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write_out(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.store
                .vmstate_write(self.pos, &self.buf)
                .map_err(to_io)?;
            self.pos += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for VmstateWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = WRITE_CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == WRITE_CHUNK {
            self.write_out()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()
    }
}

/// Where a [`VmstateReader`] reads from.
#[derive(Debug, Clone)]
pub enum VmstateSource {
    /// The active layer's vmstate area (where a save writes before the snapshot exists).
    Active,
    /// A snapshot's own vmstate, by id or name, without goto.
    Snapshot(String),
}

/// Reads `size` bytes of VM state in 1 MiB chunks.
pub struct VmstateReader<'a> {
    store: &'a mut dyn SnapshotStore,
    source: VmstateSource,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    start: usize,
}

impl std::fmt::Debug for VmstateReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmstateReader")
            .field("source", &self.source)
            .field("size", &self.size)
            .field("pos", &self.pos)
            .finish()
    }
}

impl<'a> VmstateReader<'a> {
    /// A reader over the first `size` bytes of `source`.
    pub fn new(store: &'a mut dyn SnapshotStore, source: VmstateSource, size: u64) -> Self {
        VmstateReader {
            store,
            source,
            size,
            pos: 0,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// A reader over snapshot `id_or_name`'s VM state, sized from the snapshot table.
    pub fn for_snapshot(
        store: &'a mut dyn SnapshotStore,
        id_or_name: &str,
    ) -> crate::block::Result<Self> {
        let list = store.snapshot_list();
        let info = list
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| list.iter().find(|s| s.name == id_or_name))
            .ok_or_else(|| crate::block::Error::SnapshotNotFound(id_or_name.to_string()))?;
        let (id, size) = (info.id.clone(), info.vm_state_size);
        Ok(Self::new(store, VmstateSource::Snapshot(id), size))
    }

    /// Total bytes this reader yields.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Reads of at least this many bytes go straight into the caller's buffer.
pub const DIRECT_MIN: usize = 16 << 10;

impl VmstateReader<'_> {
    fn read_area(&mut self, pos: u64, dst: &mut [u8]) -> io::Result<()> {
        match &self.source {
            VmstateSource::Active => self.store.vmstate_read(pos, dst),
            VmstateSource::Snapshot(id) => self.store.snapshot_vmstate_read(id, pos, dst),
        }
        .map_err(to_io)
    }
}

impl Read for VmstateReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.buf.len() {
            let left = self.size - self.pos;
            if left == 0 {
                return Ok(0);
            }
            // A large read with nothing buffered bypasses the buffer (one copy less for
            // the stream reader's own buffer fills).
            if out.len() >= DIRECT_MIN {
                let n = usize::try_from(left).unwrap_or(CHUNK).min(out.len());
                let pos = self.pos;
                self.read_area(pos, &mut out[..n])?;
                self.pos += n as u64;
                return Ok(n);
            }
            let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(n, 0);
            let r = self.read_area(self.pos, &mut buf);
            self.buf = buf;
            r?;
            self.pos += n as u64;
            self.start = 0;
        }
        let n = out.len().min(self.buf.len() - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::block::{Result, SnapshotInfo, SnapshotParams};

    /// An in-memory store: one vmstate area, one snapshot "s" sharing it; counts its reads
    /// and writes (also used by other modules' tests).
    #[derive(Default)]
    pub(crate) struct Mem {
        pub(crate) area: Vec<u8>,
        pub(crate) calls: usize,
    }

    impl SnapshotStore for Mem {
        fn snapshot_list(&self) -> Vec<SnapshotInfo> {
            vec![SnapshotInfo {
                id: "1".into(),
                name: "s".into(),
                vm_state_size: self.area.len() as u64,
                date_sec: 0,
                date_nsec: 0,
                vm_clock_nsec: 0,
                disk_size: None,
                icount: None,
            }]
        }
        fn snapshot_create(&mut self, _: &SnapshotParams) -> Result<SnapshotInfo> {
            unimplemented!()
        }
        fn snapshot_goto(&mut self, _: &str) -> Result<()> {
            Ok(())
        }
        fn snapshot_delete(&mut self, _: &str) -> Result<()> {
            Ok(())
        }
        fn vmstate_write(&mut self, pos: u64, buf: &[u8]) -> Result<()> {
            self.calls += 1;
            let end = pos as usize + buf.len();
            if self.area.len() < end {
                self.area.resize(end, 0);
            }
            self.area[pos as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn vmstate_read(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
            self.calls += 1;
            buf.copy_from_slice(&self.area[pos as usize..pos as usize + buf.len()]);
            Ok(())
        }
        fn snapshot_vmstate_read(&mut self, _: &str, pos: u64, buf: &mut [u8]) -> Result<()> {
            self.vmstate_read(pos, buf)
        }
        fn snapshot_extra_tail(&self, _: &str) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn writes_and_reads_in_large_chunks() {
        let data: Vec<u8> = (0..(WRITE_CHUNK * 2 + 123))
            .map(|i| (i * 7) as u8)
            .collect();
        let mut store = Mem::default();
        {
            let mut w = VmstateWriter::new(&mut store);
            for piece in data.chunks(100_000) {
                w.write_all(piece).unwrap();
            }
            w.flush().unwrap();
            assert_eq!(w.len(), data.len() as u64);
        }
        assert_eq!(store.calls, 3);
        assert_eq!(store.area, data);
        let data = data[..CHUNK * 2 + 123].to_vec();
        store.area.truncate(data.len());
        store.calls = 0;
        let mut r = VmstateReader::for_snapshot(&mut store, "s").unwrap();
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(store.calls, 3);
        // Large reads go straight to the caller's buffer, up to the end of the state.
        store.calls = 0;
        let mut r = VmstateReader::for_snapshot(&mut store, "s").unwrap();
        let mut big = vec![0u8; CHUNK * 4];
        assert_eq!(r.read(&mut big).unwrap(), data.len());
        assert_eq!(&big[..data.len()], &data[..]);
        assert_eq!(r.read(&mut big).unwrap(), 0);
        assert_eq!(store.calls, 1);
        assert!(VmstateReader::for_snapshot(&mut store, "nope").is_err());
    }
}
