//! A whole stream decoded into memory, and encoded back byte for byte.

use std::io::{Read, Write};
use std::sync::Arc;

use super::writer::werr;
use super::{ErrorKind, Event, Result, SectionInfo, StreamError, StreamReader, StreamWriter};
use crate::migration::configuration::configuration_capabilities;
use crate::migration::protocol::SectionType;
use crate::migration::qemu_file::QemuFileReader;
use crate::migration::ram::{RamRecord, RamWriter, LZ4_CAPABILITY};
use crate::migration::value::Value;
use crate::migration::vmdesc::VmDesc;
use crate::migration::vmstate::VMStateDescription;

/// A whole stream decoded into memory (for tests, conversion and round trips; the inspector
/// streams instead).
#[derive(Debug, Clone)]
pub struct StreamModel {
    /// Records in stream order (the header is implied).
    pub records: Vec<Record>,
}

/// One record of a [`StreamModel`].
#[derive(Debug, Clone)]
pub enum Record {
    /// Configuration section.
    Configuration(Value),
    /// Section header.
    Section(SectionType, SectionInfo),
    /// RAM record with its page data for pages.
    Ram(RamRecord, Vec<u8>),
    /// Device body decoded with the stream's vmdesc (the description is kept for encoding).
    Device(Value, Arc<VMStateDescription>),
    /// Device body left undecoded.
    Raw(Vec<u8>),
    /// Section footer.
    Footer(u32),
    /// Command.
    Command(u16, Vec<u8>),
    /// EOF marker.
    Eof,
    /// vmdesc JSON bytes.
    VmDescription(Vec<u8>),
}

impl StreamModel {
    /// Decodes a whole stream; device bodies are decoded with the stream's own vmdesc (those
    /// it does not describe stay raw).
    pub fn decode<R: Read>(src: R) -> Result<Self> {
        let mut r = StreamReader::new(src);
        let mut records = Vec::new();
        let mut bodies: Vec<(usize, SectionInfo, u64)> = Vec::new();
        let mut current: Option<SectionInfo> = None;
        let mut vmdesc = None;
        loop {
            let ev = r.next_event()?;
            let rec = match ev {
                Event::Header { .. } => continue,
                Event::Configuration { value, .. } => Record::Configuration(value),
                Event::Section { kind, info, .. } => {
                    current = Some(info.clone());
                    Record::Section(kind, info)
                }
                Event::Ram { record, .. } => {
                    let data = if matches!(record, RamRecord::Page { .. }) {
                        r.page_data()?.to_vec()
                    } else {
                        Vec::new()
                    };
                    Record::Ram(record, data)
                }
                Event::Device { value, .. } => Record::Raw(format!("{value:?}").into_bytes()),
                Event::RawBody { offset, bytes } => {
                    if let Some(info) = &current {
                        bodies.push((records.len(), info.clone(), offset));
                    }
                    Record::Raw(bytes)
                }
                Event::Footer { section_id, .. } => Record::Footer(section_id),
                Event::Command { cmd, data, .. } => Record::Command(cmd, data),
                Event::Eof { .. } => Record::Eof,
                Event::VmDescription { json, offset } => {
                    vmdesc = Some(VmDesc::parse(&json).map_err(|e| StreamError {
                        offset,
                        section: None,
                        kind: Box::new(e.into()),
                    })?);
                    Record::VmDescription(json)
                }
                Event::End => break,
            };
            records.push(rec);
        }
        if let Some(desc) = vmdesc {
            for (idx, info, offset) in bodies {
                let Some(dev) = desc.device(&info.idstr, info.instance_id) else {
                    continue;
                };
                let Record::Raw(bytes) = &records[idx] else {
                    continue;
                };
                let value = decode_body(bytes, &dev.vmsd, offset).map_err(|kind| StreamError {
                    offset,
                    section: Some(info.label()),
                    kind: Box::new(kind),
                })?;
                records[idx] = Record::Device(value, dev.vmsd.clone());
            }
        }
        Ok(StreamModel { records })
    }

    /// Encodes the model; a decoded stream comes out byte for byte as it went in (for streams
    /// with LZ4 pages, when they were compressed by vmsnap's own [`RamWriter`]: pages are
    /// kept decompressed in the model and compressed again the same way).
    pub fn encode<W: Write>(&self, sink: W) -> Result<W> {
        let mut w = StreamWriter::new(sink);
        w.write_header()?;
        let mut ram = RamWriter::new(4096, false).map_err(|e| werr(0, e.into()))?;
        for rec in &self.records {
            match rec {
                Record::Configuration(v) => {
                    ram.set_lz4(
                        configuration_capabilities(v)
                            .iter()
                            .any(|c| c == LZ4_CAPABILITY),
                    );
                    w.write_configuration(v)?
                }
                Record::Section(kind, info) => w.write_section_header(*kind, info)?,
                Record::Ram(r, data) => {
                    let res = ram.write_record(&mut w.f, r, data);
                    w.wrap(res)?
                }
                Record::Device(v, vmsd) => {
                    let res = vmsd.encode(&mut w.f, v, None);
                    w.wrap(res)?
                }
                Record::Raw(b) => {
                    let res = w.f.put_buffer(b);
                    w.wrap(res)?
                }
                Record::Footer(id) => w.write_footer(*id)?,
                Record::Command(cmd, data) => w.write_command(*cmd, data)?,
                Record::Eof => w.write_eof()?,
                Record::VmDescription(json) => w.write_vmdesc(json)?,
            }
        }
        w.finish()
    }
}

/// Decodes one captured device body, which started at stream offset `base`, with a vmdesc
/// description; it must use every byte. Offsets in errors are stream offsets.
pub fn decode_body(
    bytes: &[u8],
    vmsd: &VMStateDescription,
    base: u64,
) -> std::result::Result<Value, ErrorKind> {
    let mut f = QemuFileReader::new(bytes);
    f.set_position(base);
    let value = vmsd.decode(&mut f, vmsd.version_id)?;
    let used = f.position() - base;
    if used != bytes.len() as u64 {
        return Err(ErrorKind::BodyLength {
            used,
            len: bytes.len(),
        });
    }
    Ok(value)
}
