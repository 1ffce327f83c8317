//! The work of QMP's snapshot jobs (`snapshot-save`, `snapshot-load`, `snapshot-delete`,
//! QEMU 6.0+): the `devices` and `vmstate` node names checked in QEMU's order and with its
//! messages, then the snapshot layer's savevm / loadvm / delvm.
//!
//! vmsnap's snapshot layer acts on every writable drive with the VM state on the first, as
//! HMP's savevm does; a job naming another set (a subset, or the VM state elsewhere) fails
//! with a message saying so rather than silently acting on more drives than asked.

use crate::snapshot::{self, SaveOptions};
use crate::vmm::VmStatus;

use super::{events, savevm::MIGRATION_ACTIVE, Cx};

/// What a snapshot job acts on.
#[derive(Debug, Clone)]
pub struct Target {
    /// The tag.
    pub tag: String,
    /// Node names of the devices.
    pub devices: Vec<String>,
    /// Node name of the device that gets the VM state (save and load).
    pub vmstate: Option<String>,
    /// A save keeps the guest running while its RAM is written (vmsnap's live savevm,
    /// `x-vmsnap-snapshot-save-live`).
    pub live: bool,
    /// How a load brings RAM in (`x-vmsnap-snapshot-load`'s `mode`; lazy by default).
    pub mode: snapshot::lazy::LoadMode,
}

/// Which job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `snapshot-save`.
    Save,
    /// `snapshot-load`.
    Load,
    /// `snapshot-delete`.
    Delete,
}

/// One drive as the checks see it.
struct Drive {
    node: String,
    writable: bool,
    capable: bool,
    has_tag: bool,
}

fn drives(cx: Cx<'_>, tag: &str) -> Vec<Drive> {
    cx.vm.with_block_set(|set| {
        set.devices
            .iter_mut()
            .enumerate()
            .map(|(i, d)| {
                let writable = !d.driver.is_read_only();
                let store = d.driver.snapshots();
                let capable = store.is_some();
                let has_tag =
                    store.is_some_and(|s| snapshot::disks::find(&s.snapshot_list(), tag).is_some());
                Drive {
                    node: super::node_name(cx.nodes, i),
                    writable,
                    capable,
                    has_tag,
                }
            })
            .collect()
    })
}

/// QEMU's checks of the job's arguments, in its order; returns the drive indexes.
fn check(cx: Cx<'_>, kind: Kind, t: &Target) -> Result<Vec<usize>, String> {
    let all = drives(cx, &t.tag);
    if t.devices.is_empty() {
        return Err("At least one device is required for snapshot".to_string());
    }
    let mut chosen = Vec::with_capacity(t.devices.len());
    for name in &t.devices {
        let i = all
            .iter()
            .position(|d| &d.node == name)
            .ok_or_else(|| format!("No block device node '{name}'"))?;
        chosen.push(i);
    }
    for &i in &chosen {
        if all[i].writable && !all[i].capable {
            return Err(format!(
                "Device '{}' is writable but does not support snapshots",
                all[i].node
            ));
        }
    }
    match kind {
        Kind::Save if chosen.iter().any(|&i| all[i].has_tag) => {
            return Err(format!(
                "Snapshot '{}' already exists in one or more devices",
                t.tag
            ))
        }
        Kind::Load if chosen.iter().any(|&i| !all[i].has_tag) => {
            return Err(format!(
                "Snapshot '{}' does not exist in one or more devices",
                t.tag
            ))
        }
        _ => {}
    }
    if let Some(v) = &t.vmstate {
        let vi = all
            .iter()
            .position(|d| &d.node == v)
            .ok_or_else(|| format!("vmstate block device '{v}' does not exist"))?;
        if !chosen.contains(&vi) {
            return Err(format!(
                "vmstate block device '{v}' does not exist in the device list"
            ));
        }
    }
    // What the snapshot layer will act on: every writable drive that is not captured.
    let captured = cx.vm.captured_drives();
    let layer: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].writable && !captured.contains(&i))
        .collect();
    let mut sorted = chosen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let first = layer.first().map(|&i| all[i].node.clone());
    let vm_first = t.vmstate.is_none() || t.vmstate == first;
    if sorted != layer || !vm_first {
        return Err(format!(
            "vmsnap: snapshot jobs act on every writable drive ({}) with the VM state on \
             the first ('{}')",
            layer
                .iter()
                .map(|&i| format!("'{}'", all[i].node))
                .collect::<Vec<_>>()
                .join(", "),
            first.unwrap_or_default()
        ));
    }
    Ok(chosen)
}

/// Refuses while a migration runs or hands the drives over.
fn migration_free(cx: Cx<'_>) -> Result<(), String> {
    if cx.mig.is_active() {
        return Err(MIGRATION_ACTIVE.to_string());
    }
    if cx.mig.drives_inactive() {
        return Err(crate::migrate::CommandError::Inactive.to_string());
    }
    Ok(())
}

/// Runs a snapshot job's work: the error text is what `query-jobs` shows. A save checks
/// its arguments before stopping the VM; a load stops it first and leaves it stopped
/// (`restore-vm`) when anything fails, as QEMU does.
pub fn work(cx: Cx<'_>, kind: Kind, t: &Target) -> Result<(), String> {
    let vm = cx.vm;
    let ready = || -> Result<(), String> {
        check(cx, kind, t)?;
        migration_free(cx)?;
        snapshot::lazy::settle(vm).map_err(|e| e.to_string())
    };
    if kind == Kind::Delete {
        ready()?;
        return snapshot::delvm(vm, &t.tag).map_err(|e| e.to_string());
    }
    if kind == Kind::Save {
        ready()?;
    }
    if t.live {
        // The guest runs on; its final stop is reported by the QMP poller.
        events::hold(false);
        return super::savevm::savevm(cx, Some(&t.tag), true, &mut |_| {})
            .map(|_| ())
            .map_err(|e| e.trim_start_matches("Error: ").to_string());
    }
    let was_running = vm.status() == VmStatus::Running;
    vm.pause().map_err(|e| e.to_string())?;
    events::note_running(false);
    let r = match kind {
        Kind::Save => {
            let opts = SaveOptions {
                lz4: cx.mig.capabilities().lz4(),
            };
            snapshot::savevm_with_options(vm, Some(&t.tag), &opts, &mut |_| {})
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        _ => ready().and_then(|()| {
            let paths = super::drive_paths(cx.mig.drives().iter().map(|d| (&d.path, d.format)));
            snapshot::lazy::loadvm(vm, &t.tag, t.mode, &paths, &mut |_| {})
                .map_err(|e| e.to_string())
        }),
    };
    match &r {
        Err(_) if kind == Kind::Load => vm.set_pause_reason(Some("restore-vm")),
        _ if was_running => {
            vm.resume();
            events::note_running(true);
        }
        _ => {}
    }
    r
}
