//! `capture=on` raw drives (beyond QEMU): small raw drives, such as firmware variable stores,
//! whose whole contents savevm keeps in the VM state (section `vmsnap-capture`) and loadvm
//! writes back.
//!
//! ```text
//!  startup: check()      raw format, at most 64 MiB
//!  savevm:  read_all()   every captured drive's bytes → CapturedDrive → stream
//!  loadvm:  specs()      index, name, size → the stream's sections are checked against them
//!           write_back() after the whole stream was read: contents → drive, flush
//! ```

use crate::block::{BlockDriver, BlockSet, Format};
use crate::vmm::vmstate::MAX_CAPTURE_BYTES;

use super::state_io::{CaptureSpec, CapturedDrive};

/// Errors of `capture=on` drives.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// capture=on on a format other than raw.
    #[error("drive '{name}': capture=on needs a raw drive, this one is {format}")]
    NotRaw {
        /// Drive name or path.
        name: String,
        /// Its format.
        format: Format,
    },
    /// capture=on on a drive above the limit.
    #[error(
        "drive '{name}': capture=on drives may hold at most {max:#x} bytes, this one has {size:#x}"
    )]
    TooLarge {
        /// Drive name or path.
        name: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// capture=on on a read-only drive (loadvm could not write it back).
    #[error("drive '{0}': capture=on needs a writable drive")]
    ReadOnly(String),
    /// A captured drive index names no drive.
    #[error("captured drive {0} does not exist")]
    NoDrive(usize),
    /// Reading or writing back a captured drive failed.
    #[error("captured drive '{name}': {source}")]
    Io {
        /// Drive name.
        name: String,
        /// The cause.
        #[source]
        source: crate::block::Error,
    },
}

/// Checks that `driver` (called `name` in messages) may be opened with capture=on: raw and
/// at most 64 MiB.
pub fn check(driver: &dyn BlockDriver, name: &str) -> Result<(), CaptureError> {
    let format = driver.format();
    if format != Format::Raw {
        return Err(CaptureError::NotRaw {
            name: name.to_string(),
            format,
        });
    }
    if driver.is_read_only() {
        return Err(CaptureError::ReadOnly(name.to_string()));
    }
    let size = driver.size();
    if size > MAX_CAPTURE_BYTES {
        return Err(CaptureError::TooLarge {
            name: name.to_string(),
            size,
            max: MAX_CAPTURE_BYTES,
        });
    }
    Ok(())
}

/// The drive `i` of `set`, checked again (the list may have been set without [`check`]).
fn device(set: &mut BlockSet, i: usize) -> Result<&mut crate::block::Device, CaptureError> {
    let d = set.devices.get_mut(i).ok_or(CaptureError::NoDrive(i))?;
    check(d.driver.as_ref(), &d.name)?;
    Ok(d)
}

/// Reads the whole contents of every captured drive.
pub fn read_all(
    set: &mut BlockSet,
    captured: &[usize],
) -> Result<Vec<CapturedDrive>, CaptureError> {
    let mut out = Vec::with_capacity(captured.len());
    for &i in captured {
        let d = device(set, i)?;
        // Bounded by check(): at most MAX_CAPTURE_BYTES.
        let mut data = vec![0u8; usize::try_from(d.driver.size()).unwrap_or(0)];
        d.driver
            .read_at(0, &mut data)
            .map_err(|source| CaptureError::Io {
                name: d.name.clone(),
                source,
            })?;
        out.push(CapturedDrive {
            index: i,
            name: d.name.clone(),
            data,
        });
    }
    Ok(out)
}

/// What loadvm expects in the VM state for each captured drive.
pub fn specs(set: &mut BlockSet, captured: &[usize]) -> Result<Vec<CaptureSpec>, CaptureError> {
    let mut out = Vec::with_capacity(captured.len());
    for &i in captured {
        let d = device(set, i)?;
        out.push(CaptureSpec {
            index: i,
            name: d.name.clone(),
            size: d.driver.size(),
        });
    }
    Ok(out)
}

/// Writes the saved contents back to the captured drives (in the order of `specs`) and
/// flushes them.
pub fn write_back(
    set: &mut BlockSet,
    specs: &[CaptureSpec],
    contents: &[Vec<u8>],
) -> Result<(), CaptureError> {
    for (s, data) in specs.iter().zip(contents) {
        let d = device(set, s.index)?;
        let io = |source| CaptureError::Io {
            name: s.name.clone(),
            source,
        };
        d.driver.write_at(0, data).map_err(io)?;
        d.driver.flush().map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{self, OpenOptions};

    fn open(path: &std::path::Path, format: Format) -> Box<dyn BlockDriver> {
        let opts = OpenOptions {
            read_only: false,
            format: Some(format),
            force_share: false,
        };
        block::open_image(path, opts).unwrap()
    }

    #[test]
    fn raw_drives_up_to_64_mib_only() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.raw");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        check(open(&small, Format::Raw).as_ref(), "small").unwrap();
        let big = dir.path().join("big.raw");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CAPTURE_BYTES + 4096).unwrap();
        let err = check(open(&big, Format::Raw).as_ref(), "big").unwrap_err();
        assert!(err.to_string().contains("0x4000000"), "{err}");
        assert!(err.to_string().contains("0x4001000"), "{err}");
        let ro = OpenOptions {
            read_only: true,
            format: Some(Format::Raw),
            force_share: false,
        };
        let err = check(block::open_image(&small, ro).unwrap().as_ref(), "small").unwrap_err();
        assert!(
            matches!(err, CaptureError::ReadOnly(ref n) if n == "small"),
            "{err}"
        );
    }

    #[test]
    fn contents_are_read_and_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vars.raw");
        std::fs::write(&path, [7u8; 8192]).unwrap();
        let mut set = BlockSet {
            devices: vec![block::Device {
                name: "drive0".into(),
                driver: open(&path, Format::Raw),
            }],
        };
        let saved = read_all(&mut set, &[0]).unwrap();
        assert_eq!(saved[0].data, vec![7u8; 8192]);
        let sp = specs(&mut set, &[0]).unwrap();
        assert_eq!(sp[0].size, 8192);
        write_back(&mut set, &sp, &[vec![9u8; 8192]]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![9u8; 8192]);
        assert!(matches!(
            read_all(&mut set, &[3]),
            Err(CaptureError::NoDrive(3))
        ));
    }
}
