//! Buffered big-endian stream I/O with position tracking, like QEMU's `QEMUFile`.
//!
//! [`QemuFileReader`] and [`QemuFileWriter`] wrap any `Read`/`Write` (a file, a socket, a qcow2
//! vmstate area, a `Vec<u8>`). Small fields go through a buffer; payloads at least as large as
//! the buffer (RAM pages in bulk) are copied straight between the caller's slice and the
//! underlying source or sink.

use std::io::{self, Read, Write};

/// Default buffer size (QEMU uses 32 KiB; larger chunks suit the qcow2 vmstate area).
pub const DEFAULT_BUFFER: usize = 64 * 1024;

/// Errors of the stream reader and writer.
#[derive(Debug, thiserror::Error)]
pub enum QemuFileError {
    /// The source ended before the requested bytes.
    #[error("unexpected end of stream at offset {offset:#x} (wanted {wanted} more bytes)")]
    UnexpectedEof {
        /// Stream offset where data ran out.
        offset: u64,
        /// Bytes still missing.
        wanted: usize,
    },
    /// The source or sink failed.
    #[error("I/O error at stream offset {offset:#x}: {source}")]
    Io {
        /// Stream offset of the failed operation.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, QemuFileError>;

/// A buffered big-endian reader that knows its stream offset.
#[derive(Debug)]
pub struct QemuFileReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    pos: u64,
}

impl<R: Read> QemuFileReader<R> {
    /// Wraps `inner` with the default buffer size.
    pub fn new(inner: R) -> Self {
        Self::with_capacity(DEFAULT_BUFFER, inner)
    }

    /// Wraps `inner` with a buffer of `cap` bytes (at least 16).
    pub fn with_capacity(cap: usize, inner: R) -> Self {
        QemuFileReader {
            inner,
            buf: vec![0; cap.max(16)],
            start: 0,
            end: 0,
            pos: 0,
        }
    }

    /// Offset of the next byte to be read, counted from the start of the stream.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Declares that the next byte is at stream offset `pos` (for readers over a part of a
    /// stream, so that offsets in errors stay absolute).
    pub fn set_position(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Gives back the underlying source (buffered bytes are lost).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_inner(&mut self, dst_is_buf: bool, dst: &mut [u8]) -> Result<usize> {
        loop {
            let r = if dst_is_buf {
                let end = self.end;
                self.inner.read(&mut self.buf[end..])
            } else {
                self.inner.read(dst)
            };
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(QemuFileError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
    }

    /// Makes at least `n` (≤ buffer size) bytes available; returns how many are available.
    fn fill(&mut self, n: usize) -> Result<usize> {
        let n = n.min(self.buf.len());
        if self.end - self.start >= n {
            return Ok(self.end - self.start);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end < n {
            let got = self.read_inner(true, &mut [])?;
            if got == 0 {
                break;
            }
            self.end += got;
        }
        Ok(self.end - self.start)
    }

    /// Returns up to `n` buffered bytes without consuming them (fewer only at end of stream).
    pub fn peek(&mut self, n: usize) -> Result<&[u8]> {
        let avail = self.fill(n)?;
        Ok(&self.buf[self.start..self.start + avail.min(n)])
    }

    /// Peeks one byte; `None` at end of stream.
    pub fn peek_u8(&mut self) -> Result<Option<u8>> {
        Ok(self.peek(1)?.first().copied())
    }

    /// True when no byte is left.
    pub fn at_eof(&mut self) -> Result<bool> {
        Ok(self.peek_u8()?.is_none())
    }

    /// Fills `dst` completely; large reads bypass the buffer.
    pub fn read_exact(&mut self, dst: &mut [u8]) -> Result<()> {
        let mut done = 0;
        let buffered = (self.end - self.start).min(dst.len());
        dst[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        self.pos += buffered as u64;
        done += buffered;
        while done < dst.len() {
            let rest = dst.len() - done;
            if rest >= self.buf.len() {
                let got = self.read_inner(false, &mut dst[done..])?;
                if got == 0 {
                    return Err(QemuFileError::UnexpectedEof {
                        offset: self.pos,
                        wanted: rest,
                    });
                }
                done += got;
                self.pos += got as u64;
            } else {
                let avail = self.fill(rest)?;
                if avail == 0 {
                    return Err(QemuFileError::UnexpectedEof {
                        offset: self.pos,
                        wanted: rest,
                    });
                }
                let take = avail.min(rest);
                dst[done..done + take].copy_from_slice(&self.buf[self.start..self.start + take]);
                self.start += take;
                self.pos += take as u64;
                done += take;
            }
        }
        Ok(())
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            // Consume what is buffered first; read more only once the buffer is empty, so a
            // skip never moves buffered bytes around.
            let mut avail = self.end - self.start;
            if avail == 0 {
                avail = self.fill(1)?;
            }
            if avail == 0 {
                return Err(QemuFileError::UnexpectedEof {
                    offset: self.pos,
                    wanted: usize::try_from(n).unwrap_or(usize::MAX),
                });
            }
            let take = avail.min(usize::try_from(n).unwrap_or(usize::MAX));
            self.start += take;
            self.pos += take as u64;
            n -= take as u64;
        }
        Ok(())
    }

    /// Skips `n` bytes like [`Self::skip`], but moves past the part that is not buffered yet
    /// with `seek(source, count)` instead of reading it (a file or a mapping seeks forward;
    /// skipped RAM page bodies then cost no copy). A seek that fails with
    /// [`io::ErrorKind::UnexpectedEof`] is reported as the stream ending early.
    pub fn skip_with(
        &mut self,
        n: u64,
        seek: impl FnOnce(&mut R, u64) -> io::Result<()>,
    ) -> Result<()> {
        let buffered = self.end - self.start;
        let take = usize::try_from(n).map_or(buffered, |n| n.min(buffered));
        self.start += take;
        self.pos += take as u64;
        let rest = n - take as u64;
        if rest == 0 {
            return Ok(());
        }
        // The buffer is empty now: the source continues right after the skipped bytes.
        self.start = 0;
        self.end = 0;
        seek(&mut self.inner, rest).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                QemuFileError::UnexpectedEof {
                    offset: self.pos,
                    wanted: usize::try_from(rest).unwrap_or(usize::MAX),
                }
            } else {
                QemuFileError::Io {
                    offset: self.pos,
                    source,
                }
            }
        })?;
        self.pos += rest;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        self.read_exact(&mut a)?;
        Ok(a)
    }

    /// Reads one byte.
    pub fn get_u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a big-endian u16.
    pub fn get_be16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Reads a big-endian u32.
    pub fn get_be32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// Reads a big-endian u64.
    pub fn get_be64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// Reads `n` bytes into a new vector (callers bound `n`).
    pub fn get_vec(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.read_exact(&mut v)?;
        Ok(v)
    }
    /// Reads a string prefixed by a one-byte length (QEMU's idstr encoding), lossily as UTF-8.
    pub fn get_counted_string(&mut self) -> Result<String> {
        let len = self.get_u8()?;
        let mut b = [0u8; 255];
        self.read_exact(&mut b[..usize::from(len)])?;
        Ok(String::from_utf8_lossy(&b[..usize::from(len)]).into_owned())
    }
}

/// A buffered big-endian writer that knows how many bytes it has produced.
#[derive(Debug)]
pub struct QemuFileWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    cap: usize,
    pos: u64,
}

impl<W: Write> QemuFileWriter<W> {
    /// Wraps `inner` with the default buffer size.
    pub fn new(inner: W) -> Self {
        Self::with_capacity(DEFAULT_BUFFER, inner)
    }

    /// Wraps `inner` with a buffer of `cap` bytes.
    pub fn with_capacity(cap: usize, inner: W) -> Self {
        QemuFileWriter {
            inner,
            buf: Vec::with_capacity(cap.max(16)),
            cap: cap.max(16),
            pos: 0,
        }
    }

    /// Bytes written so far (buffered ones included).
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let at = self.pos - self.buf.len() as u64;
            self.inner
                .write_all(&self.buf)
                .map_err(|source| QemuFileError::Io { offset: at, source })?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes buffered bytes and flushes the sink.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_buf()?;
        let offset = self.pos;
        self.inner
            .flush()
            .map_err(|source| QemuFileError::Io { offset, source })
    }

    /// Flushes and gives back the sink.
    pub fn into_inner(mut self) -> Result<W> {
        self.flush()?;
        Ok(self.inner)
    }

    /// Mutable access to the sink (flush first if ordering matters).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Writes a byte slice; slices at least as large as the buffer go straight to the sink.
    pub fn put_buffer(&mut self, data: &[u8]) -> Result<()> {
        if self.buf.len() + data.len() <= self.cap {
            self.buf.extend_from_slice(data);
        } else if data.len() >= self.cap {
            self.flush_buf()?;
            let at = self.pos;
            self.inner
                .write_all(data)
                .map_err(|source| QemuFileError::Io { offset: at, source })?;
        } else {
            self.flush_buf()?;
            self.buf.extend_from_slice(data);
        }
        self.pos += data.len() as u64;
        Ok(())
    }
    /// Writes one byte.
    pub fn put_u8(&mut self, v: u8) -> Result<()> {
        self.put_buffer(&[v])
    }
    /// Writes a big-endian u16.
    pub fn put_be16(&mut self, v: u16) -> Result<()> {
        self.put_buffer(&v.to_be_bytes())
    }
    /// Writes a big-endian u32.
    pub fn put_be32(&mut self, v: u32) -> Result<()> {
        self.put_buffer(&v.to_be_bytes())
    }
    /// Writes a big-endian u64.
    pub fn put_be64(&mut self, v: u64) -> Result<()> {
        self.put_buffer(&v.to_be_bytes())
    }
    /// Writes a string with a one-byte length prefix; longer strings are an error.
    pub fn put_counted_string(&mut self, s: &str) -> Result<()> {
        let len = u8::try_from(s.len()).map_err(|_| QemuFileError::Io {
            offset: self.pos,
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("string of {} bytes does not fit a one-byte length", s.len()),
            ),
        })?;
        self.put_u8(len)?;
        self.put_buffer(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that returns at most 3 bytes per read, to exercise refills.
    struct Trickle(Vec<u8>, usize);
    impl Read for Trickle {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(3).min(self.0.len() - self.1);
            b[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn round_trip_fields_and_large_buffers() {
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut w = QemuFileWriter::with_capacity(64, Vec::new());
        w.put_u8(0xab).unwrap();
        w.put_be16(0x1234).unwrap();
        w.put_be32(0xdead_beef).unwrap();
        w.put_be64(0x0102_0304_0506_0708).unwrap();
        w.put_counted_string("ram0").unwrap();
        w.put_buffer(&big).unwrap();
        w.put_be32(7).unwrap();
        assert_eq!(w.position(), 1 + 2 + 4 + 8 + 5 + 100_000 + 4);
        let bytes = w.into_inner().unwrap();
        assert_eq!(&bytes[..3], &[0xab, 0x12, 0x34]);

        let mut r = QemuFileReader::with_capacity(32, Trickle(bytes, 0));
        assert_eq!(r.get_u8().unwrap(), 0xab);
        assert_eq!(r.get_be16().unwrap(), 0x1234);
        assert_eq!(r.get_be32().unwrap(), 0xdead_beef);
        assert_eq!(r.peek(2).unwrap(), &[1, 2]);
        assert_eq!(r.get_be64().unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(r.get_counted_string().unwrap(), "ram0");
        let mut got = vec![0u8; big.len()];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, big);
        assert_eq!(r.get_be32().unwrap(), 7);
        assert!(r.at_eof().unwrap());
        assert_eq!(r.position(), 100_024);
    }

    #[test]
    fn eof_reports_offset() {
        let mut r = QemuFileReader::new(&[1u8, 2, 3][..]);
        r.skip(2).unwrap();
        match r.get_be32() {
            Err(QemuFileError::UnexpectedEof { offset, .. }) => assert_eq!(offset, 3),
            other => panic!("unexpected {other:?}"),
        }
        let mut r = QemuFileReader::new(&[1u8][..]);
        assert!(matches!(
            r.skip(5),
            Err(QemuFileError::UnexpectedEof { offset: 1, .. })
        ));
    }
}
