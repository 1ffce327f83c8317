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

mod model;
mod reader;
mod writer;

pub use super::configuration::{configuration_name, configuration_value, configuration_vmsd};
pub use model::{decode_body, Record, StreamModel};
pub use reader::{Decoder, StreamReader, MAX_CAPTURE};
pub use writer::StreamWriter;

use super::protocol::SectionType;
use super::qemu_file::QemuFileError;
use super::ram::{RamError, RamHeader, RamRecord};
use super::value::Value;
use super::vmdesc::VmDescError;
use super::vmstate::VmStateError;

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
    /// The configuration announces a capability the loader cannot honour (loader).
    #[error("Received unknown capability {0}")]
    UnknownCapability(String),
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

/// What [`StreamReader::next_item`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A RAM record; for `Page`, the data is pending (as for [`Event::Ram`]).
    Ram {
        /// Offset of the record.
        offset: u64,
        /// The record, blocks by index into [`StreamReader::ram_blocks`].
        header: RamHeader,
    },
    /// Any other record.
    Other(Event),
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
