//! Walking a migration stream record by record, and writing one.
//!
//! [`StreamReader`] is a pull parser: each [`StreamReader::next_event`] returns the next
//! record (header, configuration, section header, RAM record, device body, footer, command,
//! EOF, vmdesc). Memory stays bounded: RAM page data is never kept (read it with
//! [`StreamReader::page_data`] or [`StreamReader::read_page_into`] right after the page's
//! event), and device bodies are small.
//!
//! A device body is decoded when a description is known for its section (a registry on load,
//! or a vmdesc supplied up front). Otherwise the body is captured raw up to its section footer,
//! found by parsing forward: the first `0x7e, be32 section_id` that is followed by a plausible
//! next record. The stream's own vmdesc, which comes last, can then decode the captured bodies
//! ([`StreamModel::decode`] does this).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use super::protocol::{
    CommandKind, SectionType, FILE_MAGIC, FILE_VERSION, FILE_VERSION_COMPAT, RAM_VERSION,
};
use super::qemu_file::{QemuFileError, QemuFileReader, QemuFileWriter};
use super::ram::{infer_page_size, RamError, RamReader, RamRecord, RamWriter};
use super::value::Value;
use super::vmdesc::{VmDesc, VmDescError, MAX_VMDESC_BYTES};
use super::vmstate::{Count, Field, FieldType, VMStateDescription, VmStateError};

/// Largest device body captured without a description.
pub const MAX_CAPTURE: usize = 64 << 20;

/// What went wrong while walking or writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// The source failed or ended early.
    #[error(transparent)]
    File(#[from] QemuFileError),
    /// Not a migration stream.
    #[error("bad magic {0:#010x}, expected 0x5145564d (QEVM)")]
    BadMagic(u32),
    /// Version 2 streams.
    #[error("SaveVM v2 format is obsolete and don't work anymore")]
    ObsoleteVersion,
    /// Any version but 3.
    #[error("unsupported stream version {0}")]
    UnsupportedVersion(u32),
    /// A record type byte we do not know.
    #[error("unknown section type {0:#04x}")]
    UnknownRecordType(u8),
    /// A record type that is not allowed where it was found.
    #[error("unexpected {0} record")]
    UnexpectedRecord(&'static str),
    /// PART/END for a section that never started.
    #[error("section id {0:#x} was never started")]
    UnknownSectionId(u32),
    /// A section no handler knows (loader).
    #[error("unknown savevm section or instance '{idstr}' {instance_id}")]
    UnknownSection {
        /// Section idstr.
        idstr: String,
        /// Instance id.
        instance_id: u32,
    },
    /// A footer that names another section.
    #[error("section footer names section id {found:#x}, expected {expected:#x}")]
    FooterMismatch {
        /// The section just read.
        expected: u32,
        /// The id in the footer.
        found: u32,
    },
    /// A section not followed by its footer (loader).
    #[error("missing section footer for '{idstr}' (found {found} instead)")]
    MissingFooter {
        /// Section idstr.
        idstr: String,
        /// The record found instead of the footer.
        found: &'static str,
    },
    /// The RAM section failed to decode.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// A device body failed to decode.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// The vmdesc trailer is malformed.
    #[error(transparent)]
    VmDesc(#[from] VmDescError),
    /// The RAM section has a version we do not know.
    #[error("unknown RAM version {0}")]
    RamVersion(u32),
    /// No footer found after a device body without description.
    #[error("no section footer found for section id {section_id:#x} within {scanned:#x} bytes")]
    NoFooterFound {
        /// The section.
        section_id: u32,
        /// Bytes scanned.
        scanned: usize,
    },
    /// A vmdesc length beyond our limit.
    #[error("vmdesc length {0:#x} exceeds the limit")]
    VmDescTooLarge(u32),
    /// A byte after EOF that is not the vmdesc marker.
    #[error("unexpected byte {0:#04x} after EOF (expected 0x06 VMDESCRIPTION)")]
    AfterEof(u8),
    /// Configuration of another machine (loader).
    #[error("Machine type received is '{found}' and local is '{expected}'")]
    ConfigurationMismatch {
        /// Our machine.
        expected: String,
        /// The stream's.
        found: String,
    },
    /// A save/load handler refused the state or failed.
    #[error("section '{idstr}': {message}")]
    Handler {
        /// Section idstr.
        idstr: String,
        /// What the handler reported.
        message: String,
    },
    /// A device body decoded by vmdesc did not use exactly its bytes.
    #[error("device body decoded to {used:#x} bytes but {len:#x} were captured")]
    BodyLength {
        /// Bytes the description consumed.
        used: u64,
        /// Bytes captured.
        len: usize,
    },
}

/// A stream error with where it happened.
#[derive(Debug, thiserror::Error)]
#[error("{kind} (at stream offset {offset:#x}{})", section_suffix(.section))]
pub struct StreamError {
    /// Stream offset of the record or byte being decoded.
    pub offset: u64,
    /// The section being decoded, as `idstr (id N)`.
    pub section: Option<String>,
    /// What failed.
    #[source]
    pub kind: Box<ErrorKind>,
}

fn section_suffix(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(", in section {s}"),
        None => String::new(),
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, StreamError>;

/// A section's identity from its START/FULL header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    /// Section id (stream-local).
    pub section_id: u32,
    /// SaveStateEntry idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version of the entry's state.
    pub version_id: u32,
}

impl SectionInfo {
    /// `idstr (id N)`, for messages.
    pub fn label(&self) -> String {
        format!("'{}' (id {:#x})", self.idstr, self.section_id)
    }
    /// True for QEMU's RAM section.
    pub fn is_ram(&self) -> bool {
        self.idstr == "ram"
    }
}

/// One record of a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `QEVM` and the version.
    Header {
        /// Stream version (3).
        version: u32,
    },
    /// The configuration section (machine name, optional subsections).
    Configuration {
        /// Offset of the 0x07 byte.
        offset: u64,
        /// Decoded configuration (`len`, `name`, subsections).
        value: Value,
    },
    /// A section header (START/PART/END/FULL).
    Section {
        /// Offset of the type byte.
        offset: u64,
        /// START, PART, END or FULL.
        kind: SectionType,
        /// The section (for PART/END, from its START).
        info: SectionInfo,
    },
    /// A RAM record; for `Page`, the data is pending.
    Ram {
        /// Offset of the record.
        offset: u64,
        /// The record.
        record: RamRecord,
    },
    /// A device body decoded with a known description.
    Device {
        /// Offset of the body.
        offset: u64,
        /// The value.
        value: Value,
    },
    /// A device body kept as bytes (no description known yet).
    RawBody {
        /// Offset of the body.
        offset: u64,
        /// The bytes up to the footer.
        bytes: Vec<u8>,
    },
    /// A section footer.
    Footer {
        /// Offset of the 0x7e byte.
        offset: u64,
        /// Section id it closes.
        section_id: u32,
    },
    /// A COMMAND record.
    Command {
        /// Offset of the 0x08 byte.
        offset: u64,
        /// Command number.
        cmd: u16,
        /// Its name, if known.
        name: Option<&'static str>,
        /// Its payload.
        data: Vec<u8>,
    },
    /// End of the sections.
    Eof {
        /// Offset of the 0x00 byte.
        offset: u64,
    },
    /// The JSON description after EOF.
    VmDescription {
        /// Offset of the 0x06 byte.
        offset: u64,
        /// The JSON bytes as sent.
        json: Vec<u8>,
    },
    /// No more input.
    End,
}

impl Event {
    /// A short name of the record kind.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Header { .. } => "header",
            Event::Configuration { .. } => "CONFIGURATION",
            Event::Section { kind, .. } => kind.name(),
            Event::Ram { .. } => "RAM record",
            Event::Device { .. } | Event::RawBody { .. } => "device body",
            Event::Footer { .. } => "FOOTER",
            Event::Command { .. } => "COMMAND",
            Event::Eof { .. } => "EOF",
            Event::VmDescription { .. } => "VMDESCRIPTION",
            Event::End => "end of stream",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Top,
    Body(u32),
    AfterEof,
    Done,
}

/// How a device body is decoded.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The description.
    pub vmsd: Arc<VMStateDescription>,
    /// Check the section's version against the description (loader) instead of decoding at
    /// the description's own version (vmdesc).
    pub check_version: bool,
}

/// Pull parser over a migration stream.
#[derive(Debug)]
pub struct StreamReader<R> {
    f: QemuFileReader<R>,
    state: State,
    sections: HashMap<u32, SectionInfo>,
    last_section: Option<u32>,
    ram: RamReader,
    page_size_known: bool,
    pending_page: u64,
    page: Vec<u8>,
    page_valid: bool,
    decoders: HashMap<(String, u32), Decoder>,
}

impl<R: Read> StreamReader<R> {
    /// A reader over `src`, positioned at the stream's start.
    pub fn new(src: R) -> Self {
        Self::from_reader(QemuFileReader::new(src))
    }

    /// A reader over an existing buffered reader.
    pub fn from_reader(f: QemuFileReader<R>) -> Self {
        StreamReader {
            f,
            state: State::Header,
            sections: HashMap::new(),
            last_section: None,
            // 4 KiB until the stream says otherwise.
            ram: RamReader::default(),
            page_size_known: false,
            pending_page: 0,
            page: Vec::new(),
            page_valid: false,
            decoders: HashMap::new(),
        }
    }

    /// Fixes the target page size instead of inferring it from the RAM block list.
    pub fn set_page_size(&mut self, page_size: u64) -> Result<()> {
        self.ram
            .set_page_size(page_size)
            .map_err(|e| self.err(ErrorKind::Ram(e)))?;
        self.page_size_known = true;
        Ok(())
    }

    /// Decodes the body of section `idstr`/`instance_id` with `decoder`.
    pub fn add_decoder(&mut self, idstr: &str, instance_id: u32, decoder: Decoder) {
        self.decoders
            .insert((idstr.to_string(), instance_id), decoder);
    }

    /// Decodes every device of `vmdesc` by its description, and takes its page size.
    pub fn use_vmdesc(&mut self, vmdesc: &VmDesc) -> Result<()> {
        for d in &vmdesc.devices {
            self.add_decoder(
                &d.name,
                d.instance_id,
                Decoder {
                    vmsd: d.vmsd.clone(),
                    check_version: false,
                },
            );
        }
        self.set_page_size(vmdesc.page_size)
    }

    /// Current stream offset.
    pub fn position(&self) -> u64 {
        self.f.position()
    }

    /// Target page size in use.
    pub fn page_size(&self) -> u64 {
        self.ram.page_size()
    }

    /// The section being decoded, if any.
    pub fn current_section(&self) -> Option<&SectionInfo> {
        match self.state {
            State::Body(id) => self.sections.get(&id),
            _ => self.last_section.and_then(|id| self.sections.get(&id)),
        }
    }

    fn err(&self, kind: ErrorKind) -> StreamError {
        StreamError {
            offset: self.f.position(),
            section: self.current_section().map(SectionInfo::label),
            kind: Box::new(kind),
        }
    }

    fn err_at(&self, offset: u64, kind: ErrorKind) -> StreamError {
        StreamError {
            offset,
            section: self.current_section().map(SectionInfo::label),
            kind: Box::new(kind),
        }
    }

    /// The data of the page announced by the last `Ram` event.
    pub fn page_data(&mut self) -> Result<&[u8]> {
        if !self.page_valid {
            let n = self.pending_page as usize;
            self.page.resize(n, 0);
            self.f.read_exact(&mut self.page).map_err(|e| StreamError {
                offset: self.f.position(),
                section: self.current_section().map(SectionInfo::label),
                kind: Box::new(e.into()),
            })?;
            self.pending_page = 0;
            self.page_valid = true;
        }
        Ok(&self.page)
    }

    /// Reads the pending page straight into `dst` (which must be one page long).
    pub fn read_page_into(&mut self, dst: &mut [u8]) -> Result<()> {
        if self.page_valid {
            let n = dst.len().min(self.page.len());
            dst[..n].copy_from_slice(&self.page[..n]);
            return Ok(());
        }
        let want = self.pending_page as usize;
        let n = dst.len().min(want);
        self.f
            .read_exact(&mut dst[..n])
            .map_err(|e| self.err(e.into()))?;
        self.pending_page -= n as u64;
        Ok(())
    }

    /// Reads the next record.
    pub fn next_event(&mut self) -> Result<Event> {
        if self.pending_page > 0 {
            let n = self.pending_page;
            self.f.skip(n).map_err(|e| self.err(e.into()))?;
            self.pending_page = 0;
        }
        self.page_valid = false;
        match self.state {
            State::Header => self.read_header(),
            State::Top => self.read_top(),
            State::Body(id) => self.read_body(id),
            State::AfterEof => self.read_after_eof(),
            State::Done => Ok(Event::End),
        }
    }

    fn read_header(&mut self) -> Result<Event> {
        let magic = self.f.get_be32().map_err(|e| self.err(e.into()))?;
        if magic != FILE_MAGIC {
            return Err(self.err_at(0, ErrorKind::BadMagic(magic)));
        }
        let version = self.f.get_be32().map_err(|e| self.err(e.into()))?;
        if version == FILE_VERSION_COMPAT {
            return Err(self.err_at(4, ErrorKind::ObsoleteVersion));
        }
        if version != FILE_VERSION {
            return Err(self.err_at(4, ErrorKind::UnsupportedVersion(version)));
        }
        self.state = State::Top;
        Ok(Event::Header { version })
    }

    fn read_top(&mut self) -> Result<Event> {
        let offset = self.f.position();
        let byte = self.f.get_u8().map_err(|e| self.err(e.into()))?;
        let ty = SectionType::try_from(byte)
            .map_err(|b| self.err_at(offset, ErrorKind::UnknownRecordType(b)))?;
        let io = |s: &Self, e: QemuFileError| s.err(e.into());
        match ty {
            SectionType::Configuration => {
                let value = configuration_vmsd()
                    .decode(&mut self.f, 1)
                    .map_err(|e| self.err(e.into()))?;
                self.apply_configuration(&value)?;
                Ok(Event::Configuration { offset, value })
            }
            SectionType::Start | SectionType::Full => {
                let section_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let idstr = self.f.get_counted_string().map_err(|e| io(self, e))?;
                let instance_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let version_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let info = SectionInfo {
                    section_id,
                    idstr,
                    instance_id,
                    version_id,
                };
                self.sections.insert(section_id, info.clone());
                self.last_section = Some(section_id);
                self.state = State::Body(section_id);
                if info.is_ram() && info.version_id != RAM_VERSION {
                    return Err(self.err_at(offset, ErrorKind::RamVersion(info.version_id)));
                }
                Ok(Event::Section {
                    offset,
                    kind: ty,
                    info,
                })
            }
            SectionType::Part | SectionType::End => {
                let section_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let info =
                    self.sections.get(&section_id).cloned().ok_or_else(|| {
                        self.err_at(offset, ErrorKind::UnknownSectionId(section_id))
                    })?;
                self.last_section = Some(section_id);
                self.state = State::Body(section_id);
                Ok(Event::Section {
                    offset,
                    kind: ty,
                    info,
                })
            }
            SectionType::Footer => {
                let section_id = self.f.get_be32().map_err(|e| io(self, e))?;
                match self.last_section {
                    Some(expected) if expected == section_id => {}
                    expected => {
                        return Err(self.err_at(
                            offset,
                            ErrorKind::FooterMismatch {
                                expected: expected.unwrap_or(u32::MAX),
                                found: section_id,
                            },
                        ))
                    }
                }
                Ok(Event::Footer { offset, section_id })
            }
            SectionType::Eof => {
                self.state = State::AfterEof;
                self.last_section = None;
                Ok(Event::Eof { offset })
            }
            SectionType::Command => {
                let cmd = self.f.get_be16().map_err(|e| io(self, e))?;
                let len = self.f.get_be16().map_err(|e| io(self, e))?;
                let data = self.f.get_vec(usize::from(len)).map_err(|e| io(self, e))?;
                Ok(Event::Command {
                    offset,
                    cmd,
                    name: CommandKind::from_u16(cmd).map(CommandKind::name),
                    data,
                })
            }
            SectionType::Subsection | SectionType::VmDescription => {
                Err(self.err_at(offset, ErrorKind::UnexpectedRecord(ty.name())))
            }
        }
    }

    fn apply_configuration(&mut self, value: &Value) -> Result<()> {
        if let Some(bits) = value
            .get("configuration/target-page-bits")
            .and_then(|v| v.get("target_page_bits"))
            .and_then(Value::as_u64)
        {
            let ps = 1u64
                .checked_shl(u32::try_from(bits).unwrap_or(64))
                .unwrap_or(0);
            self.set_page_size(ps)?;
        }
        let caps = value
            .get("configuration/capabilities")
            .and_then(|v| v.get("capabilities"));
        if let Some(Value::Array(caps)) = caps {
            let ignore_shared = caps
                .iter()
                .any(|c| c.as_bytes() == Some(b"x-ignore-shared".as_slice()));
            if ignore_shared {
                let ps = self.ram.page_size();
                self.ram = RamReader::new(ps, true).map_err(|e| self.err(e.into()))?;
            }
        }
        Ok(())
    }

    fn read_body(&mut self, id: u32) -> Result<Event> {
        let info = self
            .sections
            .get(&id)
            .cloned()
            .ok_or_else(|| self.err(ErrorKind::UnknownSectionId(id)))?;
        let offset = self.f.position();
        if info.is_ram() {
            let record = self
                .ram
                .read_record(&mut self.f)
                .map_err(|e| self.err_at(offset, e.into()))?;
            match &record {
                RamRecord::MemSize { blocks, .. } if !self.page_size_known => {
                    let ps = infer_page_size(blocks);
                    self.ram.set_page_size(ps).map_err(|e| self.err(e.into()))?;
                }
                RamRecord::Page { .. } => self.pending_page = self.ram.page_size(),
                RamRecord::Eos => self.state = State::Top,
                _ => {}
            }
            return Ok(Event::Ram { offset, record });
        }
        self.state = State::Top;
        let key = (info.idstr.clone(), info.instance_id);
        if let Some(dec) = self.decoders.get(&key).cloned() {
            let version = if dec.check_version {
                info.version_id
            } else {
                dec.vmsd.version_id
            };
            let value = dec
                .vmsd
                .decode(&mut self.f, version)
                .map_err(|e| self.err(e.into()))?;
            return Ok(Event::Device { offset, value });
        }
        let bytes = self.capture_body(id)?;
        Ok(Event::RawBody { offset, bytes })
    }

    /// Reads bytes up to the first plausible footer of section `id`.
    fn capture_body(&mut self, id: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let footer = {
            let mut b = [0u8; 5];
            b[0] = SectionType::Footer as u8;
            b[1..].copy_from_slice(&id.to_be_bytes());
            b
        };
        loop {
            let (found, step) = match self.f.peek(512) {
                Ok([]) => (false, 0),
                Ok(window) => {
                    let found = window.starts_with(&footer)
                        && plausible_after_footer(&self.sections, &window[5..]);
                    // Consume up to the next candidate 0x7e in the window.
                    let step = window[1..]
                        .iter()
                        .position(|&b| b == SectionType::Footer as u8)
                        .map_or(window.len(), |p| p + 1);
                    (found, step)
                }
                Err(e) => return Err(self.err(e.into())),
            };
            if found {
                return Ok(out);
            }
            if step == 0 {
                return Err(self.err(ErrorKind::NoFooterFound {
                    section_id: id,
                    scanned: out.len(),
                }));
            }
            let start = out.len();
            out.resize(start + step, 0);
            self.f
                .read_exact(&mut out[start..])
                .map_err(|e| self.err(e.into()))?;
            if out.len() > MAX_CAPTURE {
                return Err(self.err(ErrorKind::NoFooterFound {
                    section_id: id,
                    scanned: out.len(),
                }));
            }
        }
    }

    fn read_after_eof(&mut self) -> Result<Event> {
        let offset = self.f.position();
        let Some(b) = self.f.peek_u8().map_err(|e| self.err(e.into()))? else {
            self.state = State::Done;
            return Ok(Event::End);
        };
        if b != SectionType::VmDescription as u8 {
            return Err(self.err_at(offset, ErrorKind::AfterEof(b)));
        }
        self.f.skip(1).map_err(|e| self.err(e.into()))?;
        let len = self.f.get_be32().map_err(|e| self.err(e.into()))?;
        if len > MAX_VMDESC_BYTES {
            return Err(self.err_at(offset, ErrorKind::VmDescTooLarge(len)));
        }
        let json = self
            .f
            .get_vec(len as usize)
            .map_err(|e| self.err(e.into()))?;
        self.state = State::Done;
        Ok(Event::VmDescription { offset, json })
    }
}

/// Whether `w` (the bytes after a candidate footer) starts like a record that can follow a
/// section: the stream's end, EOF + vmdesc, a new section header, or PART/END of a known section.
fn plausible_after_footer(sections: &HashMap<u32, SectionInfo>, w: &[u8]) -> bool {
    let Some(&t) = w.first() else {
        return true; // stream ends right after the footer
    };
    let be32 = |b: &[u8]| -> Option<u32> { Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)) };
    match SectionType::try_from(t) {
        Ok(SectionType::Eof) => w.len() == 1 || w[1] == SectionType::VmDescription as u8,
        Ok(SectionType::Start | SectionType::Full) => {
            let Some(len) = w.get(5).copied() else {
                return false;
            };
            let len = usize::from(len);
            len > 0
                && w.len() >= 6 + len + 8
                && w[6..6 + len].iter().all(|c| (0x20..0x7f).contains(c))
        }
        Ok(SectionType::Part | SectionType::End) => {
            be32(&w[1..]).is_some_and(|id| sections.contains_key(&id))
        }
        Ok(SectionType::Command) => {
            let cmd = w.get(1..3).map(|b| u16::from_be_bytes([b[0], b[1]]));
            cmd.and_then(CommandKind::from_u16).is_some()
        }
        _ => false,
    }
}

/// QEMU's `vmstate_configuration`: machine name and optional subsections.
pub fn configuration_vmsd() -> VMStateDescription {
    VMStateDescription::new("configuration", 1, 1)
        .field(Field::uint("len", 4))
        .field(Field::new(
            "name",
            FieldType::VBuffer {
                len_field: "len".into(),
            },
        ))
        .subsection(
            VMStateDescription::new("configuration/target-page-bits", 1, 1)
                .field(Field::uint("target_page_bits", 4)),
            None,
        )
        .subsection(
            VMStateDescription::new("configuration/capabilities", 1, 1)
                .field(Field::uint("caps_count", 4))
                .field(
                    Field::new("capabilities", FieldType::Capability)
                        .count(Count::FromField("caps_count".into())),
                ),
            None,
        )
        .subsection(
            VMStateDescription::new("configuration/uuid", 1, 1)
                .field(Field::new("uuid", FieldType::Buffer(16))),
            None,
        )
}

/// The configuration value for machine `name`.
pub fn configuration_value(name: &str) -> Value {
    Value::structure([
        ("len", Value::u32(name.len() as u32)),
        ("name", Value::Bytes(name.as_bytes().to_vec())),
    ])
}

/// The machine name of a configuration value.
pub fn configuration_name(v: &Value) -> String {
    v.get("name")
        .and_then(Value::as_bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// Writes stream records.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    /// The buffered sink.
    pub f: QemuFileWriter<W>,
}

fn werr(f: u64, kind: ErrorKind) -> StreamError {
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

    fn wrap<T>(&self, r: std::result::Result<T, impl Into<ErrorKind>>) -> Result<T> {
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

    /// Encodes the model; a decoded stream comes out byte for byte as it went in.
    pub fn encode<W: Write>(&self, sink: W) -> Result<W> {
        let mut w = StreamWriter::new(sink);
        w.write_header()?;
        let mut ram = RamWriter::new(4096, false).map_err(|e| werr(0, e.into()))?;
        for rec in &self.records {
            match rec {
                Record::Configuration(v) => w.write_configuration(v)?,
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

/// Decodes one captured device body with a vmdesc description; it must use every byte.
pub fn decode_body(
    bytes: &[u8],
    vmsd: &VMStateDescription,
    offset: u64,
) -> std::result::Result<Value, ErrorKind> {
    let _ = offset;
    let mut f = QemuFileReader::new(bytes);
    let value = vmsd.decode(&mut f, vmsd.version_id)?;
    if f.position() != bytes.len() as u64 {
        return Err(ErrorKind::BodyLength {
            used: f.position(),
            len: bytes.len(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u32, idstr: &str) -> SectionInfo {
        SectionInfo {
            section_id: id,
            idstr: idstr.into(),
            instance_id: 0,
            version_id: 1,
        }
    }

    /// A stream with one device whose body contains a fake footer for its own id.
    fn sample(body: &[u8], footer_id: u32) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        w.write_header().unwrap();
        w.write_configuration(&configuration_value("pc")).unwrap();
        w.write_command(2, &[0, 0, 0, 9]).unwrap();
        w.write_section_header(SectionType::Full, &info(3, "dev"))
            .unwrap();
        w.f.put_buffer(body).unwrap();
        w.write_footer(footer_id).unwrap();
        w.write_eof().unwrap();
        w.write_vmdesc(br#"{"page_size": 4096, "devices": []}"#)
            .unwrap();
        w.finish().unwrap()
    }

    fn events(bytes: &[u8]) -> Result<Vec<Event>> {
        let mut r = StreamReader::new(bytes);
        let mut out = Vec::new();
        loop {
            let e = r.next_event()?;
            if e == Event::End {
                return Ok(out);
            }
            out.push(e);
        }
    }

    #[test]
    fn walks_every_record_kind_and_skips_fake_footers() {
        // The body holds "7e 00 00 00 03" followed by junk: not a plausible footer.
        let body = [1u8, 0x7e, 0, 0, 0, 3, 0x99, 2, 3];
        let ev = events(&sample(&body, 3)).unwrap();
        assert!(matches!(ev[0], Event::Header { version: 3 }));
        match &ev[1] {
            Event::Configuration { value, offset: 8 } => {
                assert_eq!(configuration_name(value), "pc")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ev[2],
            Event::Command {
                cmd: 2,
                name: Some("PING"),
                ..
            }
        ));
        assert!(
            matches!(&ev[3], Event::Section { kind: SectionType::Full, info, .. } if info.idstr == "dev")
        );
        assert!(matches!(&ev[4], Event::RawBody { bytes, .. } if bytes == &body));
        assert!(matches!(ev[5], Event::Footer { section_id: 3, .. }));
        assert!(matches!(ev[6], Event::Eof { .. }));
        assert!(matches!(ev[7], Event::VmDescription { .. }));
    }

    #[test]
    fn decodes_with_a_known_description_and_checks_footers() {
        let bytes = sample(&[0, 0, 0, 5], 4);
        let mut r = StreamReader::new(&bytes[..]);
        r.add_decoder(
            "dev",
            0,
            Decoder {
                vmsd: Arc::new(VMStateDescription::new("dev", 1, 1).field(Field::uint("v", 4))),
                check_version: true,
            },
        );
        let mut got = None;
        let err = loop {
            match r.next_event() {
                Ok(Event::Device { value, .. }) => got = Some(value),
                Ok(Event::End) => panic!("footer mismatch not detected"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(got.unwrap().get("v"), Some(&Value::u32(5)));
        assert!(matches!(
            *err.kind,
            ErrorKind::FooterMismatch {
                expected: 3,
                found: 4
            }
        ));
        assert!(
            err.to_string().contains("in section 'dev' (id 0x3)"),
            "{err}"
        );
    }

    #[test]
    fn part_of_unknown_section_and_bad_bytes() {
        let mut bytes = b"QEVM\0\0\0\x03".to_vec();
        bytes.extend_from_slice(&[2, 0, 0, 0, 9]);
        let e = events(&bytes).unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::UnknownSectionId(9)));
        assert_eq!(e.offset, 8);
        let e = events(b"QEVM\0\0\0\x03\x00\x42").unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::AfterEof(0x42)));
        let e = events(b"XEVM\0\0\0\x03").unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::BadMagic(_)));
        let e = events(b"QEVM\0\0\0\x03\x05").unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::UnexpectedRecord("SUBSECTION")));
    }
}
