//! Numeric constants of the QEMU migration stream (`migration/savevm.c`, `migration/ram.c`).

/// `QEVM`: the first four bytes of every stream.
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// The only stream version we read and write.
pub const FILE_VERSION: u32 = 3;
/// The version QEMU dropped ("SaveVM v2 format is obsolete and don't work anymore").
pub const FILE_VERSION_COMPAT: u32 = 2;
/// Marker byte QEMU writes for a NULL pointer in an array of pointers.
pub const NULLPTR_MARKER: u8 = 0x30;

/// Record types that may appear where a section is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SectionType {
    /// End of the device sections (0x00).
    Eof = 0x00,
    /// First part of an iterative section, with full header (0x01).
    Start = 0x01,
    /// A middle part of an iterative section (0x02).
    Part = 0x02,
    /// Last part of an iterative section (0x03).
    End = 0x03,
    /// A whole device section, with full header (0x04).
    Full = 0x04,
    /// A subsection inside a device's payload (0x05).
    Subsection = 0x05,
    /// The JSON description trailer after EOF (0x06).
    VmDescription = 0x06,
    /// Machine configuration (0x07).
    Configuration = 0x07,
    /// A command to the destination (0x08).
    Command = 0x08,
    /// Section footer (0x7e).
    Footer = 0x7e,
}

impl TryFrom<u8> for SectionType {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            0x00 => SectionType::Eof,
            0x01 => SectionType::Start,
            0x02 => SectionType::Part,
            0x03 => SectionType::End,
            0x04 => SectionType::Full,
            0x05 => SectionType::Subsection,
            0x06 => SectionType::VmDescription,
            0x07 => SectionType::Configuration,
            0x08 => SectionType::Command,
            0x7e => SectionType::Footer,
            other => return Err(other),
        })
    }
}

impl SectionType {
    /// QEMU's name for the record type.
    pub fn name(self) -> &'static str {
        match self {
            SectionType::Eof => "EOF",
            SectionType::Start => "START",
            SectionType::Part => "PART",
            SectionType::End => "END",
            SectionType::Full => "FULL",
            SectionType::Subsection => "SUBSECTION",
            SectionType::VmDescription => "VMDESCRIPTION",
            SectionType::Configuration => "CONFIGURATION",
            SectionType::Command => "COMMAND",
            SectionType::Footer => "FOOTER",
        }
    }
}

/// Commands (`MIG_CMD_*`) carried by COMMAND records. Streams to files rarely hold any; we
/// decode and name them but never emit them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// 1: open the return path.
    OpenReturnPath,
    /// 2: ping, with a 32-bit value.
    Ping,
    /// 3: postcopy advise.
    PostcopyAdvise,
    /// 4: postcopy listen.
    PostcopyListen,
    /// 5: postcopy run.
    PostcopyRun,
    /// 6: discard a list of RAM ranges.
    PostcopyRamDiscard,
    /// 7: a nested stream follows as a package.
    Packaged,
    /// 8: recovery of a paused postcopy.
    PostcopyResume,
    /// 9: request a received-bitmap.
    RecvBitmap,
    /// 10: enable colo.
    EnableColo,
    /// 11: switchover start.
    SwitchoverStart,
}

impl CommandKind {
    /// Maps a command number; `None` for unknown ones.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => CommandKind::OpenReturnPath,
            2 => CommandKind::Ping,
            3 => CommandKind::PostcopyAdvise,
            4 => CommandKind::PostcopyListen,
            5 => CommandKind::PostcopyRun,
            6 => CommandKind::PostcopyRamDiscard,
            7 => CommandKind::Packaged,
            8 => CommandKind::PostcopyResume,
            9 => CommandKind::RecvBitmap,
            10 => CommandKind::EnableColo,
            11 => CommandKind::SwitchoverStart,
            _ => return None,
        })
    }

    /// QEMU's name (`MIG_CMD_*` without the prefix, lower case as in trace output).
    pub fn name(self) -> &'static str {
        match self {
            CommandKind::OpenReturnPath => "OPEN_RETURN_PATH",
            CommandKind::Ping => "PING",
            CommandKind::PostcopyAdvise => "POSTCOPY_ADVISE",
            CommandKind::PostcopyListen => "POSTCOPY_LISTEN",
            CommandKind::PostcopyRun => "POSTCOPY_RUN",
            CommandKind::PostcopyRamDiscard => "POSTCOPY_RAM_DISCARD",
            CommandKind::Packaged => "PACKAGED",
            CommandKind::PostcopyResume => "POSTCOPY_RESUME",
            CommandKind::RecvBitmap => "RECV_BITMAP",
            CommandKind::EnableColo => "ENABLE_COLO",
            CommandKind::SwitchoverStart => "SWITCHOVER_START",
        }
    }
}

/// RAM record flags, in the low bits of the be64 that starts every RAM record.
pub mod ram_flags {
    /// Zero page (historically "COMPRESS"): one fill byte follows.
    pub const ZERO: u64 = 0x02;
    /// Block list (the address part is the total size).
    pub const MEM_SIZE: u64 = 0x04;
    /// Full page of data.
    pub const PAGE: u64 = 0x08;
    /// End of this RAM section part.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous record: no idstr.
    pub const CONTINUE: u64 = 0x20;
    /// XBZRLE-encoded page (`migration/xbzrle.rs`).
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook (never in files).
    pub const HOOK: u64 = 0x80;
    /// zlib-compressed page (the removed "compress" capability).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd flush marker (QEMU 8+).
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// All flags we know of.
    pub const KNOWN: u64 = 0x3fe;
}

/// The RAM section's version.
pub const RAM_VERSION: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_types_round_trip_and_reject_unknown() {
        for v in 0u8..=255 {
            if let Ok(t) = SectionType::try_from(v) {
                assert_eq!(t as u8, v);
                assert!(!t.name().is_empty());
            }
        }
        assert_eq!(SectionType::try_from(0x09), Err(0x09));
        assert_eq!(CommandKind::from_u16(2).map(|c| c.name()), Some("PING"));
        assert_eq!(CommandKind::from_u16(99), None);
    }
}
