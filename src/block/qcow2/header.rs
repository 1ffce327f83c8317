//! The qcow2 header (versions 2 and 3) and its extensions.
//!
//! ```text
//!  off  size  field                        off  size  field (version 3 only)
//!    0     4  magic "QFI\xfb"                72     8  incompatible_features
//!    4     4  version (2 or 3)               80     8  compatible_features
//!    8     8  backing_file_offset            88     8  autoclear_features
//!   16     4  backing_file_size              96     4  refcount_order
//!   20     4  cluster_bits                  100     4  header_length
//!   24     8  size (virtual, bytes)         104     1  compression_type (if length > 104)
//!   32     4  crypt_method                  105     7  padding
//!   36     4  l1_size
//!   40     8  l1_table_offset               then extensions: be32 type, be32 length,
//!   48     8  refcount_table_offset         data padded to 8; type 0 ends the list.
//!   56     4  refcount_table_clusters
//!   60     4  nb_snapshots
//!   64     8  snapshots_offset
//! ```
//!
//! vmsnap never rewrites the header as a whole after creation: every update is a write of the
//! few fields that change (`l1_size`+`l1_table_offset` at 36, `refcount_table_*` at 48,
//! `nb_snapshots`+`snapshots_offset` at 60, feature words at 72/88). Unknown header fields and
//! unknown extensions are therefore kept byte for byte.

use byteorder::{BigEndian, ByteOrder};

use super::layout::{Layout, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::Qcow2Error;

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header vmsnap writes (with the compression type byte).
pub const V3_HEADER_LEN: u32 = 112;

/// Byte offset of `l1_size` (followed by `l1_table_offset`).
pub const OFF_L1: u64 = 36;
/// Byte offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
pub const OFF_REFTABLE: u64 = 48;
/// Byte offset of `nb_snapshots` (followed by `snapshots_offset`).
pub const OFF_SNAPSHOTS: u64 = 60;
/// Byte offset of `incompatible_features`.
pub const OFF_INCOMPAT: u64 = 72;
/// Byte offset of `autoclear_features`.
pub const OFF_AUTOCLEAR: u64 = 88;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image (needs a data file).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Incompatible feature bit 1: the image was marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bits vmsnap understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One header extension, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

/// Parsed header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 (none); encryption is not supported.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Header length in bytes.
    pub header_length: u32,
    /// 0 zlib (deflate), 1 zstd.
    pub compression_type: u8,
    /// Extensions in file order.
    pub extensions: Vec<Extension>,
    /// Backing file name.
    pub backing_file: Option<String>,
}

fn bad(msg: String) -> Qcow2Error {
    Qcow2Error::InvalidHeader(msg)
}

impl Header {
    /// Parses and validates the header from the first cluster of the image (or the first
    /// `min(file length, 2 MiB)` bytes).
    ///
    /// # Errors
    /// [`Qcow2Error::InvalidHeader`] or [`Qcow2Error::UnsupportedFeature`] naming the value.
    pub fn parse(buf: &[u8]) -> Result<Self, Qcow2Error> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(bad(format!(
                "qcow2 header too short: {} < {V2_HEADER_LEN} bytes",
                buf.len()
            )));
        }
        let be32 = |o: usize| BigEndian::read_u32(&buf[o..o + 4]);
        let be64 = |o: usize| BigEndian::read_u64(&buf[o..o + 8]);
        if be32(0) != QCOW_MAGIC {
            return Err(bad(format!(
                "Image is not in qcow2 format (magic {:#010x})",
                be32(0)
            )));
        }
        let version = be32(4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedFeature(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!("Unsupported cluster size: 2^{cluster_bits}")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits,
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad(format!(
                    "qcow2 v3 header too short: {} < 104",
                    buf.len()
                )));
            }
            h.incompatible_features = be64(72);
            h.compatible_features = be64(80);
            h.autoclear_features = be64(88);
            h.refcount_order = be32(96);
            h.header_length = be32(100);
            if h.header_length < 104 {
                return Err(bad(format!(
                    "qcow2 header too short: {} < 104",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(bad(format!(
                    "qcow2 header exceeds cluster size: header_length {}",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::UnsupportedFeature(format!(
                "Unsupported IMGFMT feature(s): {}",
                describe_bits(unknown, &feature_names(buf, &h))
            )));
        }
        if h.refcount_order > 6 {
            return Err(bad(format!(
                "Reference count entry width too large; may not exceed 64 bits (refcount_order {})",
                h.refcount_order
            )));
        }
        if h.crypt_method != 0 {
            return Err(Qcow2Error::UnsupportedFeature(format!(
                "encrypted images are not supported (crypt_method {})",
                h.crypt_method
            )));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION == 0 && h.compression_type != 0 {
            return Err(bad(format!(
                "compression_type {} without the compression-type feature bit",
                h.compression_type
            )));
        }
        if h.compression_type > 1 {
            return Err(Qcow2Error::UnsupportedFeature(format!(
                "Unknown compression type {}",
                h.compression_type
            )));
        }
        if h.size > (1u64 << 62) {
            return Err(bad(format!("Image size too big: {}", h.size)));
        }
        h.parse_extensions(buf, cluster_size)?;
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset;
            let len = u64::from(h.backing_file_size);
            if len > 1023 || start.saturating_add(len) > cluster_size.min(buf.len() as u64) {
                return Err(bad(format!(
                    "Backing file name too long or outside the header cluster (offset {start:#x}, length {len})"
                )));
            }
            let name = &buf[start as usize..(start + len) as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: u64) -> Result<(), Qcow2Error> {
        let end = (cluster_size as usize).min(buf.len());
        let limit = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(end)
        } else {
            end
        };
        let mut off = self.header_length as usize;
        loop {
            if off + 8 > limit {
                // No terminator before the end of the header area: QEMU accepts this.
                break;
            }
            let kind = BigEndian::read_u32(&buf[off..off + 4]);
            let len = BigEndian::read_u32(&buf[off + 4..off + 8]) as usize;
            if kind == 0 {
                break;
            }
            let data_start = off + 8;
            if len > limit - data_start {
                return Err(bad(format!(
                    "Header extension {kind:#010x} at {off:#x} too large ({len} bytes)"
                )));
            }
            self.extensions.push(Extension {
                kind,
                data: buf[data_start..data_start + len].to_vec(),
            });
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Image geometry.
    pub fn layout(&self) -> Layout {
        Layout {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible_features & INCOMPAT_EXTL2 != 0,
            refcount_order: self.refcount_order,
        }
    }

    /// The backing file format from the header extension, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// Serialises a fresh header for image creation (fields, extensions, backing name).
    pub fn to_bytes(&self, cluster_size: usize) -> Vec<u8> {
        let mut b = vec![0u8; cluster_size];
        BigEndian::write_u32(&mut b[0..], QCOW_MAGIC);
        BigEndian::write_u32(&mut b[4..], self.version);
        BigEndian::write_u64(&mut b[8..], self.backing_file_offset);
        BigEndian::write_u32(&mut b[16..], self.backing_file_size);
        BigEndian::write_u32(&mut b[20..], self.cluster_bits);
        BigEndian::write_u64(&mut b[24..], self.size);
        BigEndian::write_u32(&mut b[32..], self.crypt_method);
        BigEndian::write_u32(&mut b[36..], self.l1_size);
        BigEndian::write_u64(&mut b[40..], self.l1_table_offset);
        BigEndian::write_u64(&mut b[48..], self.refcount_table_offset);
        BigEndian::write_u32(&mut b[56..], self.refcount_table_clusters);
        BigEndian::write_u32(&mut b[60..], self.nb_snapshots);
        BigEndian::write_u64(&mut b[64..], self.snapshots_offset);
        if self.version >= 3 {
            BigEndian::write_u64(&mut b[72..], self.incompatible_features);
            BigEndian::write_u64(&mut b[80..], self.compatible_features);
            BigEndian::write_u64(&mut b[88..], self.autoclear_features);
            BigEndian::write_u32(&mut b[96..], self.refcount_order);
            BigEndian::write_u32(&mut b[100..], self.header_length);
            b[104] = self.compression_type;
        }
        let mut off = self.header_length as usize;
        for e in &self.extensions {
            BigEndian::write_u32(&mut b[off..], e.kind);
            BigEndian::write_u32(&mut b[off + 4..], e.data.len() as u32);
            b[off + 8..off + 8 + e.data.len()].copy_from_slice(&e.data);
            off += 8 + e.data.len().div_ceil(8) * 8;
        }
        // End-of-extensions marker is the zeroed 8 bytes at `off`.
        if let Some(name) = &self.backing_file {
            let start = self.backing_file_offset as usize;
            b[start..start + name.len()].copy_from_slice(name.as_bytes());
        }
        b
    }
}

/// Names from the feature name table extension: (type, bit, name).
fn feature_names(buf: &[u8], h: &Header) -> Vec<(u8, u8, String)> {
    let mut tmp = h.clone();
    let cluster_size = 1u64 << h.cluster_bits;
    if tmp.parse_extensions(buf, cluster_size).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in tmp
        .extensions
        .iter()
        .filter(|e| e.kind == EXT_FEATURE_TABLE)
    {
        for ent in e.data.chunks_exact(48) {
            let name_end = ent[2..].iter().position(|&c| c == 0).unwrap_or(46);
            out.push((
                ent[0],
                ent[1],
                String::from_utf8_lossy(&ent[2..2 + name_end]).into_owned(),
            ));
        }
    }
    out
}

fn describe_bits(bits: u64, names: &[(u8, u8, String)]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1 << bit) != 0 {
            match names.iter().find(|(t, b, _)| *t == 0 && *b == bit) {
                Some((_, _, n)) => parts.push(format!("bit {bit} ({n})")),
                None => parts.push(format!("Unknown incompatible feature: bit {bit}")),
            }
        }
    }
    parts.join(", ")
}

/// The feature name table QEMU writes into version 3 images.
pub fn default_feature_table() -> Extension {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(names.len() * 48);
    for (t, b, n) in names {
        let mut ent = [0u8; 48];
        ent[0] = t;
        ent[1] = b;
        ent[2..2 + n.len()].copy_from_slice(n.as_bytes());
        data.extend_from_slice(&ent);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 64 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            extensions: vec![default_feature_table()],
            backing_file: None,
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.to_bytes(65536);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = sample();
        h.incompatible_features = 1 << 9;
        let b = h.to_bytes(65536);
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("bit 9"), "{e}");
    }

    #[test]
    fn rejects_bad_magic_short_and_cluster_bits() {
        let mut b = sample().to_bytes(65536);
        assert!(Header::parse(&b[..50]).is_err());
        BigEndian::write_u32(&mut b[20..], 30);
        assert!(Header::parse(&b).unwrap_err().to_string().contains("2^30"));
        b[0] = 0;
        assert!(Header::parse(&b).is_err());
    }
}
