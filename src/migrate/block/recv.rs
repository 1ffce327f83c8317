//! The destination side of `vmsnap-block`: each drive the stream carries is built in a
//! temporary file next to its `--drive` path (`NAME.vmsnap-incoming`), renamed over the
//! path only once the whole stream is in ([`BlockReceiver::finish`]); on any failure the
//! temporary files are removed (on drop). An existing non-empty image at the path is
//! replaced only with `overwrite=on`.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::block::{self, BlockDriver, Format, OpenOptions};
use crate::migration::qemu_file::QemuFileReader;
use crate::migration::savevm::{handler_err, IterativeState, Sink, Source};
use crate::migration::stream;

use super::super::disks::DriveOpen;
use super::{
    byte_format, IDSTR, MAX_PIECE, REC_DATA, REC_DRIVE, REC_EOS, REC_IMAGE, REC_IMAGE_DONE,
    REC_ZERO,
};

/// Suffix of the image being received.
pub const INCOMING_SUFFIX: &str = ".vmsnap-incoming";

/// Errors putting the received images in place.
#[derive(Debug, thiserror::Error)]
pub enum BlockRecvError {
    /// Flushing, syncing or renaming a received image failed.
    #[error("putting the migrated image '{path}' in place: {source}")]
    Finish {
        /// The image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream announced a drive but did not complete its image.
    #[error("the migration stream did not complete the image of drive {0}")]
    Incomplete(usize),
}

/// The temporary path an image is received under.
pub fn incoming_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(INCOMING_SUFFIX);
    PathBuf::from(s)
}

/// Whether the destination's `--drive` image at `path` is still to come: missing or empty
/// (an incoming migration that carries disks creates it).
pub fn arrives(path: &Path) -> bool {
    !crate::block::storage::is_nbd(path) && std::fs::metadata(path).map_or(true, |m| m.len() == 0)
}

/// One drive being received.
#[derive(Debug)]
struct RecvDrive {
    path: PathBuf,
    tmp: PathBuf,
    format: Format,
    size: u64,
    tree_len: u64,
    /// The temporary file while the snapshot tree arrives.
    file: Option<File>,
    /// The driver on the temporary file once the tree is complete.
    driver: Option<Box<dyn BlockDriver>>,
}

/// The destination's `vmsnap-block` state.
#[derive(Debug)]
pub struct BlockReceiver {
    targets: Vec<DriveOpen>,
    drives: Vec<Option<RecvDrive>>,
    finished: bool,
}

impl BlockReceiver {
    /// A receiver for a VM whose `--drive`s are `targets` (in order).
    pub fn new(targets: &[DriveOpen]) -> Self {
        BlockReceiver {
            targets: targets.to_vec(),
            drives: targets.iter().map(|_| None).collect(),
            finished: false,
        }
    }

    /// Whether the stream carried any drive.
    pub fn carried_any(&self) -> bool {
        self.drives.iter().any(Option::is_some)
    }

    fn drive(&mut self, index: u32) -> Result<&mut RecvDrive, String> {
        self.drives
            .get_mut(index as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("record for drive {index}, which the stream did not announce"))
    }

    fn announce(&mut self, f: &mut QemuFileReader<&mut dyn std::io::Read>) -> Result<(), String> {
        let index = f.get_be32().map_err(|e| e.to_string())? as usize;
        let fmt_byte = f.get_u8().map_err(|e| e.to_string())?;
        let size = f.get_be64().map_err(|e| e.to_string())?;
        let tree_len = f.get_be64().map_err(|e| e.to_string())?;
        let target = self.targets.get(index).ok_or_else(|| {
            format!(
                "the stream carries drive {index}, but this VM has {} --drive(s)",
                self.targets.len()
            )
        })?;
        if self.drives.get(index).is_some_and(Option::is_some) {
            return Err(format!("drive {index} announced twice"));
        }
        let format = byte_format(fmt_byte).ok_or_else(|| format!("unknown format {fmt_byte}"))?;
        if target.format.is_some_and(|f| f != format) {
            return Err(format!(
                "drive {index} arrives as {}, but its --drive says format={}",
                format.name(),
                target.format.map_or("", Format::name)
            ));
        }
        if format == Format::Raw && tree_len != 0 {
            return Err(format!("raw drive {index} with a {tree_len}-byte image"));
        }
        if target.read_only {
            return Err(format!(
                "drive {index} ('{}') is read-only here: a migrated disk must be writable",
                target.path.display()
            ));
        }
        let existing = std::fs::metadata(&target.path)
            .map(|m| m.len())
            .unwrap_or(0);
        if existing > 0 && !target.overwrite {
            return Err(format!(
                "'{}' exists and is not empty: refusing to replace it with the migrated disk \
                 (add overwrite=on to its --drive)",
                target.path.display()
            ));
        }
        let tmp = incoming_path(&target.path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| format!("creating '{}': {e}", tmp.display()))?;
        let mut d = RecvDrive {
            path: target.path.clone(),
            tmp,
            format,
            size,
            tree_len,
            file: Some(file),
            driver: None,
        };
        let r = match format {
            Format::Raw => d.set_len(size).and_then(|()| d.open_driver()),
            Format::Qcow2 => d.set_len(tree_len),
        };
        // Registered before the result is looked at, so that drop removes the file.
        let slot = self.drives.get_mut(index).ok_or("drive index")?;
        *slot = Some(d);
        r
    }

    /// Reads the records of one section, up to its EOS.
    fn read_records(
        &mut self,
        f: &mut QemuFileReader<&mut dyn std::io::Read>,
    ) -> Result<(), String> {
        loop {
            let kind = f.get_u8().map_err(|e| e.to_string())?;
            match kind {
                REC_EOS => return Ok(()),
                REC_DRIVE => self.announce(f)?,
                REC_IMAGE | REC_DATA | REC_ZERO => {
                    let index = f.get_be32().map_err(|e| e.to_string())?;
                    let offset = f.get_be64().map_err(|e| e.to_string())?;
                    let len = u64::from(f.get_be32().map_err(|e| e.to_string())?);
                    if len > MAX_PIECE {
                        return Err(format!("a {len}-byte piece (at most {MAX_PIECE})"));
                    }
                    let data = if kind == REC_ZERO {
                        Vec::new()
                    } else {
                        f.get_vec(len as usize).map_err(|e| e.to_string())?
                    };
                    let d = self.drive(index)?;
                    match kind {
                        REC_IMAGE => d.image_piece(offset, &data)?,
                        REC_DATA => d.guest_write(offset, Some(&data), len)?,
                        _ => d.guest_write(offset, None, len)?,
                    }
                }
                REC_IMAGE_DONE => {
                    let index = f.get_be32().map_err(|e| e.to_string())?;
                    let d = self.drive(index)?;
                    if d.format != Format::Qcow2 || d.driver.is_some() {
                        return Err(format!("unexpected end of image for drive {index}"));
                    }
                    d.open_driver()?;
                }
                other => return Err(format!("unknown record type {other:#x}")),
            }
        }
    }

    /// Puts every received image in place: flush, close, sync, rename over the `--drive`
    /// path, sync the folder. Call once the whole stream was read and loaded.
    ///
    /// # Errors
    /// An image the stream left incomplete, or a failing flush, sync or rename.
    pub fn finish(&mut self) -> Result<(), BlockRecvError> {
        for (i, slot) in self.drives.iter_mut().enumerate() {
            let Some(d) = slot else { continue };
            let Some(mut driver) = d.driver.take() else {
                return Err(BlockRecvError::Incomplete(i));
            };
            let err = |source| BlockRecvError::Finish {
                path: d.path.clone(),
                source,
            };
            driver
                .flush()
                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
            drop(driver);
            if let Some(file) = d.file.take() {
                file.sync_all().map_err(err)?;
            }
            std::fs::rename(&d.tmp, &d.path).map_err(err)?;
            let dir = d.path.parent().filter(|p| !p.as_os_str().is_empty());
            File::open(dir.unwrap_or(Path::new(".")))
                .and_then(|f| f.sync_all())
                .map_err(err)?;
        }
        self.finished = true;
        Ok(())
    }
}

impl RecvDrive {
    fn set_len(&mut self, len: u64) -> Result<(), String> {
        let file = self.file.as_ref().ok_or("image file closed")?;
        file.set_len(len)
            .map_err(|e| format!("sizing '{}': {e}", self.tmp.display()))
    }

    fn image_piece(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if self.driver.is_some() || self.format != Format::Qcow2 {
            return Err("an image piece after the image was complete".into());
        }
        if offset
            .checked_add(data.len() as u64)
            .map_or(true, |e| e > self.tree_len)
        {
            return Err(format!(
                "image piece at {offset:#x} beyond the {}-byte image",
                self.tree_len
            ));
        }
        let file = self.file.as_ref().ok_or("image file closed")?;
        file.write_all_at(data, offset)
            .map_err(|e| format!("writing '{}': {e}", self.tmp.display()))
    }

    fn open_driver(&mut self) -> Result<(), String> {
        if let Some(mut f) = self.file.take() {
            f.flush().map_err(|e| e.to_string())?;
            f.sync_data()
                .map_err(|e| format!("syncing '{}': {e}", self.tmp.display()))?;
            self.file = Some(f);
        }
        let opts = OpenOptions {
            read_only: false,
            format: Some(self.format),
            force_share: false,
        };
        let driver = block::open_image(&self.tmp, opts)
            .map_err(|e| format!("opening the received image '{}': {e}", self.tmp.display()))?;
        if driver.size() != self.size {
            return Err(format!(
                "the received image is {} bytes, the stream announced {}",
                driver.size(),
                self.size
            ));
        }
        self.driver = Some(driver);
        Ok(())
    }

    fn guest_write(&mut self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), String> {
        let driver = self
            .driver
            .as_mut()
            .ok_or("active-layer data before the image was complete")?;
        let r = match data {
            Some(d) => driver.write_at(offset, d),
            None => driver.write_zeroes(offset, len),
        };
        r.map_err(|e| format!("writing the received image at {offset:#x}: {e}"))
    }
}

impl Drop for BlockReceiver {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for d in self.drives.iter_mut().flatten() {
            d.driver = None;
            d.file = None;
            let _ = std::fs::remove_file(&d.tmp);
        }
    }
}

impl IterativeState for BlockReceiver {
    fn save_setup(&mut self, _f: &mut Sink<'_>) -> Result<(), String> {
        Err("the destination only loads".into())
    }

    fn save_iterate(&mut self, _f: &mut Sink<'_>) -> Result<bool, String> {
        Err("the destination only loads".into())
    }

    fn save_complete(&mut self, _f: &mut Sink<'_>) -> Result<(), String> {
        Err("the destination only loads".into())
    }

    fn load(&mut self, r: &mut Source<'_>) -> stream::Result<()> {
        let at = r.position();
        self.read_records(r.body_reader())
            .map_err(|m| handler_err(at, IDSTR, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, name: &str, overwrite: bool) -> DriveOpen {
        DriveOpen {
            path: dir.join(name),
            format: None,
            read_only: false,
            overwrite,
        }
    }

    fn drive_rec(out: &mut Vec<u8>, index: u32, format: u8, size: u64, tree: u64) {
        out.push(REC_DRIVE);
        out.extend(index.to_be_bytes());
        out.push(format);
        out.extend(size.to_be_bytes());
        out.extend(tree.to_be_bytes());
    }

    fn piece(out: &mut Vec<u8>, kind: u8, index: u32, offset: u64, len: u32, data: &[u8]) {
        out.push(kind);
        out.extend(index.to_be_bytes());
        out.extend(offset.to_be_bytes());
        out.extend(len.to_be_bytes());
        out.extend(data);
    }

    fn feed(r: &mut BlockReceiver, bytes: &[u8]) -> Result<(), String> {
        let mut src: &[u8] = bytes;
        let input: &mut dyn std::io::Read = &mut src;
        let mut f = QemuFileReader::new(input);
        r.read_records(&mut f)
    }

    #[test]
    fn a_raw_drive_is_built_aside_and_renamed_on_finish() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), "d.raw", false);
        let mut r = BlockReceiver::new(std::slice::from_ref(&t));
        let mut s = Vec::new();
        drive_rec(&mut s, 0, 0, 2 << 20, 0);
        piece(&mut s, REC_DATA, 0, 1 << 20, 4, b"abcd");
        piece(&mut s, REC_ZERO, 0, 0, 512, &[]);
        s.push(REC_EOS);
        feed(&mut r, &s).unwrap();
        assert!(incoming_path(&t.path).exists() && !t.path.exists());
        r.finish().unwrap();
        let data = std::fs::read(&t.path).unwrap();
        assert_eq!(data.len(), 2 << 20);
        assert_eq!(&data[1 << 20..(1 << 20) + 4], b"abcd");
        assert!(!incoming_path(&t.path).exists());
    }

    #[test]
    fn bad_records_fail_cleanly_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), "d.qcow2", false);
        let with_drive = |rest: &dyn Fn(&mut Vec<u8>)| {
            let mut s = Vec::new();
            drive_rec(&mut s, 0, 1, 1 << 20, 1 << 16);
            rest(&mut s);
            s
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unknown record type", with_drive(&|s| s.push(0x77))),
            (
                "at most",
                with_drive(&|s| piece(s, REC_IMAGE, 0, 0, (2 << 20) as u32, &[])),
            ),
            (
                "beyond the 65536-byte image",
                with_drive(&|s| piece(s, REC_IMAGE, 0, 65000, 4096, &[1; 4096])),
            ),
            (
                "did not announce",
                with_drive(&|s| piece(s, REC_DATA, 3, 0, 1, &[1])),
            ),
            (
                "before the image was complete",
                with_drive(&|s| piece(s, REC_DATA, 0, 0, 1, &[1])),
            ),
            ("announced twice", with_drive(&|s| drive_rec(s, 0, 1, 1, 1))),
            ("this VM has 1", {
                let mut s = Vec::new();
                drive_rec(&mut s, 5, 1, 1, 1);
                s
            }),
            ("unknown format", {
                let mut s = Vec::new();
                drive_rec(&mut s, 0, 9, 1, 1);
                s
            }),
            ("raw drive 0 with", {
                let mut s = Vec::new();
                drive_rec(&mut s, 0, 0, 1, 1);
                s
            }),
            // Cut short inside a record.
            ("", with_drive(&|s| s.extend([REC_IMAGE, 0, 0]))),
        ];
        for (want, bytes) in cases {
            let mut r = BlockReceiver::new(std::slice::from_ref(&t));
            let e = feed(&mut r, &bytes).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
            drop(r);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{want}");
        }
        // The tree never completed: finish refuses.
        let mut r = BlockReceiver::new(std::slice::from_ref(&t));
        feed(&mut r, &with_drive(&|s| s.push(REC_EOS))).unwrap();
        assert!(matches!(r.finish(), Err(BlockRecvError::Incomplete(0))));
        drop(r);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_existing_image_is_kept_without_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), "d.raw", false);
        std::fs::write(&t.path, b"old").unwrap();
        let mut s = Vec::new();
        drive_rec(&mut s, 0, 0, 4096, 0);
        let mut r = BlockReceiver::new(std::slice::from_ref(&t));
        let e = feed(&mut r, &s).unwrap_err();
        assert!(e.contains("overwrite=on"), "{e}");
        drop(r);
        assert_eq!(std::fs::read(&t.path).unwrap(), b"old");
        let t = target(dir.path(), "d.raw", true);
        let mut r = BlockReceiver::new(std::slice::from_ref(&t));
        s.push(REC_EOS);
        feed(&mut r, &s).unwrap();
        r.finish().unwrap();
        assert_eq!(std::fs::read(&t.path).unwrap(), vec![0; 4096]);
    }
}
