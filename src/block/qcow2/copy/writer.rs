//! The output data area: clusters appended front to back through one buffer, compressed
//! clusters packed byte by byte as QEMU packs them (`qcow2_alloc_bytes`).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::super::entry::OFLAG_COMPRESSED;
use super::super::layout::Layout;
use super::{CopyError, Result};
use crate::block::storage::{DataHandle, Storage};

/// Granularity of the holes left for all-zero parts of the data area.
const SPARSE_BLOCK: usize = 4096;
/// An all-zero block to compare against.
static ZERO_BLOCK: [u8; SPARSE_BLOCK] = [0; SPARSE_BLOCK];
/// Buffered bytes written out at once. Small enough that the buffer the writer thread hands
/// to the kernel is still in the CPU's cache from being filled: with 8 MiB buffers the
/// kernel's copy into the page cache read them back from memory and took twice as long
/// (`convert -t unsafe` of 4 GiB of data: 3.3 s with 8 MiB, 1.4 s with 1 MiB or 512 KiB,
/// 1.6 s with 256 KiB buffers).
const FLUSH_AT: usize = 1 << 20;
/// QEMU inflates zlib clusters with a 4 KiB window (`inflateInit2(-12)`): deflate output
/// must not reach back further. A full flush every 4 KiB resets the compressor's dictionary.
const DEFLATE_WINDOW: usize = 4096;

/// Compression of data clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codec {
    /// Raw deflate (`compression_type=zlib`).
    Deflate,
    /// zstd frames (`compression_type=zstd`).
    Zstd,
}

/// The data area's full buffers, written by a thread that owns a second descriptor of the
/// output, so that reading the source and writing the output overlap (qemu-img keeps several
/// requests in flight for the same reason). At most two buffers wait; a failed write ends the
/// thread, and the next hand-over or [`Behind::finish`] reports it.
#[derive(Debug)]
struct Behind {
    tx: Option<SyncSender<(u64, Vec<u8>)>>,
    spare: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<std::result::Result<(), (u64, std::io::Error)>>>,
}

impl Behind {
    fn start(handle: DataHandle) -> Option<Behind> {
        let (tx, rx) = sync_channel::<(u64, Vec<u8>)>(1);
        let (give, spare) = sync_channel::<Vec<u8>>(2);
        let thread = std::thread::Builder::new()
            .name("vmsnap-convert-out".into())
            .spawn(move || {
                for (at, mut buf) in rx {
                    write_sparse_with(at, &buf, &mut |off, b| handle.write_at(off, b))?;
                    buf.clear();
                    let _ = give.try_send(buf);
                }
                Ok(())
            })
            .ok()?;
        Some(Behind {
            tx: Some(tx),
            spare,
            thread: Some(thread),
        })
    }

    /// Hands `buf` (for output offset `at`) to the thread; returns an empty buffer to go on
    /// with.
    fn hand_over(&mut self, at: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let cap = buf.capacity();
        let sent = self.tx.as_ref().map(|tx| tx.send((at, buf)));
        if !matches!(sent, Some(Ok(()))) {
            // The thread ended: its error says why.
            return Err(self.finish().err().unwrap_or(CopyError::Write {
                offset: at,
                source: std::io::Error::other("the output writer thread ended"),
            }));
        }
        Ok(self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(cap)))
    }

    /// Waits until everything handed over is written.
    fn finish(&mut self) -> Result<()> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err((offset, source)))) => Err(CopyError::Write { offset, source }),
            Some(Err(_)) => Err(CopyError::Write {
                offset: 0,
                source: std::io::Error::other("the output writer thread panicked"),
            }),
        }
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Appends clusters to the output.
#[derive(Debug)]
pub(super) struct DataWriter<'a> {
    out: &'a dyn Storage,
    layout: Layout,
    buf: Vec<u8>,
    /// Output offset of `buf[0]`.
    buf_start: u64,
    /// Writes full buffers on a thread, when the output has a file descriptor.
    behind: Option<Behind>,
}

impl<'a> DataWriter<'a> {
    /// A writer whose first cluster goes to `start` (cluster aligned).
    pub fn new(out: &'a dyn Storage, layout: Layout, start: u64) -> Self {
        Self {
            out,
            layout,
            buf: Vec::with_capacity(FLUSH_AT + layout.cluster_size() as usize),
            buf_start: start,
            behind: out.data_handle().and_then(Behind::start),
        }
    }

    fn pos(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    fn align(&mut self) {
        let cs = self.layout.cluster_size();
        let n = (self.pos().div_ceil(cs) * cs - self.pos()) as usize;
        self.buf.resize(self.buf.len() + n, 0);
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = self.buf.len() as u64;
        match self.behind.as_mut() {
            Some(b) => {
                let full = std::mem::take(&mut self.buf);
                self.buf = b.hand_over(self.buf_start, full)?;
            }
            None => {
                write_sparse(self.out, self.buf_start, &self.buf)?;
                self.buf.clear();
            }
        }
        self.buf_start += len;
        Ok(())
    }

    /// Appends one cluster (zero padded); returns its output offset.
    pub fn cluster(&mut self, data: &[u8]) -> Result<u64> {
        self.align();
        let off = self.pos();
        let cs = self.layout.cluster_size() as usize;
        self.buf.extend_from_slice(&data[..data.len().min(cs)]);
        self.buf.resize(self.buf.len() + cs - data.len().min(cs), 0);
        self.maybe_flush()?;
        Ok(off)
    }

    /// Appends `data` compressed if that makes it smaller than a cluster; returns the
    /// compressed-cluster L2 entry, or None (the caller writes it uncompressed).
    pub fn compressed(&mut self, data: &[u8], codec: Codec) -> Result<Option<u64>> {
        let limit = self.layout.cluster_size() as usize - 1;
        let Some(c) = compress(data, codec, limit)? else {
            return Ok(None);
        };
        let off = self.pos();
        // Additional 512-byte sectors the data touches after its first (QEMU's nb_csectors).
        let extra = ((off + c.len() as u64 - 1) >> 9) - (off >> 9);
        let entry = OFLAG_COMPRESSED | (extra << self.layout.csize_shift()) | off;
        self.buf.extend_from_slice(&c);
        self.maybe_flush()?;
        Ok(Some(entry))
    }

    /// Writes what is buffered; returns the first free cluster-aligned offset after the data.
    pub fn finish(&mut self) -> Result<u64> {
        self.align();
        self.flush()?;
        if let Some(b) = self.behind.as_mut() {
            b.finish()?;
        }
        Ok(self.pos())
    }
}

/// Writes `buf` at `at` in a new file, leaving out its all-zero blocks: they read as zeroes
/// without taking space (as the unwritten subclusters and table tails of a QEMU image).
pub(super) fn write_sparse(out: &dyn Storage, at: u64, buf: &[u8]) -> Result<()> {
    write_sparse_with(at, buf, &mut |off, b| out.write_at(off, b))
        .map_err(|(offset, source)| CopyError::Write { offset, source })
}

/// [`write_sparse`] through `write`; a failure comes with the offset it was at.
fn write_sparse_with(
    at: u64,
    buf: &[u8],
    write: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::result::Result<(), (u64, std::io::Error)> {
    let blocks: Vec<bool> = buf
        .chunks(SPARSE_BLOCK)
        .map(|b| b != &ZERO_BLOCK[..b.len()])
        .collect();
    let mut i = 0;
    while i < blocks.len() {
        if !blocks[i] {
            i += 1;
            continue;
        }
        let j = (i..blocks.len())
            .find(|&j| !blocks[j])
            .unwrap_or(blocks.len());
        let (s, e) = (i * SPARSE_BLOCK, (j * SPARSE_BLOCK).min(buf.len()));
        let off = at + s as u64;
        write(off, &buf[s..e]).map_err(|source| (off, source))?;
        i = j;
    }
    Ok(())
}

/// `data` compressed, if the result is at most `limit` bytes.
fn compress(data: &[u8], codec: Codec, limit: usize) -> Result<Option<Vec<u8>>> {
    let c = match codec {
        Codec::Zstd => {
            zstd::bulk::compress(data, 3).map_err(|e| CopyError::Compress(e.to_string()))?
        }
        Codec::Deflate => deflate_small_window(data)?,
    };
    Ok((c.len() <= limit).then_some(c))
}

/// Raw deflate whose back references stay within [`DEFLATE_WINDOW`] bytes.
fn deflate_small_window(data: &[u8]) -> Result<Vec<u8>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let err = |e: flate2::CompressError| CopyError::Compress(e.to_string());
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 1024);
    let n_chunks = data.len().div_ceil(DEFLATE_WINDOW).max(1);
    for i in 0..n_chunks {
        let mut input = &data[(i * DEFLATE_WINDOW).min(data.len())..]
            [..DEFLATE_WINDOW.min(data.len().saturating_sub(i * DEFLATE_WINDOW))];
        let last = i + 1 == n_chunks;
        let flush = if last {
            FlushCompress::Finish
        } else {
            FlushCompress::Full
        };
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(4096);
            }
            let before = c.total_in();
            let status = c.compress_vec(input, &mut out, flush).map_err(err)?;
            input = &input[(c.total_in() - before) as usize..];
            let room_left = out.len() < out.capacity();
            let done = if last {
                status == Status::StreamEnd
            } else {
                input.is_empty() && room_left
            };
            if done {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::storage::FileStorage;
    use std::io::Read;

    fn layout() -> Layout {
        Layout {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        }
    }

    #[test]
    fn data_written_by_the_thread_reads_back_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let out = FileStorage::create(&path).unwrap();
        let mut w = DataWriter::new(&out, layout(), 65536);
        assert!(w.behind.is_some(), "a file output gets the writer thread");
        let mut offs = Vec::new();
        for i in 0..300u32 {
            // Every third cluster is zero: a hole in the file.
            let fill = if i % 3 == 0 { 0 } else { (i % 250 + 1) as u8 };
            offs.push((w.cluster(&vec![fill; 65536]).unwrap(), fill));
        }
        let end = w.finish().unwrap();
        assert_eq!(end, 65536 * 301);
        let data = std::fs::read(&path).unwrap();
        for (off, fill) in offs {
            let at = off as usize;
            let c = data.get(at..at + 65536).unwrap_or(&[]);
            assert!(
                c.is_empty() && fill == 0 || c.iter().all(|&b| b == fill),
                "{off:#x}"
            );
        }
    }

    #[test]
    fn a_write_the_thread_fails_is_reported() {
        // /dev/full takes no data: every write fails with ENOSPC.
        let out = FileStorage::open(std::path::Path::new("/dev/full"), true).unwrap();
        let mut w = DataWriter::new(&out, layout(), 0);
        assert!(w.behind.is_some());
        let mut failed = None;
        for _ in 0..(3 * FLUSH_AT / 65536) {
            if let Err(e) = w.cluster(&[1u8; 65536]) {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => w.finish().unwrap_err(),
        };
        assert!(matches!(e, CopyError::Write { .. }), "{e}");
    }

    #[test]
    fn deflate_output_inflates_and_stays_in_a_4k_window() {
        // Repeats at a distance of 6000 bytes: with a 32 KiB window deflate would refer back
        // across chunks; ours must not, and the data still round-trips.
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i % 6000) * 7 % 251) as u8;
        }
        let c = deflate_small_window(&data).unwrap();
        assert!(c.len() < data.len());
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&c[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        // Every chunk after a full flush starts from an empty dictionary: a chunk that
        // repeats the previous one exactly cannot be a single back reference.
        let twice: Vec<u8> = data[..4096].repeat(2);
        let c2 = deflate_small_window(&twice).unwrap();
        let single = deflate_small_window(&data[..4096]).unwrap();
        assert!(c2.len() > single.len() + single.len() / 2);
    }
}
