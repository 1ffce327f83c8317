//! Writing stream records.

use std::io::Write;

use super::{ErrorKind, Result, SectionInfo, StreamError};
use crate::migration::configuration::configuration_vmsd;
use crate::migration::protocol::{SectionType, FILE_MAGIC, FILE_VERSION};
use crate::migration::qemu_file::{QemuFileError, QemuFileWriter};
use crate::migration::value::Value;
use crate::migration::vmdesc::MAX_VMDESC_BYTES;

/// Writes stream records.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    /// The buffered sink.
    pub f: QemuFileWriter<W>,
}

pub(super) fn werr(f: u64, kind: ErrorKind) -> StreamError {
    StreamError {
        offset: f,
        section: None,
        kind: Box::new(kind),
    }
}

impl<W: Write> StreamWriter<W> {
    /// A writer over `sink`.
    pub fn new(sink: W) -> Self {
        StreamWriter {
            f: QemuFileWriter::new(sink),
        }
    }

    pub(super) fn wrap<T>(&self, r: std::result::Result<T, impl Into<ErrorKind>>) -> Result<T> {
        r.map_err(|e| werr(self.f.position(), e.into()))
    }

    /// `QEVM` and version 3.
    pub fn write_header(&mut self) -> Result<()> {
        let r = self.f.put_be32(FILE_MAGIC);
        self.wrap(r)?;
        let r = self.f.put_be32(FILE_VERSION);
        self.wrap(r)
    }

    /// The configuration section.
    pub fn write_configuration(&mut self, value: &Value) -> Result<()> {
        let r = self.f.put_u8(SectionType::Configuration as u8);
        self.wrap(r)?;
        let r = configuration_vmsd().encode(&mut self.f, value, None);
        self.wrap(r)
    }

    /// A section header: full for START/FULL, id only for PART/END.
    pub fn write_section_header(&mut self, kind: SectionType, info: &SectionInfo) -> Result<()> {
        let f = &mut self.f;
        let r = (|| {
            f.put_u8(kind as u8)?;
            f.put_be32(info.section_id)?;
            if matches!(kind, SectionType::Start | SectionType::Full) {
                f.put_counted_string(&info.idstr)?;
                f.put_be32(info.instance_id)?;
                f.put_be32(info.version_id)?;
            }
            Ok::<(), QemuFileError>(())
        })();
        self.wrap(r)
    }

    /// A section footer.
    pub fn write_footer(&mut self, section_id: u32) -> Result<()> {
        let r = self.f.put_u8(SectionType::Footer as u8);
        self.wrap(r)?;
        let r = self.f.put_be32(section_id);
        self.wrap(r)
    }

    /// A COMMAND record (used only to re-encode decoded streams).
    pub fn write_command(&mut self, cmd: u16, data: &[u8]) -> Result<()> {
        let f = &mut self.f;
        let r = (|| {
            f.put_u8(SectionType::Command as u8)?;
            f.put_be16(cmd)?;
            f.put_be16(u16::try_from(data.len()).unwrap_or(u16::MAX))?;
            f.put_buffer(&data[..data.len().min(usize::from(u16::MAX))])
        })();
        self.wrap(r)
    }

    /// EOF.
    pub fn write_eof(&mut self) -> Result<()> {
        let r = self.f.put_u8(SectionType::Eof as u8);
        self.wrap(r)
    }

    /// The vmdesc trailer.
    pub fn write_vmdesc(&mut self, json: &[u8]) -> Result<()> {
        let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
        if len > MAX_VMDESC_BYTES {
            return Err(werr(self.f.position(), ErrorKind::VmDescTooLarge(len)));
        }
        let f = &mut self.f;
        let r = (|| {
            f.put_u8(SectionType::VmDescription as u8)?;
            f.put_be32(len)?;
            f.put_buffer(json)
        })();
        self.wrap(r)
    }

    /// Flushes and returns the sink.
    pub fn finish(self) -> Result<W> {
        let pos = self.f.position();
        self.f.into_inner().map_err(|e| werr(pos, e.into()))
    }
}
