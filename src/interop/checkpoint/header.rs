//! The fixed header and the integrity record, byte for byte (big-endian, as the QEMU stream
//! inside).

use super::{MAGIC, TRAILER_MAGIC};

/// Header length.
pub const HEADER_LEN: usize = 32;
/// Integrity record length.
pub const TRAILER_LEN: usize = 24;
/// Flag: the drives hold a disk-only snapshot of the checkpoint's instant (`save -c`),
/// named in the configuration's `disk_snapshot`.
pub const FLAG_DISK_SNAPSHOT: u32 = 1;
/// Every flag this version knows.
pub const KNOWN_FLAGS: u32 = FLAG_DISK_SNAPSHOT;

/// ```text
///  offset  size  field
///   0       8    magic        "VMSNAPCK"
///   8       4    version      format version (1)
///  12       4    flags        bit 0: FLAG_DISK_SNAPSHOT; other bits must be 0
///  16       4    config_len   bytes of the JSON configuration record
///  20       4    reserved     0
///  24       8    stream_len   bytes of the migration stream
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Flags.
    pub flags: u32,
    /// Configuration record length.
    pub config_len: u32,
    /// Migration stream length.
    pub stream_len: u64,
}

impl Header {
    /// The header's bytes (with [`MAGIC`]).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_be_bytes());
        b[12..16].copy_from_slice(&self.flags.to_be_bytes());
        b[16..20].copy_from_slice(&self.config_len.to_be_bytes());
        b[24..32].copy_from_slice(&self.stream_len.to_be_bytes());
        b
    }

    /// Decodes a header whose magic was checked by the caller.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let be32 = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[24..32]);
        Header {
            version: be32(8),
            flags: be32(12),
            config_len: be32(16),
            stream_len: u64::from_be_bytes(s),
        }
    }

    /// Offset of the migration stream.
    pub fn stream_offset(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.config_len)
    }

    /// Bytes covered by the integrity record (everything before it).
    pub fn covered_len(&self) -> u64 {
        self.stream_offset().saturating_add(self.stream_len)
    }

    /// The whole file's length.
    pub fn file_len(&self) -> u64 {
        self.covered_len().saturating_add(TRAILER_LEN as u64)
    }
}

/// ```text
///  offset  size  field
///   0       8    magic        "VMSNAPIR"
///   8       8    covered_len  bytes before this record (header + config + stream)
///  16       4    crc32        CRC32 (IEEE) of those bytes
///  20       4    reserved     0
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Bytes covered.
    pub covered_len: u64,
    /// Their CRC32.
    pub crc32: u32,
}

impl Trailer {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&TRAILER_MAGIC);
        b[8..16].copy_from_slice(&self.covered_len.to_be_bytes());
        b[16..20].copy_from_slice(&self.crc32.to_be_bytes());
        b
    }

    /// Decodes a record; `None` if the magic or the reserved word is wrong.
    pub fn decode(b: &[u8; TRAILER_LEN]) -> Option<Trailer> {
        if b[0..8] != TRAILER_MAGIC || b[20..24] != [0; 4] {
            return None;
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&b[8..16]);
        Some(Trailer {
            covered_len: u64::from_be_bytes(l),
            crc32: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
        })
    }
}
