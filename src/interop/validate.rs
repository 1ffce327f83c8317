//! Checking that a file is a whole QEMU migration stream before it becomes a snapshot's VM
//! state: magic and version, every record parses (sections, RAM records, device bodies up to
//! their footers), every START has its END, an EOF, the optional vmdesc, and nothing after it.

use std::collections::BTreeSet;
use std::io::Read;

use super::integrity::CrcReader;
use crate::migration::protocol::SectionType;
use crate::migration::ram::RamRecord;
use crate::migration::stream::{configuration_name, Event, StreamError, StreamReader};

/// Why a file is not an acceptable migration stream.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The stream codec refused a record (bad magic, version, section, truncation, ...).
    /// Its message already carries the cause, so it is not chained as a source.
    #[error("{0}")]
    Stream(StreamError),
    /// The stream has no device or RAM sections at all.
    #[error("migration stream has no sections")]
    NoSections,
    /// The stream ended without its EOF record.
    #[error("migration stream ends at {0:#x} without an EOF record")]
    NoEof(u64),
    /// A START section never got its END.
    #[error("section '{idstr}' (id {section_id:#x}) was started but never ended")]
    Unterminated {
        /// Section id.
        section_id: u32,
        /// Its idstr.
        idstr: String,
    },
    /// Bytes after the stream's end.
    #[error("{extra:#x} unexpected bytes after the end of the stream at {end:#x}")]
    TrailingBytes {
        /// Where the stream ended.
        end: u64,
        /// How many bytes follow.
        extra: u64,
    },
    /// Reading the rest of the source failed.
    #[error("reading the stream failed")]
    Io(#[source] std::io::Error),
}

impl From<StreamError> for ValidateError {
    fn from(e: StreamError) -> Self {
        ValidateError::Stream(e)
    }
}

/// What a valid stream contains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Length in bytes (the whole source).
    pub len: u64,
    /// CRC32 of all its bytes.
    pub crc: u32,
    /// Machine name from the CONFIGURATION section, if sent.
    pub machine: Option<String>,
    /// `idstr/instance_id` of every section, in stream order.
    pub sections: Vec<String>,
    /// Full pages and zero pages in RAM sections.
    pub ram_pages: u64,
    /// Whether the JSON vmdesc trailer is present.
    pub has_vmdesc: bool,
}

/// Walks the whole stream from `src` and summarises it.
///
/// # Errors
/// [`ValidateError`] naming the first problem (with its stream offset).
pub fn validate_stream<R: Read>(src: R) -> Result<StreamSummary, ValidateError> {
    let mut crc = CrcReader::new(src);
    let mut sum = StreamSummary::default();
    let mut open = BTreeSet::new();
    let mut saw_eof = false;
    let end = {
        let mut rd = StreamReader::new(&mut crc);
        loop {
            match rd.next_event()? {
                Event::Configuration { value, .. } => {
                    sum.machine = Some(configuration_name(&value));
                }
                Event::Section { kind, info, .. } => match kind {
                    SectionType::Start | SectionType::Full => {
                        if kind == SectionType::Start {
                            open.insert((info.section_id, info.idstr.clone()));
                        }
                        sum.sections
                            .push(format!("{}/{}", info.idstr, info.instance_id));
                    }
                    SectionType::End => {
                        open.remove(&(info.section_id, info.idstr.clone()));
                    }
                    _ => {}
                },
                Event::Ram { record, .. } => {
                    if matches!(record, RamRecord::Page { .. } | RamRecord::Zero { .. }) {
                        sum.ram_pages += 1;
                    }
                }
                Event::Eof { .. } => saw_eof = true,
                Event::VmDescription { .. } => sum.has_vmdesc = true,
                Event::End => break rd.position(),
                _ => {}
            }
        }
    };
    if let Some((section_id, idstr)) = open.into_iter().next() {
        return Err(ValidateError::Unterminated { section_id, idstr });
    }
    if !saw_eof {
        return Err(ValidateError::NoEof(end));
    }
    if sum.sections.is_empty() {
        return Err(ValidateError::NoSections);
    }
    // The reader buffers ahead: what it has not handed out, plus whatever is left unread,
    // lies after the stream's end.
    let mut rest = Vec::new();
    (&mut crc)
        .take(1 << 20)
        .read_to_end(&mut rest)
        .map_err(ValidateError::Io)?;
    let (len, c) = crc.finish();
    if len > end {
        return Err(ValidateError::TrailingBytes {
            end,
            extra: len - end,
        });
    }
    sum.len = len;
    sum.crc = c;
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal stream: header, one FULL section with an empty body and footer, EOF.
    fn tiny(extra: &[u8]) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.push(0x04);
        s.extend(1u32.to_be_bytes());
        s.push(3);
        s.extend(b"dev");
        s.extend(0u32.to_be_bytes());
        s.extend(1u32.to_be_bytes());
        s.push(0x7e);
        s.extend(1u32.to_be_bytes());
        s.push(0x00);
        s.extend(extra);
        s
    }

    #[test]
    fn tiny_stream_is_accepted() {
        let s = tiny(&[]);
        let sum = validate_stream(&s[..]).unwrap();
        assert_eq!(sum.len, s.len() as u64);
        assert_eq!(sum.crc, crc32fast::hash(&s));
        assert_eq!(sum.sections, ["dev/0"]);
        assert!(!sum.has_vmdesc);
    }

    #[test]
    fn bytes_after_the_stream_are_refused() {
        let mut vmdesc = vec![0x06];
        vmdesc.extend(2u32.to_be_bytes());
        vmdesc.extend(b"{}");
        let s = tiny(&vmdesc);
        assert!(validate_stream(&s[..]).unwrap().has_vmdesc);
        let mut junk = s.clone();
        junk.extend(b"junk");
        let e = validate_stream(&junk[..]).unwrap_err();
        assert!(
            matches!(e, ValidateError::TrailingBytes { extra: 4, .. }),
            "{e:?}"
        );
        assert!(validate_stream(&tiny(b"x")[..]).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        let e = validate_stream(&b"not a stream at all"[..]).unwrap_err();
        assert!(format!("{:?}", e).contains("BadMagic"), "{e:?}");
        let e = validate_stream(&b"QEVM\0\0\0\x02"[..]).unwrap_err();
        assert!(matches!(e, ValidateError::Stream(_)));
        assert!(validate_stream(&b""[..]).is_err());
    }

    #[test]
    fn truncated_stream_is_refused() {
        let s = tiny(&[]);
        for cut in [8, 12, s.len() - 1] {
            assert!(validate_stream(&s[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn header_only_stream_has_no_sections() {
        let e = validate_stream(&b"QEVM\0\0\0\x03\x00"[..]).unwrap_err();
        assert!(matches!(e, ValidateError::NoSections), "{e:?}");
    }
}
