//! QEMU's `bdrv_all_*` over the disks of one VM: which disks take part, all-or-nothing
//! create, goto and delete.
//!
//! Included disks are the writable ones (QEMU skips read-only and empty drives), except
//! `capture=on` drives, whose contents travel in the VM state instead. A writable disk whose
//! format keeps no snapshots makes every operation fail, naming it. The VM state goes to the
//! first included disk.

use crate::block::{BlockSet, SnapshotInfo, SnapshotParams, SnapshotStore};

use super::SnapshotError;

/// Indexes into `set.devices` of the included disks, after checking that each can keep
/// snapshots (QEMU's `bdrv_all_can_snapshot`); the `captured` ones are left out. Fails if
/// there is none.
pub fn included(set: &mut BlockSet, captured: &[usize]) -> Result<Vec<usize>, SnapshotError> {
    let mut out = Vec::new();
    for (i, d) in set.devices.iter_mut().enumerate() {
        if d.driver.is_read_only() || captured.contains(&i) {
            continue;
        }
        if d.driver.snapshots().is_none() {
            return Err(SnapshotError::NotCapable(d.name.clone()));
        }
        out.push(i);
    }
    if out.is_empty() {
        return Err(SnapshotError::NoDevice);
    }
    Ok(out)
}

/// The snapshot interface of device `i` (checked by [`included`]).
pub fn store(
    set: &mut BlockSet,
    i: usize,
) -> Result<(&str, &mut dyn SnapshotStore), SnapshotError> {
    let d = set.devices.get_mut(i).ok_or(SnapshotError::NoDevice)?;
    let name = d.name.as_str();
    match d.driver.snapshots() {
        Some(s) => Ok((name, s)),
        None => Err(SnapshotError::NotCapable(name.to_string())),
    }
}

/// Finds a snapshot by id, then by name (QEMU's `bdrv_snapshot_find`).
pub fn find(list: &[SnapshotInfo], tag: &str) -> Option<SnapshotInfo> {
    list.iter()
        .find(|s| s.id == tag)
        .or_else(|| list.iter().find(|s| s.name == tag))
        .cloned()
}

/// True if every included disk has `tag` (QEMU's `bdrv_all_has_snapshot`).
pub fn has_snapshot(set: &mut BlockSet, inc: &[usize], tag: &str) -> Result<bool, SnapshotError> {
    for &i in inc {
        let (_, s) = store(set, i)?;
        if find(&s.snapshot_list(), tag).is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes `tag` from every included disk that has it (QEMU's `bdrv_all_delete_snapshot`).
pub fn delete(set: &mut BlockSet, inc: &[usize], tag: &str) -> Result<(), SnapshotError> {
    for &i in inc {
        let (name, s) = store(set, i)?;
        while find(&s.snapshot_list(), tag).is_some() {
            s.snapshot_delete(tag)
                .map_err(|source| SnapshotError::Delete {
                    tag: tag.to_string(),
                    device: name.to_string(),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Creates the snapshot on every included disk, the VM state size on the first only; on a
/// failure, deletes the snapshots already created (QEMU's `bdrv_all_create_snapshot`).
pub fn create(
    set: &mut BlockSet,
    inc: &[usize],
    params: &SnapshotParams,
) -> Result<SnapshotInfo, SnapshotError> {
    let mut first = None;
    for (k, &i) in inc.iter().enumerate() {
        let mut p = params.clone();
        if k > 0 {
            p.vm_state_size = 0;
        }
        let (name, s) = store(set, i)?;
        match s.snapshot_create(&p) {
            Ok(info) => {
                first.get_or_insert(info);
            }
            Err(source) => {
                let err = SnapshotError::Create {
                    device: name.to_string(),
                    source,
                };
                for &j in &inc[..k] {
                    if let Ok((_, s)) = store(set, j) {
                        // Best effort: the error reported is the creation failure.
                        let _ = s.snapshot_delete(&params.name);
                    }
                }
                return Err(err);
            }
        }
    }
    first.ok_or(SnapshotError::NoDevice)
}

/// Reverts every included disk to `tag` (QEMU's `bdrv_all_goto_snapshot`).
pub fn goto(set: &mut BlockSet, inc: &[usize], tag: &str) -> Result<(), SnapshotError> {
    for &i in inc {
        let (name, s) = store(set, i)?;
        s.snapshot_goto(tag).map_err(|source| SnapshotError::Goto {
            tag: tag.to_string(),
            device: name.to_string(),
            source,
        })?;
    }
    Ok(())
}
