//! vmsnap's integrity record: a CRC32 of a snapshot's VM state, kept in the snapshot entry's
//! extra data after the 24 bytes QEMU knows (QEMU keeps unknown extra data verbatim).
//!
//! ```text
//!  extra data:  vm_state_size_large u64 | disk_size u64 | icount u64 | tail ...
//!  tail:        record | record | ...            (records are 8-byte multiples)
//!  record:      0  magic "VSNX"   4 bytes
//!               4  kind  u8      (1 = VM state checksum; 0 is never used)
//!               5  version u8    (1)
//!               6  record_len u16 BE (whole record, header included; multiple of 8)
//!  kind 1 v1:   8  state_len u64 BE (bytes covered, = vm_state_size)
//!              16  algorithm u8  (1 = CRC-32/ISO-HDLC, as zlib's crc32)
//!              17  reserved 3 bytes (0)
//!              20  checksum u32 BE
//! ```
//!
//! Readers skip records of unknown kind by `record_len`, ignore bytes past the fields they know
//! inside a record of a newer version, and treat a tail that does not start with the magic as
//! "no record" (somebody else's data). Spec: `formats/snapshot-integrity.md`.

use crate::block::vmstate_io::VmstateReader;
use crate::block::SnapshotStore;

/// Magic of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"VSNX";
/// Record kind: checksum of the VM state.
pub const KIND_STATE_CHECKSUM: u8 = 1;
/// Version of the checksum record this code writes.
pub const STATE_CHECKSUM_VERSION: u8 = 1;
/// Length of a version-1 checksum record.
pub const STATE_CHECKSUM_LEN: usize = 24;
/// Record header length (magic, kind, version, record_len).
const HEADER_LEN: usize = 8;

/// Checksum algorithms; 0 is reserved as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// CRC-32 (ISO-HDLC polynomial 0x04c11db7 reflected, init and xorout 0xffffffff).
    Crc32 = 1,
}

impl TryFrom<u8> for Algorithm {
    type Error = IntegrityError;
    fn try_from(v: u8) -> Result<Self> {
        match v {
            1 => Ok(Algorithm::Crc32),
            other => Err(IntegrityError::UnknownAlgorithm(other)),
        }
    }
}

/// Errors of parsing and verifying integrity records.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// A record header runs past the end of the tail.
    #[error("integrity record at tail offset {offset:#x} is truncated ({len:#x} bytes left)")]
    Truncated {
        /// Offset of the record inside the tail.
        offset: usize,
        /// Bytes left in the tail.
        len: usize,
    },
    /// A record length that is too small, not a multiple of 8 or past the tail.
    #[error("integrity record at tail offset {offset:#x} has bad length {record_len:#x}")]
    BadLength {
        /// Offset of the record inside the tail.
        offset: usize,
        /// Its length field.
        record_len: u16,
    },
    /// A checksum algorithm id we do not know.
    #[error("unknown checksum algorithm {0}")]
    UnknownAlgorithm(u8),
    /// The record covers a different number of bytes than the snapshot's VM state.
    #[error(
        "snapshot '{snapshot}': integrity record covers {recorded:#x} bytes but vm_state_size \
         is {actual:#x}"
    )]
    LengthMismatch {
        /// Snapshot name.
        snapshot: String,
        /// Length in the record.
        recorded: u64,
        /// vm_state_size of the entry.
        actual: u64,
    },
    /// The VM state does not match its checksum.
    #[error(
        "snapshot '{snapshot}': VM state is damaged: CRC32 is {actual:#010x}, stored \
         {expected:#010x}"
    )]
    Mismatch {
        /// Snapshot name.
        snapshot: String,
        /// Stored checksum.
        expected: u32,
        /// Computed checksum.
        actual: u32,
    },
    /// Reading the VM state failed.
    #[error("snapshot '{snapshot}': could not read the VM state")]
    Read {
        /// Snapshot name.
        snapshot: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot is not in the image.
    #[error(transparent)]
    Block(#[from] crate::block::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, IntegrityError>;

/// A parsed VM-state checksum record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChecksum {
    /// Bytes of VM state covered (the snapshot's `vm_state_size`).
    pub state_len: u64,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The checksum value.
    pub checksum: u32,
}

/// The extra-data tail to store with a snapshot whose VM state is `len` bytes with CRC32
/// `state_crc`.
///
/// ```
/// let t = vmsnap::interop::integrity::tail_for(0xdeadbeef, 0x1000);
/// assert_eq!(t.len(), 24);
/// let rec = vmsnap::interop::integrity::parse_tail(&t).unwrap().unwrap();
/// assert_eq!((rec.checksum, rec.state_len), (0xdeadbeef, 0x1000));
/// ```
pub fn tail_for(state_crc: u32, len: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(STATE_CHECKSUM_LEN);
    r.extend_from_slice(&RECORD_MAGIC);
    r.push(KIND_STATE_CHECKSUM);
    r.push(STATE_CHECKSUM_VERSION);
    r.extend_from_slice(&(STATE_CHECKSUM_LEN as u16).to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.push(Algorithm::Crc32 as u8);
    r.extend_from_slice(&[0; 3]);
    r.extend_from_slice(&state_crc.to_be_bytes());
    r
}

/// Finds the VM-state checksum record in a snapshot's extra-data tail.
///
/// Returns `Ok(None)` for an empty tail, a tail that is not ours (no magic at its start), or
/// one without a checksum record.
///
/// # Errors
/// A malformed record of ours: [`IntegrityError::Truncated`], [`IntegrityError::BadLength`],
/// [`IntegrityError::UnknownAlgorithm`].
pub fn parse_tail(tail: &[u8]) -> Result<Option<StateChecksum>> {
    let Some((offset, rec)) = find_record(tail, KIND_STATE_CHECKSUM)? else {
        return Ok(None);
    };
    if rec.len() < STATE_CHECKSUM_LEN {
        return Err(IntegrityError::BadLength {
            offset,
            record_len: u16::try_from(rec.len()).unwrap_or(u16::MAX),
        });
    }
    let state_len = u64::from_be_bytes(rec[8..16].try_into().unwrap_or_default());
    let algorithm = Algorithm::try_from(rec[16])?;
    let checksum = u32::from_be_bytes(rec[20..24].try_into().unwrap_or_default());
    Ok(Some(StateChecksum {
        state_len,
        algorithm,
        checksum,
    }))
}

/// Walks our records in a snapshot's extra-data tail (each: magic, kind, version, be16 length,
/// body; lengths multiples of 8) and returns the first record of `kind` with a version of 1 or
/// more, as its offset in `tail` and its bytes. `Ok(None)` when the tail holds no records of
/// ours, or none of that kind before bytes that are not ours (padding, another writer's data).
///
/// # Errors
/// A malformed record of ours before it: [`IntegrityError::Truncated`] or
/// [`IntegrityError::BadLength`].
pub(crate) fn find_record(tail: &[u8], kind: u8) -> Result<Option<(usize, &[u8])>> {
    let mut off = 0;
    while off < tail.len() {
        let rest = &tail[off..];
        if rest.len() < HEADER_LEN {
            if off == 0 {
                return Ok(None);
            }
            return Err(IntegrityError::Truncated {
                offset: off,
                len: rest.len(),
            });
        }
        if rest[..4] != RECORD_MAGIC {
            // Not ours (at the start), or padding / another writer's data after our records.
            return Ok(None);
        }
        let (k, version) = (rest[4], rest[5]);
        let record_len = u16::from_be_bytes([rest[6], rest[7]]);
        let n = usize::from(record_len);
        if n < HEADER_LEN || n % 8 != 0 || n > rest.len() {
            return Err(IntegrityError::BadLength {
                offset: off,
                record_len,
            });
        }
        if k == kind && version >= 1 {
            return Ok(Some((off, &rest[..n])));
        }
        off += n;
    }
    Ok(None)
}

/// Checks a computed checksum of `actual_len` bytes against the record.
///
/// # Errors
/// [`IntegrityError::LengthMismatch`] or [`IntegrityError::Mismatch`], naming `snapshot`.
pub fn verify(
    snapshot: &str,
    record: &StateChecksum,
    actual_len: u64,
    actual_crc: u32,
) -> Result<()> {
    if record.state_len != actual_len {
        return Err(IntegrityError::LengthMismatch {
            snapshot: snapshot.to_owned(),
            recorded: record.state_len,
            actual: actual_len,
        });
    }
    if record.checksum != actual_crc {
        return Err(IntegrityError::Mismatch {
            snapshot: snapshot.to_owned(),
            expected: record.checksum,
            actual: actual_crc,
        });
    }
    Ok(())
}

/// What [`verify_snapshot`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// The snapshot has no checksum record (made by QEMU), or no VM state (disk-only; a
    /// record there is ignored).
    NoRecord,
    /// The VM state matches its record.
    Verified(StateChecksum),
}

/// Reads snapshot `id_or_name`'s VM state and checks it against its checksum record.
///
/// # Errors
/// [`IntegrityError::Mismatch`] / [`IntegrityError::LengthMismatch`] naming the snapshot for
/// damaged state, [`IntegrityError::Read`] when it cannot be read, a malformed record, or a
/// missing snapshot.
pub fn verify_snapshot(store: &mut dyn SnapshotStore, id_or_name: &str) -> Result<Verification> {
    verify_snapshot_with_progress(store, id_or_name, &mut |_| {})
}

/// [`verify_snapshot`], reporting the bytes of VM state read so far.
///
/// # Errors
/// As [`verify_snapshot`].
pub fn verify_snapshot_with_progress(
    store: &mut dyn SnapshotStore,
    id_or_name: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<Verification> {
    let list = store.snapshot_list();
    let info = crate::block::blockset::find_snapshot(&list, id_or_name)
        .ok_or_else(|| crate::block::Error::SnapshotNotFound(id_or_name.to_owned()))?
        .clone();
    if info.vm_state_size == 0 {
        // A disk-only entry (or a non-vmstate disk of a multi-disk snapshot, which may carry
        // a copy of the record): nothing to verify.
        return Ok(Verification::NoRecord);
    }
    let tail = store.snapshot_extra_tail(&info.id)?;
    let Some(record) = parse_tail(&tail)? else {
        return Ok(Verification::NoRecord);
    };
    let reader = VmstateReader::for_snapshot(store, &info.id)?;
    let (len, crc) =
        crc_of_with_progress(reader, progress).map_err(|source| IntegrityError::Read {
            snapshot: info.name.clone(),
            source,
        })?;
    verify(&info.name, &record, len, crc)?;
    Ok(Verification::Verified(record))
}

/// One snapshot's outcome in [`verify_all`].
#[derive(Debug)]
pub struct SnapshotIntegrity {
    /// Snapshot id.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// What verification found.
    pub result: Result<Verification>,
}

/// Verifies every snapshot of an image that has VM state, in table order (for `check` and
/// the inspector). Snapshots without a record come back as [`Verification::NoRecord`].
pub fn verify_all(store: &mut dyn SnapshotStore) -> Vec<SnapshotIntegrity> {
    store
        .snapshot_list()
        .into_iter()
        .filter(|s| s.vm_state_size > 0)
        .map(|s| SnapshotIntegrity {
            result: verify_snapshot(store, &s.id),
            id: s.id,
            name: s.name,
        })
        .collect()
}

/// The damaged snapshots of [`verify_all`]'s outcome, as messages naming each one.
pub fn damaged(outcome: &[SnapshotIntegrity]) -> Vec<String> {
    outcome
        .iter()
        .filter_map(|s| s.result.as_ref().err().map(|e| e.to_string()))
        .collect()
}

/// `(name, message)` of every snapshot of the image whose VM state fails its record (for
/// `vmsnap check`).
pub fn damaged_snapshots(store: &mut dyn SnapshotStore) -> Vec<(String, String)> {
    verify_all(store)
        .into_iter()
        .filter_map(|s| s.result.err().map(|e| (s.name, e.to_string())))
        .collect()
}

/// Length and CRC32 of everything `r` yields.
///
/// # Errors
/// The reader's error.
pub fn crc_of<R: std::io::Read>(r: R) -> std::io::Result<(u64, u32)> {
    crc_of_with_progress(r, &mut |_| {})
}

/// [`crc_of`], reporting the running byte count.
///
/// # Errors
/// The reader's error.
pub fn crc_of_with_progress<R: std::io::Read>(
    mut r: R,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<(u64, u32)> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        len += n as u64;
        progress(len);
    }
    Ok((len, h.finalize()))
}

/// A reader that checksums what passes through it.
#[derive(Debug)]
pub struct CrcReader<R> {
    inner: R,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl<R> CrcReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        CrcReader {
            inner,
            hasher: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// Bytes read so far and their CRC32.
    pub fn finish(&self) -> (u64, u32) {
        (self.len, self.hasher.clone().finalize())
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: std::io::Read> std::io::Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// A writer that checksums what passes through it (for savevm: wrap the vmstate writer, then
/// pass [`CrcWriter::finish`]'s values to [`tail_for`]).
#[derive(Debug)]
pub struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl<W> CrcWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        CrcWriter {
            inner,
            hasher: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// Bytes accepted so far and their CRC32.
    pub fn finish(&self) -> (u64, u32) {
        (self.len, self.hasher.clone().finalize())
    }

    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: std::io::Write> std::io::Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_layout_is_as_specified() {
        let t = tail_for(0x0102_0304, 0x1122_3344_5566);
        assert_eq!(
            t,
            [
                b'V', b'S', b'N', b'X', 1, 1, 0, 24, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 1,
                0, 0, 0, 1, 2, 3, 4
            ]
        );
    }

    #[test]
    fn round_trip_and_verify() {
        let data = b"hello vm state";
        let crc = crc32fast::hash(data);
        let rec = parse_tail(&tail_for(crc, data.len() as u64))
            .unwrap()
            .unwrap();
        assert_eq!(rec.algorithm, Algorithm::Crc32);
        verify("s", &rec, data.len() as u64, crc).unwrap();
        let e = verify("s", &rec, data.len() as u64, crc ^ 1).unwrap_err();
        assert!(
            e.to_string().contains("snapshot 's': VM state is damaged"),
            "{e}"
        );
        let e = verify("s", &rec, 3, crc).unwrap_err();
        assert!(matches!(
            e,
            IntegrityError::LengthMismatch {
                recorded: 14,
                actual: 3,
                ..
            }
        ));
    }

    #[test]
    fn foreign_or_empty_tails_have_no_record() {
        assert_eq!(parse_tail(&[]).unwrap(), None);
        assert_eq!(parse_tail(&[0; 8]).unwrap(), None);
        assert_eq!(parse_tail(b"abc").unwrap(), None);
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        let mut t = vec![b'V', b'S', b'N', b'X', 9, 1, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0];
        t.extend(tail_for(7, 8));
        assert_eq!(parse_tail(&t).unwrap().unwrap().checksum, 7);
    }

    #[test]
    fn newer_version_with_longer_record_is_read() {
        let mut t = tail_for(5, 6);
        t[5] = 2;
        t[7] = 32;
        t.extend([0xaa; 8]);
        let r = parse_tail(&t).unwrap().unwrap();
        assert_eq!((r.checksum, r.state_len), (5, 6));
    }

    #[test]
    fn malformed_records_are_errors() {
        let mut t = tail_for(1, 2);
        t[7] = 20;
        assert!(matches!(
            parse_tail(&t),
            Err(IntegrityError::BadLength { record_len: 20, .. })
        ));
        let mut t = tail_for(1, 2);
        t[7] = 64;
        assert!(matches!(
            parse_tail(&t),
            Err(IntegrityError::BadLength { .. })
        ));
        let mut t = tail_for(1, 2);
        t[7] = 16;
        assert!(matches!(
            parse_tail(&t),
            Err(IntegrityError::BadLength { .. })
        ));
        let mut t = tail_for(1, 2);
        t[16] = 0;
        assert!(matches!(
            parse_tail(&t),
            Err(IntegrityError::UnknownAlgorithm(0))
        ));
        let mut t = tail_for(1, 2);
        t.extend(b"VSNX");
        t[5] = 1;
        // A second, truncated record after a complete checksum record is never reached.
        assert!(parse_tail(&t).unwrap().is_some());
        let t = [b'V', b'S', b'N', b'X', 9, 1, 0, 8, b'V', b'S', b'N'];
        assert!(matches!(
            parse_tail(&t),
            Err(IntegrityError::Truncated { offset: 8, len: 3 })
        ));
    }

    #[test]
    fn crc_reader_matches_crc32fast() {
        use std::io::Read;
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut r = CrcReader::new(&data[..]);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        assert_eq!(r.finish(), (data.len() as u64, crc32fast::hash(&data)));
        assert_eq!(crc_of(&data[..]).unwrap(), r.finish());
        use std::io::Write;
        let mut w = CrcWriter::new(Vec::new());
        for c in data.chunks(333) {
            w.write_all(c).unwrap();
        }
        assert_eq!(w.finish(), r.finish());
        assert_eq!(w.into_inner(), data);
    }
}
