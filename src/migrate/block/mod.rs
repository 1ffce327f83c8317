//! Block migration (`migrate -b`): the `vmsnap-block` section carries every writable drive
//! to a destination that has no shared storage — the image's snapshot tree and the active
//! layer, while the guest runs, with the guest's writes resent.
//!
//! ```text
//!  source                                         destination (--incoming, --drive file=NEW)
//!  setup: copy the snapshots (second, read-only   DRIVE: create NEW.vmsnap-incoming
//!         handle; snapshot layers do not change)
//!         into a sparse temp file; track writes
//!  START  DRIVE records                    ──▶
//!  PART   IMAGE pieces of the temp file    ──▶    written into the temporary image
//!         IMAGE_DONE                       ──▶    opened as qcow2 (or raw)
//!         DATA/ZERO chunks of the active   ──▶    written through the driver (copy on
//!         layer, dirty ones again                  write keeps the snapshots intact)
//!  END    the rest, with the guest stopped ──▶    flush, rename to NEW, then activate
//! ```
//!
//! The record layout is in `formats/live-migration.md`, "Disks without shared storage".
//! Hand-written: the section is our own; the snapshot tree is copied by
//! `block::qcow2::copy`.

pub mod recv;
pub mod send;

/// Section name.
pub const IDSTR: &str = "vmsnap-block";
/// Section version.
pub const VERSION: u32 = 1;

/// End of the records of one section.
pub(crate) const REC_EOS: u8 = 0;
/// A drive: be32 index, u8 format (0 raw, 1 qcow2), be64 virtual size, be64 image length.
pub(crate) const REC_DRIVE: u8 = 1;
/// A piece of the snapshot-tree image: be32 index, be64 file offset, be32 length, bytes.
pub(crate) const REC_IMAGE: u8 = 2;
/// The snapshot-tree image is complete: be32 index.
pub(crate) const REC_IMAGE_DONE: u8 = 3;
/// Active-layer data: be32 index, be64 guest offset, be32 length, bytes.
pub(crate) const REC_DATA: u8 = 4;
/// An active-layer range that reads as zeroes: be32 index, be64 guest offset, be32 length.
pub(crate) const REC_ZERO: u8 = 5;

/// Largest IMAGE, DATA or ZERO record payload (QEMU's block-migration chunk).
pub(crate) const MAX_PIECE: u64 = crate::block::dirty::CHUNK;

/// Format byte of a DRIVE record.
pub(crate) fn format_byte(f: crate::block::Format) -> u8 {
    match f {
        crate::block::Format::Raw => 0,
        crate::block::Format::Qcow2 => 1,
    }
}

/// The format a DRIVE record's byte names.
pub(crate) fn byte_format(b: u8) -> Option<crate::block::Format> {
    match b {
        0 => Some(crate::block::Format::Raw),
        1 => Some(crate::block::Format::Qcow2),
        _ => None,
    }
}
