//! A drive whose image is not there yet: the destination of a migration that carries its
//! disks (`migrate -b`) creates the image from the stream. Until then the drive has no
//! size and every request fails; there is nothing to flush.

use super::{BlockDriver, Error, Format, Result};

/// Stands in for an image that an incoming migration will create.
#[derive(Debug, Clone, Copy, Default)]
pub struct Absent;

fn err() -> Error {
    Error::io(
        "the drive's image has not arrived yet (incoming migration)",
        std::io::Error::from(std::io::ErrorKind::NotFound),
    )
}

impl BlockDriver for Absent {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        0
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(err())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(err())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Err(err())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Err(err())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
