//! Reading a checkpoint: the header, the configuration and the integrity record are checked
//! on open (bounded reads only); [`Checkpoint::verify`] checksums the whole file;
//! [`Checkpoint::stream`] reads the migration stream in place.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use super::header::{Header, Trailer, HEADER_LEN, KNOWN_FLAGS, TRAILER_LEN};
use super::{supported_versions, CheckpointConfig, CheckpointError, Result, MAGIC, MAX_CONFIG_LEN};

/// An opened checkpoint file.
#[derive(Debug)]
pub struct Checkpoint {
    path: String,
    file: File,
    /// The header.
    pub header: Header,
    /// The integrity record.
    pub trailer: Trailer,
    /// The configuration record.
    pub config: CheckpointConfig,
}

/// Whether `path` starts with the checkpoint magic (false when it cannot be read).
pub fn is_checkpoint(path: &Path) -> bool {
    let mut b = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok_and(|()| b == MAGIC)
}

impl Checkpoint {
    /// Opens `path` and checks everything but the checksum: magic, version, flags, lengths
    /// against the file's size, the integrity record's framing, the configuration.
    ///
    /// # Errors
    /// [`CheckpointError`]: each check has its own variant. A configuration that does not
    /// parse is reported as [`CheckpointError::Damaged`] when the checksum says so.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let name = path.display().to_string();
        let mut file = File::open(path).map_err(|source| CheckpointError::Io {
            path: name.clone(),
            what: "opening",
            source,
        })?;
        let CheckpointInfo {
            header,
            trailer,
            config,
        } = CheckpointInfo::read_from(&mut file, &name)?;
        Ok(Checkpoint {
            path: name,
            file,
            header,
            trailer,
            config,
        })
    }

    /// The file's path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Reads every byte the integrity record covers and compares the CRC32, reporting the
    /// bytes done to `progress`.
    ///
    /// # Errors
    /// [`CheckpointError::Damaged`] on a mismatch; [`CheckpointError::Io`].
    pub fn verify(&mut self, progress: &mut dyn FnMut(u64)) -> Result<()> {
        verify_crc(
            &mut self.file,
            &self.header,
            &self.trailer,
            &self.path,
            progress,
        )
    }

    /// The migration stream, read in place.
    ///
    /// # Errors
    /// [`CheckpointError::Io`] if the file cannot be duplicated.
    pub fn stream(&self) -> Result<StreamWindow> {
        let file = self
            .file
            .try_clone()
            .map_err(|source| CheckpointError::Io {
                path: self.path.clone(),
                what: "opening the stream",
                source,
            })?;
        Ok(StreamWindow {
            file,
            start: self.header.stream_offset(),
            len: self.header.stream_len,
            pos: 0,
        })
    }
}

/// What [`Checkpoint::open`] reads and checks, from any `Read + Seek` (a file, or bytes in
/// memory: `vmsnap-inspect` and the `checkpoint` fuzz target read through this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The header.
    pub header: Header,
    /// The integrity record.
    pub trailer: Trailer,
    /// The configuration record.
    pub config: CheckpointConfig,
}

impl CheckpointInfo {
    /// Reads a checkpoint from `r` (its length is where `r` ends) with every check of
    /// [`Checkpoint::open`]; `name` names it in errors.
    ///
    /// # Errors
    /// As [`Checkpoint::open`].
    pub fn read_from<R: Read + Seek>(r: &mut R, name: &str) -> Result<CheckpointInfo> {
        let io = |what| {
            let path = name.to_string();
            move |source| CheckpointError::Io { path, what, source }
        };
        let actual = r
            .seek(SeekFrom::End(0))
            .and_then(|n| r.seek(SeekFrom::Start(0)).map(|_| n))
            .map_err(io("reading its size"))?;
        let mut head = [0u8; HEADER_LEN];
        let got = read_up_to(r, &mut head).map_err(io("reading the header"))?;
        if got < MAGIC.len() || head[..8] != MAGIC {
            return Err(CheckpointError::Magic(name.to_string()));
        }
        let path = name.to_string();
        if got < HEADER_LEN {
            return Err(CheckpointError::Length {
                path,
                expected: HEADER_LEN as u64,
                actual,
            });
        }
        let header = Header::decode(&head);
        let versions = supported_versions();
        if !versions.contains(&header.version) {
            return Err(CheckpointError::Version {
                path,
                version: header.version,
                min: *versions.start(),
                max: *versions.end(),
            });
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(CheckpointError::Flags {
                path,
                flags: header.flags & !KNOWN_FLAGS,
            });
        }
        if header.config_len > MAX_CONFIG_LEN {
            return Err(CheckpointError::TooLarge {
                path,
                what: "configuration record",
                value: u64::from(header.config_len),
                limit: u64::from(MAX_CONFIG_LEN),
            });
        }
        if header.file_len() != actual {
            return Err(CheckpointError::Length {
                path,
                expected: header.file_len(),
                actual,
            });
        }
        let mut tail = [0u8; TRAILER_LEN];
        r.seek(SeekFrom::Start(header.covered_len()))
            .and_then(|_| r.read_exact(&mut tail))
            .map_err(io("reading the integrity record"))?;
        let trailer = Trailer::decode(&tail)
            .filter(|t| t.covered_len == header.covered_len())
            .ok_or_else(|| CheckpointError::Trailer {
                path: path.clone(),
                offset: header.covered_len(),
            })?;
        // Bounded by MAX_CONFIG_LEN above, and by the input's length checked against it.
        let mut json = vec![0u8; header.config_len as usize];
        r.seek(SeekFrom::Start(HEADER_LEN as u64))
            .and_then(|_| r.read_exact(&mut json))
            .map_err(io("reading the configuration"))?;
        match serde_json::from_slice(&json) {
            Ok(config) => Ok(CheckpointInfo {
                header,
                trailer,
                config,
            }),
            Err(source) => {
                // A damaged file is reported as such, not as a bad configuration.
                verify_crc(r, &header, &trailer, name, &mut |_| {})?;
                Err(CheckpointError::Config { path, source })
            }
        }
    }

    /// Checks the CRC32 of the bytes of `r` the integrity record covers, as
    /// [`Checkpoint::verify`] does.
    ///
    /// # Errors
    /// As [`Checkpoint::verify`].
    pub fn verify<R: Read + Seek>(
        &self,
        r: &mut R,
        name: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        verify_crc(r, &self.header, &self.trailer, name, progress)
    }
}

fn verify_crc<R: Read + Seek>(
    r: &mut R,
    header: &Header,
    trailer: &Trailer,
    name: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let io = |source| CheckpointError::Io {
        path: name.to_string(),
        what: "reading",
        source,
    };
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let covered = r.take(header.covered_len());
    let (len, crc) =
        crate::interop::integrity::crc_of_with_progress(covered, progress).map_err(io)?;
    if len != header.covered_len() || crc != trailer.crc32 {
        return Err(CheckpointError::Damaged {
            path: name.to_string(),
            actual: crc,
            stored: trailer.crc32,
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to<R: Read>(f: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The stream part of a checkpoint as a file of its own (`Read + Seek`, offsets from the
/// stream's first byte).
#[derive(Debug)]
pub struct StreamWindow {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl StreamWindow {
    /// The stream's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the stream is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for StreamWindow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = std::os::unix::fs::FileExt::read_at(
            &self.file,
            &mut buf[..want],
            self.start + self.pos,
        )?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for StreamWindow {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the stream's start",
            )
        })?;
        self.pos = new;
        Ok(new)
    }
}
