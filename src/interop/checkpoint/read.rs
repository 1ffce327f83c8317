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
        let io = |what| {
            let path = name.clone();
            move |source| CheckpointError::Io { path, what, source }
        };
        let mut file = File::open(path).map_err(io("opening"))?;
        let actual = file.metadata().map_err(io("reading its size"))?.len();
        let mut head = [0u8; HEADER_LEN];
        let got = read_up_to(&mut file, &mut head).map_err(io("reading the header"))?;
        if got < MAGIC.len() || head[..8] != MAGIC {
            return Err(CheckpointError::Magic(name));
        }
        if got < HEADER_LEN {
            return Err(CheckpointError::Length {
                path: name,
                expected: HEADER_LEN as u64,
                actual,
            });
        }
        let header = Header::decode(&head);
        let versions = supported_versions();
        if !versions.contains(&header.version) {
            return Err(CheckpointError::Version {
                path: name,
                version: header.version,
                min: *versions.start(),
                max: *versions.end(),
            });
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(CheckpointError::Flags {
                path: name,
                flags: header.flags & !KNOWN_FLAGS,
            });
        }
        if header.config_len > MAX_CONFIG_LEN {
            return Err(CheckpointError::TooLarge {
                path: name,
                what: "configuration record",
                value: u64::from(header.config_len),
                limit: u64::from(MAX_CONFIG_LEN),
            });
        }
        if header.file_len() != actual {
            return Err(CheckpointError::Length {
                path: name,
                expected: header.file_len(),
                actual,
            });
        }
        let mut tail = [0u8; TRAILER_LEN];
        file.seek(SeekFrom::Start(header.covered_len()))
            .and_then(|_| file.read_exact(&mut tail))
            .map_err(io("reading the integrity record"))?;
        let trailer = Trailer::decode(&tail)
            .filter(|t| t.covered_len == header.covered_len())
            .ok_or_else(|| CheckpointError::Trailer {
                path: name.clone(),
                offset: header.covered_len(),
            })?;
        // Bounded by MAX_CONFIG_LEN above.
        let mut json = vec![0u8; header.config_len as usize];
        file.seek(SeekFrom::Start(HEADER_LEN as u64))
            .and_then(|_| file.read_exact(&mut json))
            .map_err(io("reading the configuration"))?;
        let config = match serde_json::from_slice(&json) {
            Ok(c) => c,
            Err(source) => {
                let mut cp = Checkpoint {
                    path: name.clone(),
                    file,
                    header,
                    trailer,
                    config: placeholder(),
                };
                cp.verify(&mut |_| {})?;
                return Err(CheckpointError::Config { path: name, source });
            }
        };
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
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            what: "reading",
            source,
        };
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        let r = (&self.file).take(self.header.covered_len());
        let (len, crc) =
            crate::interop::integrity::crc_of_with_progress(r, progress).map_err(|source| {
                CheckpointError::Io {
                    path: self.path.clone(),
                    what: "reading",
                    source,
                }
            })?;
        if len != self.header.covered_len() || crc != self.trailer.crc32 {
            return Err(CheckpointError::Damaged {
                path: self.path.clone(),
                actual: crc,
                stored: self.trailer.crc32,
            });
        }
        Ok(())
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

fn placeholder() -> CheckpointConfig {
    CheckpointConfig {
        guest: String::new(),
        memory: 0,
        vcpus: 0,
        dirty_rate: 0,
        drives: Vec::new(),
        disk_snapshot: None,
        date_sec: 0,
        vm_clock_nsec: 0,
        writer: String::new(),
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
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
