//! Where the stream comes from: a file, or a qcow2 snapshot's VM state.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vmsnap::block::vmstate_io::VmstateReader;
use vmsnap::block::{open_image, BlockDriver, OpenOptions};

use vmsnap::interop::checkpoint::{is_checkpoint, Checkpoint, CheckpointError};

use crate::mapped::MappedFile;
use crate::pages::ReadAt;

/// Failures opening the input.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The stream file cannot be opened.
    #[error("cannot open '{path}': {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The image cannot be opened or read.
    #[error("image '{path}': {source}")]
    Image {
        path: String,
        #[source]
        source: vmsnap::block::Error,
    },
    /// The image format keeps no snapshots.
    #[error("image '{path}' ({format}) has no internal snapshots")]
    NoSnapshots { path: String, format: String },
    /// The checkpoint's header or configuration is unusable.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The snapshot was taken without VM state.
    #[error("snapshot '{tag}' of '{path}' has no VM state (disk-only snapshot)")]
    DiskOnly { path: String, tag: String },
}

/// An opened input.
pub enum Input {
    File(PathBuf, File),
    /// A checkpoint file (`save FILE`): its stream part, read in place.
    Checkpoint(PathBuf, Box<Checkpoint>),
    Snapshot {
        path: PathBuf,
        tag: String,
        image: Box<dyn BlockDriver>,
    },
}

/// Opens a stream file, or an image read-only for `--snapshot`.
pub fn open(path: &Path, snapshot: Option<&str>) -> Result<Input, InputError> {
    match snapshot {
        None if is_checkpoint(path) => Ok(Input::Checkpoint(
            path.to_path_buf(),
            Box::new(Checkpoint::open(path)?),
        )),
        None => {
            let f = File::open(path).map_err(|source| InputError::Open {
                path: path.display().to_string(),
                source,
            })?;
            Ok(Input::File(path.to_path_buf(), f))
        }
        Some(tag) => {
            let image = open_image(
                path,
                OpenOptions {
                    read_only: true,
                    force_share: true,
                    ..Default::default()
                },
            )
            .map_err(|source| InputError::Image {
                path: path.display().to_string(),
                source,
            })?;
            Ok(Input::Snapshot {
                path: path.to_path_buf(),
                tag: tag.to_string(),
                image,
            })
        }
    }
}

impl Input {
    /// What is being read, for headings.
    pub fn label(&self) -> String {
        match self {
            Input::File(p, _) => p.display().to_string(),
            Input::Checkpoint(p, _) => format!("{} (checkpoint)", p.display()),
            Input::Snapshot { path, tag, .. } => format!("{} snapshot '{tag}'", path.display()),
        }
    }

    /// A stream file read through a memory mapping (page bodies are then seeked over, not
    /// read); `None` for snapshots and files that cannot be mapped (pipes, devices).
    pub fn mapped(&self) -> Option<MappedFile<'_>> {
        match self {
            Input::File(_, f) if f.metadata().is_ok_and(|m| m.is_file()) => MappedFile::new(f).ok(),
            _ => None,
        }
    }

    /// The stream bytes, from the start (callable again to re-read).
    pub fn reader(&mut self) -> Result<Box<dyn Read + '_>, InputError> {
        match self {
            Input::File(p, f) => {
                f.seek(SeekFrom::Start(0))
                    .map_err(|source| InputError::Open {
                        path: p.display().to_string(),
                        source,
                    })?;
                Ok(Box::new(f))
            }
            Input::Checkpoint(_, cp) => Ok(Box::new(std::io::BufReader::with_capacity(
                1 << 20,
                cp.stream()?,
            ))),
            Input::Snapshot { path, tag, image } => {
                let format = image.format().to_string();
                let path = path.display().to_string();
                let store = image.snapshots().ok_or_else(|| InputError::NoSnapshots {
                    path: path.clone(),
                    format,
                })?;
                let r = VmstateReader::for_snapshot(store, tag).map_err(|source| {
                    InputError::Image {
                        path: path.clone(),
                        source,
                    }
                })?;
                if r.size() == 0 {
                    return Err(InputError::DiskOnly {
                        path,
                        tag: tag.clone(),
                    });
                }
                Ok(Box::new(r))
            }
        }
    }
}

/// Positioned reads of a snapshot's VM state.
struct SnapshotAt<'a> {
    store: &'a mut dyn vmsnap::block::SnapshotStore,
    id: String,
    size: u64,
}

impl ReadAt for SnapshotAt<'_> {
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if pos.saturating_add(buf.len() as u64) > self.size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.store
            .snapshot_vmstate_read(&self.id, pos, buf)
            .map_err(std::io::Error::other)
    }
}

/// Positioned reads of a stream file.
struct FileAt<'a>(&'a File);

impl ReadAt for FileAt<'_> {
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self.0, buf, pos)
    }
}

/// Positioned reads of a checkpoint's stream part.
struct CheckpointAt(vmsnap::interop::checkpoint::StreamWindow);

impl ReadAt for CheckpointAt {
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.seek(SeekFrom::Start(pos))?;
        self.0.read_exact(buf)
    }
}

impl Input {
    /// A checkpoint's configuration record (pretty JSON) and what its integrity record says;
    /// `None` for other inputs.
    pub fn checkpoint_summary(&mut self) -> Option<String> {
        let Input::Checkpoint(_, cp) = self else {
            return None;
        };
        let integrity = match cp.verify(&mut |_| {}) {
            Ok(()) => format!("CRC32 {:#010x} ok", cp.trailer.crc32),
            Err(e) => format!("DAMAGED: {e}"),
        };
        Some(format!(
            "CHECKPOINT\nformat version {}, flags {:#x}, stream at {:#x} ({:#x} bytes), integrity: {integrity}\nconfiguration:\n{}\n",
            cp.header.version,
            cp.header.flags,
            cp.header.stream_offset(),
            cp.header.stream_len,
            String::from_utf8_lossy(&cp.config.to_json()),
        ))
    }

    /// Why the bytes fail their integrity record (a checkpoint's CRC32, a vmsnap snapshot's
    /// state record), if they do; `None` for sound inputs and inputs without a record.
    pub fn damage(&mut self) -> Option<String> {
        match self {
            Input::File(..) => None,
            Input::Checkpoint(_, cp) => cp.verify(&mut |_| {}).err().map(|e| e.to_string()),
            Input::Snapshot { path, tag, .. } => crate::integrity::damaged_state(path, tag),
        }
    }

    /// Positioned reads of the stream bytes (for page bodies found by [`crate::pages::index`]).
    pub fn read_at(&mut self) -> Result<Box<dyn ReadAt + '_>, InputError> {
        match self {
            Input::File(_, f) => Ok(Box::new(FileAt(f))),
            Input::Checkpoint(_, cp) => Ok(Box::new(CheckpointAt(cp.stream()?))),
            Input::Snapshot { path, tag, image } => {
                let path = path.display().to_string();
                let format = image.format().to_string();
                let store = image.snapshots().ok_or_else(|| InputError::NoSnapshots {
                    path: path.clone(),
                    format,
                })?;
                let list = store.snapshot_list();
                let info = list
                    .iter()
                    .find(|s| &s.id == tag)
                    .or_else(|| list.iter().find(|s| &s.name == tag))
                    .ok_or_else(|| InputError::Image {
                        path,
                        source: vmsnap::block::Error::SnapshotNotFound(tag.clone()),
                    })?;
                let (id, size) = (info.id.clone(), info.vm_state_size);
                Ok(Box::new(SnapshotAt { store, id, size }))
            }
        }
    }
}
