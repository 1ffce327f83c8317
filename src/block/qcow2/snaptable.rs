//! Reading the snapshot table the way QEMU opens it (`qcow2_read_snapshots`).
//!
//! QEMU refuses an image only for what makes the table itself unreadable: an unaligned
//! `snapshots_offset` (even with no snapshots), more than 65536 entries, more than 1024 bytes
//! of extra data in one entry, or a table longer than 64 MiB. Everything else about an entry
//! is taken as it is and judged later, lazily: an L1 table that is unaligned, over 32 MiB or
//! beyond the end of the file is refused when the snapshot is used and reported by `check`
//! ([`Snapshot::l1_problem`]); a table or a name that runs past the end of the file reads the
//! missing bytes as zeroes (QEMU's file driver does the same), and ids and names end at their
//! first NUL byte as QEMU's C strings do. So `info` and `snapshot -l` list what qemu-img lists.
//!
//! Hand-written: the entry layout is QEMU's own and variable-length; no crate parses it.

use byteorder::{BigEndian, ByteOrder};

use super::header::Header;
use super::layout::{MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES};
use super::snapshot::{Snapshot, KNOWN_EXTRA};
use super::Qcow2Error;
use crate::block::storage::Storage;
use crate::block::{Error, Result};

/// Size of the fixed part of an entry.
const ENTRY_HEADER: usize = 40;

fn table_err(offset: u64, reason: String) -> Error {
    Qcow2Error::InvalidTable {
        what: "Snapshot table",
        offset,
        reason,
    }
    .into()
}

/// The table's bytes, read on demand in growing pieces (so a lying header cannot make us
/// allocate more than the entries it really describes), never past QEMU's 64 MiB limit.
struct TableBytes<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    buf: Vec<u8>,
}

impl TableBytes<'_> {
    /// Makes `[0, end)` of the table available; bytes past the end of the file are zero.
    fn need(&mut self, end: usize, entry: u32) -> Result<()> {
        if end as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(table_err(
                self.offset,
                format!("is too big (entry {entry} ends past QEMU's 64 MiB limit)"),
            ));
        }
        if end <= self.buf.len() {
            return Ok(());
        }
        let old = self.buf.len();
        let new_len = (end.max(old * 2).max(4096) as u64).min(MAX_SNAPSHOT_TABLE_BYTES) as usize;
        self.buf.resize(new_len, 0);
        self.storage
            .read_at(self.offset + old as u64, &mut self.buf[old..])
            .map_err(|e| Error::io("Failed to read snapshot table", e))
    }
}

/// A C string's view of `raw`: up to the first NUL, lossily decoded.
fn c_string(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Reads the snapshot table as QEMU does on open. Entries with damaged L1 references are
/// kept (see the module documentation).
///
/// # Errors
/// The refusals QEMU makes on open, and I/O errors.
pub(crate) fn read_table(
    storage: &dyn Storage,
    h: &Header,
    _file_len: u64,
) -> Result<Vec<Snapshot>> {
    let cs = 1u64 << h.cluster_bits;
    // qcow2_validate_table: checked whether or not there are snapshots.
    let min_bytes = u64::from(h.nb_snapshots) * ENTRY_HEADER as u64;
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(table_err(
            h.snapshots_offset,
            format!(
                "too large ({} entries, limit {MAX_SNAPSHOTS})",
                h.nb_snapshots
            ),
        ));
    }
    if h.snapshots_offset % cs != 0 || h.snapshots_offset > i64::MAX as u64 - min_bytes {
        return Err(table_err(h.snapshots_offset, "offset invalid".into()));
    }
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let mut t = TableBytes {
        storage,
        offset: h.snapshots_offset,
        buf: Vec::new(),
    };
    let mut out = Vec::with_capacity(h.nb_snapshots.min(1024) as usize);
    let mut pos = 0usize;
    for i in 0..h.nb_snapshots {
        t.need(pos + ENTRY_HEADER, i)?;
        let e = &t.buf[pos..pos + ENTRY_HEADER];
        let l1_table_offset = BigEndian::read_u64(&e[0..]);
        let l1_size = BigEndian::read_u32(&e[8..]);
        let id_len = BigEndian::read_u16(&e[12..]) as usize;
        let name_len = BigEndian::read_u16(&e[14..]) as usize;
        let date_sec = BigEndian::read_u32(&e[16..]);
        let date_nsec = BigEndian::read_u32(&e[20..]);
        let vm_clock_nsec = BigEndian::read_u64(&e[24..]);
        let vm_state_32 = BigEndian::read_u32(&e[32..]);
        let extra_data_size = BigEndian::read_u32(&e[36..]);
        if extra_data_size > MAX_SNAPSHOT_EXTRA {
            return Err(table_err(
                h.snapshots_offset + pos as u64,
                format!("Too much extra metadata in snapshot table entry {i} ({extra_data_size} > {MAX_SNAPSHOT_EXTRA} bytes)"),
            ));
        }
        let extra_size = extra_data_size as usize;
        let unpadded = ENTRY_HEADER + extra_size + id_len + name_len;
        t.need(pos + unpadded, i)?;
        let extra = &t.buf[pos + ENTRY_HEADER..pos + ENTRY_HEADER + extra_size];
        let field = |at: usize| (extra.len() >= at + 8).then(|| BigEndian::read_u64(&extra[at..]));
        let ids = pos + ENTRY_HEADER + extra_size;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: c_string(&t.buf[ids..ids + id_len]),
            name: c_string(&t.buf[ids + id_len..ids + id_len + name_len]),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size: field(0).unwrap_or(u64::from(vm_state_32)),
            disk_size: field(8).unwrap_or(h.size),
            icount: field(16).unwrap_or(u64::MAX),
            unknown_extra: extra.get(KNOWN_EXTRA..).unwrap_or(&[]).to_vec(),
            entry_offset: h.snapshots_offset + pos as u64,
            entry_len: unpadded.div_ceil(8) as u64 * 8,
            unpadded_len: unpadded as u64,
            extra_data_size,
        });
        pos += unpadded.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Bytes the table occupies as QEMU counts them (`snapshots_size`): up to the unpadded end
/// of the last entry.
pub(crate) fn table_size(snapshots: &[Snapshot], snapshots_offset: u64) -> u64 {
    snapshots.last().map_or(0, |s| {
        (s.entry_offset + s.unpadded_len).saturating_sub(snapshots_offset)
    })
}
