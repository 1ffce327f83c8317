//! The source side of `vmsnap-block`: per writable drive, the snapshot tree copied at setup
//! into a sparse temporary file next to the image, then the active layer chunk by chunk
//! while the guest runs, and the chunks the guest wrote meanwhile again.

use crate::migration::ram::is_zero;
use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use crate::block::dirty::DirtyChunks;
use crate::block::qcow2::copy::{copy_image, CopyOptions, Select, SourceImage};
use crate::block::qcow2::{Compat, Qcow2};
use crate::block::storage::{FileStorage, Storage};
use crate::block::{self, Format, OpenOptions};
use crate::migration::qemu_file;
use crate::migration::savevm::{IterativeState, Sink, Source};
use crate::migration::stream;
use crate::vmm::Vm;

use super::super::disks::DriveOpen;
use super::{
    format_byte, MAX_PIECE, REC_DATA, REC_DRIVE, REC_EOS, REC_IMAGE, REC_IMAGE_DONE, REC_ZERO,
};

/// Errors preparing a block migration.
#[derive(Debug, thiserror::Error)]
pub enum BlockSendError {
    /// The image could not be opened a second time to copy its snapshots.
    #[error("block migration of '{path}': {source}")]
    Open {
        /// Image path.
        path: String,
        /// Cause.
        #[source]
        source: block::Error,
    },
    /// Copying the snapshot tree failed.
    #[error("block migration of '{path}': copying its snapshots: {source}")]
    Copy {
        /// Image path.
        path: String,
        /// Cause.
        #[source]
        source: block::qcow2::copy::CopyError,
    },
    /// The temporary file for the snapshot tree could not be made.
    #[error("block migration of '{path}': temporary file: {source}")]
    Temp {
        /// Image path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One drive being sent.
#[derive(Debug)]
struct SendDrive {
    index: u32,
    format: Format,
    size: u64,
    /// The snapshot tree (qcow2 only) and how much of it was sent.
    tree: Option<FileStorage>,
    tree_len: u64,
    tree_sent: u64,
    tree_done: bool,
    dirty: Arc<DirtyChunks>,
    /// Next chunk to look at (the pass goes front to back, then wraps around).
    cursor: u64,
}

/// Disk figures for `info migrate` (QEMU's `disk` stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCounters {
    /// Image and active-layer bytes sent (zero chunks count their length).
    pub transferred: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Snapshot-tree images plus the drives' virtual sizes.
    pub total: u64,
}

/// The source's `vmsnap-block` state.
#[derive(Debug)]
pub struct BlockSender<'v> {
    vm: &'v Vm,
    drives: Vec<SendDrive>,
    /// Bytes the next PART may send (set before each round).
    pub budget: u64,
    transferred: u64,
    /// Stream bytes of this section's bodies (records and their headers).
    stream_bytes: u64,
}

/// Output options that reproduce the source image's own layout.
fn same_options(q: &Qcow2) -> CopyOptions {
    let layout = q.layout();
    CopyOptions {
        cluster_size: 1 << layout.cluster_bits,
        refcount_bits: 1 << layout.refcount_order,
        compat: if q.header.version == 2 {
            Compat::V2
        } else {
            Compat::V3
        },
        extended_l2: layout.extended_l2,
        zstd: q.header.compression_type == 1,
        compress: false,
    }
}

/// Copies the snapshots of the qcow2 image at `path` (a read-only handle of its own: the
/// snapshot layers do not change while the guest writes the active layer) into a
/// temporary file in the image's folder.
fn copy_tree(path: &Path, index: usize) -> Result<(FileStorage, u64), BlockSendError> {
    let name = path.display().to_string();
    let opts = OpenOptions {
        read_only: true,
        format: Some(Format::Qcow2),
        force_share: true,
    };
    let mut q = Qcow2::open(path, opts).map_err(|source| BlockSendError::Open {
        path: name.clone(),
        source,
    })?;
    let temp_err = |source| BlockSendError::Temp {
        path: name.clone(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Unlinked as soon as it is open: nothing is left behind, however the process ends.
    let tmp_path = dir.join(format!(".vmsnap-blockmig-{}-{index}", std::process::id()));
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .and_then(|_| FileStorage::open(&tmp_path, true));
    let _ = std::fs::remove_file(&tmp_path);
    let out = out.map_err(temp_err)?;
    let opts = same_options(&q);
    copy_image(
        &mut SourceImage::Qcow2(&mut q),
        &Select::Snapshots,
        &out,
        &opts,
        &mut |_, _| {},
    )
    .map_err(|source| BlockSendError::Copy {
        path: name.clone(),
        source,
    })?;
    let len = out.len().map_err(temp_err)?;
    Ok((out, len))
}

impl<'v> BlockSender<'v> {
    /// Prepares every writable drive of `vm` (opened as `drives`): copies the snapshot
    /// trees and starts tracking the guest's writes, every chunk dirty.
    pub fn prepare(vm: &'v Vm, drives: &[DriveOpen]) -> Result<Self, BlockSendError> {
        // The snapshot tables and layers on disk must be current for the second handle.
        vm.flush_drives().map_err(|source| BlockSendError::Open {
            path: "(flushing the drives)".into(),
            source,
        })?;
        let mut sender = BlockSender {
            vm,
            drives: Vec::new(),
            budget: 0,
            transferred: 0,
            stream_bytes: 0,
        };
        for (i, d) in drives.iter().enumerate() {
            if d.read_only {
                continue;
            }
            let name = d.path.display().to_string();
            let open_err = |source| BlockSendError::Open {
                path: name.clone(),
                source,
            };
            let format = match d.format {
                Some(f) => f,
                None => block::probe_format(&d.path).map_err(open_err)?,
            };
            let size = vm.with_block_set(|set| set.devices.get(i).map(|dev| dev.driver.size()));
            let size = size.unwrap_or(0);
            let (tree, tree_len) = match format {
                Format::Qcow2 => {
                    let (t, len) = copy_tree(&d.path, i)?;
                    (Some(t), len)
                }
                Format::Raw => (None, 0),
            };
            let dirty = Arc::new(DirtyChunks::all_dirty(size));
            vm.track_drive_writes(i, Some(dirty.clone()));
            sender.drives.push(SendDrive {
                index: i as u32,
                format,
                size,
                tree,
                tree_len,
                tree_sent: 0,
                // A raw image has no tree: its DATA follows DRIVE directly.
                tree_done: format == Format::Raw,
                dirty,
                cursor: 0,
            });
        }
        Ok(sender)
    }

    /// Bytes still to send.
    pub fn pending_bytes(&self) -> u64 {
        self.drives
            .iter()
            .map(|d| d.tree_len - d.tree_sent + d.dirty.dirty_bytes())
            .sum()
    }

    /// Bytes of the stream this section's bodies took (so that RAM's figures leave them out).
    pub fn stream_bytes(&self) -> u64 {
        self.stream_bytes
    }

    /// `info migrate` figures.
    pub fn counters(&self) -> DiskCounters {
        DiskCounters {
            transferred: self.transferred,
            remaining: self.pending_bytes(),
            total: self.drives.iter().map(|d| d.tree_len + d.size).sum(),
        }
    }

    fn write_drives(&self, f: &mut Sink<'_>) -> qemu_file::Result<()> {
        for d in &self.drives {
            f.put_u8(REC_DRIVE)?;
            f.put_be32(d.index)?;
            f.put_u8(format_byte(d.format))?;
            f.put_be64(d.size)?;
            f.put_be64(d.tree_len)?;
        }
        Ok(())
    }

    /// Sends up to `budget` bytes (tree pieces first, then dirty chunks); true when nothing
    /// is left.
    fn send(&mut self, f: &mut Sink<'_>, budget: u64) -> Result<bool, String> {
        let start = f.position();
        let vm = self.vm;
        for d in &mut self.drives {
            // One buffer for every piece (each read fills it whole).
            let mut buf = Vec::new();
            while !d.tree_done {
                if f.position() - start >= budget {
                    return Ok(false);
                }
                if d.tree_sent == d.tree_len {
                    f.put_u8(REC_IMAGE_DONE).map_err(|e| e.to_string())?;
                    f.put_be32(d.index).map_err(|e| e.to_string())?;
                    d.tree_done = true;
                    d.tree = None;
                    break;
                }
                let len = MAX_PIECE.min(d.tree_len - d.tree_sent);
                buf.resize(len as usize, 0);
                let file = d.tree.as_ref().ok_or("snapshot tree file gone")?;
                file.read_at(d.tree_sent, &mut buf)
                    .map_err(|e| format!("reading the snapshot tree copy: {e}"))?;
                // The file is sparse: zero pieces are holes on the destination too.
                if !is_zero(&buf) {
                    put_piece(f, REC_IMAGE, d.index, d.tree_sent, &buf)
                        .map_err(|e| e.to_string())?;
                }
                d.tree_sent += len;
                self.transferred += len;
            }
            loop {
                if f.position() - start >= budget {
                    return Ok(false);
                }
                let (dirty, drive) = (&d.dirty, d.index as usize);
                // Taking the chunk and reading it under the device lock: a guest write is
                // either before both (its data is read) or after both (it marks the chunk).
                let taken = vm.with_block_set(|set| {
                    let Some((off, len)) = dirty.take_next(d.cursor) else {
                        return Ok(None);
                    };
                    buf.resize(len as usize, 0);
                    let dev = set.devices.get_mut(drive).ok_or("drive detached")?;
                    match dev.driver.read_at(off, &mut buf) {
                        Ok(()) => Ok(Some((off, len))),
                        Err(e) => {
                            dirty.mark(off, len);
                            Err(format!("reading drive {drive} at {off:#x}: {e}"))
                        }
                    }
                })?;
                let Some((off, len)) = taken else { break };
                d.cursor = (off + len) / MAX_PIECE;
                if is_zero(&buf) {
                    f.put_u8(REC_ZERO).map_err(|e| e.to_string())?;
                    f.put_be32(d.index).map_err(|e| e.to_string())?;
                    f.put_be64(off).map_err(|e| e.to_string())?;
                    f.put_be32(len as u32).map_err(|e| e.to_string())?;
                } else {
                    put_piece(f, REC_DATA, d.index, off, &buf).map_err(|e| e.to_string())?;
                }
                self.transferred += len;
            }
        }
        Ok(true)
    }
}

impl Drop for BlockSender<'_> {
    fn drop(&mut self) {
        for d in &self.drives {
            self.vm.track_drive_writes(d.index as usize, None);
        }
    }
}

fn put_piece(
    f: &mut Sink<'_>,
    kind: u8,
    index: u32,
    offset: u64,
    data: &[u8],
) -> qemu_file::Result<()> {
    f.put_u8(kind)?;
    f.put_be32(index)?;
    f.put_be64(offset)?;
    f.put_be32(data.len() as u32)?;
    f.put_buffer(data)
}

/// The registry's handle on a [`BlockSender`] shared with the migration loop.
#[derive(Debug)]
pub struct BlockEntry<'a, 'v>(pub &'a RefCell<BlockSender<'v>>);

impl IterativeState for BlockEntry<'_, '_> {
    fn save_setup(&mut self, f: &mut Sink<'_>) -> Result<(), String> {
        let mut s = self.0.borrow_mut();
        let at = f.position();
        s.write_drives(f).map_err(|e| e.to_string())?;
        f.put_u8(REC_EOS).map_err(|e| e.to_string())?;
        s.stream_bytes += f.position() - at;
        Ok(())
    }

    fn save_iterate(&mut self, f: &mut Sink<'_>) -> Result<bool, String> {
        let mut s = self.0.borrow_mut();
        let at = f.position();
        let budget = s.budget;
        let done = s.send(f, budget)?;
        f.put_u8(REC_EOS).map_err(|e| e.to_string())?;
        s.stream_bytes += f.position() - at;
        Ok(done)
    }

    fn save_complete(&mut self, f: &mut Sink<'_>) -> Result<(), String> {
        let mut s = self.0.borrow_mut();
        let at = f.position();
        s.send(f, u64::MAX)?;
        f.put_u8(REC_EOS).map_err(|e| e.to_string())?;
        s.stream_bytes += f.position() - at;
        Ok(())
    }

    fn load(&mut self, _r: &mut Source<'_>) -> stream::Result<()> {
        Err(crate::migration::savevm::handler_err(
            0,
            super::IDSTR,
            "the migration source does not load".into(),
        ))
    }
}
