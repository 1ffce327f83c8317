//! Opening an image for a subcommand: the concrete driver, so that qcow2-only facts (`info`,
//! `check`) are reachable, with the generic driver interface for everything else.

use std::path::Path;

use crate::block::qcow2::Qcow2;
use crate::block::raw::Raw;
use crate::block::{BlockDriver, Format, OpenOptions, Result};

/// An open image of a known format.
#[derive(Debug)]
pub enum Image {
    /// A qcow2 image (boxed: its caches make it much larger than a raw one).
    Qcow2(Box<Qcow2>),
    /// A raw image.
    Raw(Raw),
}

impl Image {
    /// Opens `path` with the given or probed format.
    ///
    /// # Errors
    /// The driver's open error (bad header, lock conflict, I/O).
    pub fn open(path: &Path, format: Option<Format>, opts: OpenOptions) -> Result<Self> {
        // The probe's storage stays open until the driver has opened its own (on NBD it
        // then shares the probe's connection).
        let (format, _probed) = match format {
            Some(f) => (f, None),
            None => crate::block::probe(path).map(|(f, s)| (f, Some(s)))?,
        };
        let opts = OpenOptions {
            format: Some(format),
            ..opts
        };
        Ok(match format {
            Format::Qcow2 => Image::Qcow2(Box::new(Qcow2::open(path, opts)?)),
            Format::Raw => Image::Raw(Raw::open(path, opts)?),
        })
    }

    /// The generic driver interface.
    pub fn driver(&mut self) -> &mut dyn BlockDriver {
        match self {
            Image::Qcow2(q) => q.as_mut(),
            Image::Raw(r) => r,
        }
    }

    /// Moves the image into a boxed driver (for a `BlockSet`).
    pub fn into_driver(self) -> Box<dyn BlockDriver> {
        match self {
            Image::Qcow2(q) => q,
            Image::Raw(r) => Box::new(r),
        }
    }
}

/// Parses a `-f` format name.
///
/// # Errors
/// The block layer's "Unknown image format" error.
pub fn parse_format(name: Option<&str>) -> Result<Option<Format>> {
    name.map(str::parse).transpose()
}

/// Host bytes allocated to the file (`st_blocks * 512`), as `qemu-img info`'s `disk size`.
pub fn actual_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
