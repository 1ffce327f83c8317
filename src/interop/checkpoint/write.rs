//! Writing a checkpoint: to a hidden temporary file next to the target, synced, then renamed
//! over the target name, so that no half-written file ever carries the requested name.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::header::{Header, Trailer, HEADER_LEN};
use super::{CheckpointConfig, CheckpointError, Result, MAX_CONFIG_LEN, VERSION};

/// `DIR/.NAME.vmsnap-tmp` next to `target`.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".to_owned());
    target.with_file_name(format!(".{name}.vmsnap-tmp"))
}

/// A checkpoint being written: [`CheckpointWriter::create`], write the stream through
/// [`CheckpointWriter::stream`], then [`CheckpointWriter::finish`]. Dropped unfinished, it
/// removes its temporary file.
#[derive(Debug)]
#[must_use = "an unfinished checkpoint is removed when dropped"]
pub struct CheckpointWriter {
    target: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    flags: u32,
    config_len: u32,
    /// CRC32 of the configuration and stream bytes (the header's is combined in at the end,
    /// once `stream_len` is known).
    body: crc32fast::Hasher,
    stream_len: u64,
    done: bool,
}

impl CheckpointWriter {
    /// Starts `target`'s temporary file with a placeholder header and the configuration.
    ///
    /// # Errors
    /// [`CheckpointError::Io`] naming the temporary file; an oversized configuration.
    pub fn create(target: &Path, config: &CheckpointConfig, flags: u32) -> Result<Self> {
        let tmp = temp_path(target);
        let json = config.to_json();
        let config_len = u32::try_from(json.len())
            .ok()
            .filter(|l| *l <= MAX_CONFIG_LEN)
            .ok_or_else(|| CheckpointError::TooLarge {
                path: target.display().to_string(),
                what: "configuration record",
                value: json.len() as u64,
                limit: u64::from(MAX_CONFIG_LEN),
            })?;
        let file = File::create(&tmp).map_err(|source| CheckpointError::Io {
            path: tmp.display().to_string(),
            what: "creating the temporary file",
            source,
        })?;
        let mut w = CheckpointWriter {
            target: target.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            flags,
            config_len,
            body: crc32fast::Hasher::new(),
            stream_len: 0,
            done: false,
        };
        w.put(&[0u8; HEADER_LEN], false)?;
        w.put(&json, true)?;
        Ok(w)
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let path = self.tmp.display().to_string();
        move |source| CheckpointError::Io { path, what, source }
    }

    fn put(&mut self, b: &[u8], checksummed: bool) -> Result<()> {
        let err = self.io("writing");
        let out = self.out.as_mut().ok_or_else(|| err(closed()))?;
        out.write_all(b).map_err(self.io("writing"))?;
        if checksummed {
            self.body.update(b);
        }
        Ok(())
    }

    /// A writer for the migration stream (checksummed and counted).
    pub fn stream(&mut self) -> StreamSink<'_> {
        StreamSink { w: self }
    }

    /// Completes the file: the integrity record, the real header, fsync, rename over the
    /// target, fsync of the directory. Returns the file's length.
    ///
    /// # Errors
    /// [`CheckpointError::Io`]; the temporary file is removed and the target untouched.
    pub fn finish(mut self) -> Result<u64> {
        let header = Header {
            version: VERSION,
            flags: self.flags,
            config_len: self.config_len,
            stream_len: self.stream_len,
        };
        let head = header.encode();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.combine(&self.body);
        let trailer = Trailer {
            covered_len: header.covered_len(),
            crc32: crc.finalize(),
        };
        self.put(&trailer.encode(), false)?;
        let out = self
            .out
            .take()
            .ok_or_else(|| self.io("writing")(closed()))?;
        let mut file = out
            .into_inner()
            .map_err(|e| self.io("writing")(e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&head))
            .map_err(self.io("writing the header"))?;
        file.sync_all().map_err(self.io("syncing"))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.target).map_err(|source| CheckpointError::Io {
            path: self.target.display().to_string(),
            what: "renaming the temporary file",
            source,
        })?;
        self.done = true;
        if let Some(dir) = self.target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // The rename is durable once the directory is synced; a failure here leaves a
            // complete file, so it is not an error.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(header.file_len())
    }
}

fn closed() -> std::io::Error {
    std::io::Error::other("the checkpoint file is already closed")
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.done {
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The stream part of a [`CheckpointWriter`].
#[derive(Debug)]
pub struct StreamSink<'a> {
    w: &'a mut CheckpointWriter,
}

impl Write for StreamSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let out = self.w.out.as_mut().ok_or_else(closed)?;
        out.write_all(buf)?;
        self.w.body.update(buf);
        self.w.stream_len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.out.as_mut().ok_or_else(closed)?.flush()
    }
}
