//! savevm / loadvm / delvm of a running [`Vm`] into its disk images, with QEMU's steps and
//! messages.
//!
//! ```text
//!  savevm TAG: stop → flush disks → capture → [disks] check all can snapshot → read the
//!              capture=on drives → delete TAG
//!              everywhere → stream into the vmstate area of the first disk → create TAG on
//!              every disk (VM state size on the first, 0 elsewhere; rolled back on failure;
//!              the qcow2 driver discards the vmstate from the active layer) → resume
//!  loadvm TAG: stop → [disks] check all can snapshot → TAG on every disk → VM state on the
//!              first (else disk-only) → pass 1: read the whole stream once, checksum it
//!              against the integrity record and parse it as a load would, skipping RAM
//!              page data → goto on every disk → captured drives' contents written back →
//!              pass 2: RAM read straight into guest memory → device states → resume
//!
//! `capture=on` raw drives (see [`capture`]) are left out of the disk steps; savevm reads
//! their contents into `vmsnap-capture` sections of the stream.
//! ```
//!
//! Checking the whole stream before the goto means that a bad request (unknown tag, corrupted
//! or foreign VM state) changes nothing and the VM goes on as it was, without a second
//! RAM-sized buffer: pass 2 reads the same bytes of the locked image, so only an I/O error
//! can stop it.

pub mod capture;
pub mod disks;
pub mod lazy;
pub mod lazy_index;
mod lazy_pages;
pub mod list;
pub mod live;
pub mod progress;
pub mod save_info;
pub mod state_io;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::block::vmstate_io::{VmstateReader, VmstateSource};
use crate::block::{self, BlockSet, SnapshotInfo, SnapshotParams};
use crate::interop::integrity::{self, CrcReader};
use crate::vmm::{Vm, VmError, VmState, VmStatus};
use progress::Counting;
pub use progress::{Progress, ProgressFn};
use state_io::StateIoError;

/// Errors of savevm / loadvm / delvm; the texts are QEMU's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot's VM state does not match the checksum vmsnap stored with it.
    #[error("Refusing to load snapshot '{tag}': {source}")]
    Damaged {
        /// The tag.
        tag: String,
        /// What the verification found.
        #[source]
        source: crate::interop::integrity::IntegrityError,
    },
    /// A writable disk's format keeps no snapshots.
    #[error("Device '{0}' is writable but does not support snapshots")]
    NotCapable(String),
    /// No disk can hold the snapshot.
    #[error("No block device can accept snapshots")]
    NoDevice,
    /// loadvm of a tag some disk lacks.
    #[error("Snapshot '{0}' does not exist in one or more devices")]
    Missing(String),
    /// loadvm of a snapshot without VM state.
    #[error("This is a disk-only snapshot. Revert to it offline using qemu-img")]
    DiskOnly,
    /// The VM state could not be written.
    #[error("Error while writing VM state: {0}")]
    Save(#[source] StateIoError),
    /// The VM state could not be read or does not fit this VM.
    #[error("Error -22 while loading VM state: {0}")]
    Load(#[source] StateIoError),
    /// Creating the snapshot on a disk failed (the others were rolled back).
    #[error("Error while creating snapshot on '{device}': {source}")]
    Create {
        /// The disk.
        device: String,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// Deleting a snapshot failed.
    #[error("Could not delete snapshot '{tag}' on '{device}': {source}")]
    Delete {
        /// The tag.
        tag: String,
        /// The disk.
        device: String,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// Reverting a disk failed.
    #[error("Could not load snapshot '{tag}' on '{device}': {source}")]
    Goto {
        /// The tag.
        tag: String,
        /// The disk.
        device: String,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// Flushing the disks failed.
    #[error("Error flushing the disks: {0}")]
    Flush(#[source] block::Error),
    /// Reading the snapshot's VM state failed at the block layer.
    #[error("Could not read the VM state of snapshot '{tag}': {source}")]
    Read {
        /// The tag.
        tag: String,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// A `capture=on` drive could not be saved or written back.
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    /// The VMM refused.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// loadvm failed after guest RAM was partly overwritten (an I/O error in the second
    /// pass, or the VMM refusing the checked state): the VM stays stopped, as QEMU leaves it.
    #[error("{0}; the VM stays stopped")]
    LoadIncomplete(#[source] Box<SnapshotError>),
    /// The VM is stopped on a vCPU error.
    #[error("the VM stopped on an error ({0}); no snapshot operation is possible")]
    Failed(String),
}

/// Result of snapshot operations.
pub type Result<T> = std::result::Result<T, SnapshotError>;

/// Pauses the VM if it runs; returns whether it did.
fn stop(vm: &Vm) -> Result<bool> {
    match vm.status() {
        VmStatus::Failed(why) => Err(SnapshotError::Failed(why)),
        VmStatus::Running => {
            vm.pause()?;
            Ok(true)
        }
        VmStatus::Paused => {
            // Parks any vCPU still on its way (pause is idempotent).
            vm.pause()?;
            Ok(false)
        }
    }
}

/// Runs `f` with the VM stopped, resuming it afterwards if it was running, whatever `f`
/// returned.
fn stopped<T>(vm: &Vm, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let was_running = stop(vm)?;
    let r = f();
    if was_running && !matches!(r, Err(SnapshotError::LoadIncomplete(_))) {
        vm.resume();
    }
    r
}

/// QEMU's default savevm name: `vm-YYYYMMDDHHMMSS` (UTC here).
pub fn default_name(now_secs: u64) -> String {
    let d = list::date(now_secs);
    let digits: String = d.chars().filter(char::is_ascii_digit).collect();
    format!("vm-{digits}")
}

/// `savevm [TAG]`: saves the VM state and a snapshot of every disk under `tag` (replacing
/// one of the same name). Returns the entry created on the VM-state disk.
pub fn savevm(vm: &Vm, tag: Option<&str>) -> Result<SnapshotInfo> {
    savevm_with_progress(vm, tag, &mut |_| {})
}

/// [`savevm`], reporting the bytes written to `progress` every few MiB.
pub fn savevm_with_progress(
    vm: &Vm,
    tag: Option<&str>,
    progress: ProgressFn<'_>,
) -> Result<SnapshotInfo> {
    savevm_with_options(vm, tag, &SaveOptions::default(), progress)
}

/// How savevm encodes the VM state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveOptions {
    /// RAM pages LZ4-compressed (the `x-vmsnap-lz4` migration capability): a smaller state
    /// that only vmsnap can load.
    pub lz4: bool,
}

/// [`savevm_with_progress`] with encoding options.
pub fn savevm_with_options(
    vm: &Vm,
    tag: Option<&str>,
    opts: &SaveOptions,
    progress: ProgressFn<'_>,
) -> Result<SnapshotInfo> {
    stopped(vm, || {
        vm.flush_drives().map_err(SnapshotError::Flush)?;
        let state = vm.save_state()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = tag
            .map(str::to_string)
            .unwrap_or_else(|| default_name(now.as_secs()));
        let captured = vm.captured_drives();
        vm.with_block_set(|set| {
            let inc = disks::included(set, &captured)?;
            // Space freed by replacing a snapshot of the same tag is where the new state
            // goes: punch only what is still free at the end (see SnapshotStore::begin_discards).
            for &i in &inc {
                disks::store(set, i)?.1.begin_discards();
            }
            let r = save_replacing(vm, set, &inc, &captured, &state, &name, now, opts, progress);
            for &i in &inc {
                let (device, store) = disks::store(set, i)?;
                let ended = store.end_discards(r.is_ok());
                if r.is_ok() {
                    ended.map_err(|source| SnapshotError::Create {
                        device: device.to_string(),
                        source,
                    })?;
                }
            }
            r
        })
    })
}

/// The steps of savevm once the VM is stopped: drop a snapshot of the same tag, write the
/// state into the first disk's vmstate area, create the snapshot on every disk.
#[allow(clippy::too_many_arguments)]
fn save_replacing(
    vm: &Vm,
    set: &mut BlockSet,
    inc: &[usize],
    captured: &[usize],
    state: &VmState,
    name: &str,
    now: Duration,
    opts: &SaveOptions,
    progress: ProgressFn<'_>,
) -> Result<SnapshotInfo> {
    let contents = capture::read_all(set, captured)?;
    disks::delete(set, inc, name)?;
    crate::killpoint::at("savevm:old-tag-deleted");
    // The state is checksummed as it streams and its RAM pages indexed; both records go
    // into the snapshot entry's extra data (formats/snapshot-integrity.md,
    // formats/lazy-loadvm.md).
    let saved = {
        let (_, store) = disks::store(set, inc[0])?;
        let total = vm.ram().len() as u64;
        store
            .vmstate_reserve(state_size_hint(total))
            .map_err(|e| SnapshotError::Save(StateIoError::Io(std::io::Error::other(e))))?;
        lazy_index::write(store, state, vm.ram(), &contents, opts.lz4, progress)
            .map_err(SnapshotError::Save)?
    };
    crate::killpoint::at("savevm:state-written");
    let params = SnapshotParams {
        name: name.to_string(),
        vm_state_size: saved.size,
        date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: state.arch.clock.clock,
        icount: None,
        extra_tail: saved.extra_tail,
    };
    let info = disks::create(set, inc, &params)?;
    crate::killpoint::at("savevm:created");
    Ok(info)
}

/// About how large the VM state of a guest with `ram` bytes of RAM gets: every page with its
/// 8-byte record header, and room for the device sections.
fn state_size_hint(ram: u64) -> u64 {
    ram.saturating_add(ram / 4096 * 8).saturating_add(1 << 20)
}

/// `loadvm TAG`: reverts every disk to `tag` and the VM to its saved state. Bad requests
/// (unknown tag, disk-only snapshot, unreadable or foreign VM state) leave everything as it
/// was.
pub fn loadvm(vm: &Vm, tag: &str) -> Result<()> {
    loadvm_with_progress(vm, tag, &mut |_| {})
}

/// [`loadvm`], reporting the bytes read to `progress` every few MiB (both passes: the
/// total is twice the VM state size).
pub fn loadvm_with_progress(vm: &Vm, tag: &str, progress: ProgressFn<'_>) -> Result<()> {
    stopped(vm, || {
        let (vcpus, drives) = (vm.vcpu_count(), vm.drive_count());
        let ram_len = vm.ram().len() as u64;
        let captured = vm.captured_drives();
        let state = vm.with_block_set(|set| {
            let inc = disks::included(set, &captured)?;
            let specs = capture::specs(set, &captured)?;
            if !disks::has_snapshot(set, &inc, tag)? {
                return Err(SnapshotError::Missing(tag.to_string()));
            }
            let (_, store) = disks::store(set, inc[0])?;
            let info = disks::find(&store.snapshot_list(), tag)
                .ok_or_else(|| SnapshotError::Missing(tag.to_string()))?;
            if info.vm_state_size == 0 {
                return Err(SnapshotError::DiskOnly);
            }
            let total = info.vm_state_size.saturating_mul(2);
            let shape = Shape {
                vcpus,
                drives,
                specs: &specs,
                ram_len,
            };
            // Pass 1: nothing changes unless the whole stream checks out.
            let checked = check_pass(store, &info, tag, &shape, total, progress)?;
            crate::killpoint::at("loadvm:checked");
            disks::goto(set, &inc, tag)?;
            crate::killpoint::at("loadvm:reverted");
            capture::write_back(set, &specs, &checked.captured)?;
            // Pass 2: RAM straight into guest memory, from the snapshot's own VM state (the
            // goto gives the active layer the disk part only). The bytes are those pass 1
            // checked (the image is locked and nothing wrote it since), so only an I/O error
            // can stop it half-way; the VM then stays stopped (`LoadIncomplete`).
            let (_, store) = disks::store(set, inc[0])?;
            let source = VmstateSource::Snapshot(info.id.clone());
            let r = VmstateReader::new(store, source, info.vm_state_size);
            let mut r = Counting::continuing(r, info.vm_state_size, total, progress);
            let incomplete = |e: SnapshotError| SnapshotError::LoadIncomplete(Box::new(e));
            vm.with_ram_mut(|mem| {
                if !checked.all_ram {
                    // Pages the stream lacks read as zero, as in a fresh VM.
                    mem.fill(0);
                }
                state_io::read_state_with(vcpus, drives, &specs, mem, &mut r)
            })?
            .map_err(|e| incomplete(SnapshotError::Load(e)))?;
            Ok(checked.state)
        })?;
        vm.restore_state(&state)
            .map_err(|e| SnapshotError::LoadIncomplete(Box::new(e.into())))?;
        Ok(())
    })
}

/// What the VM state must fit.
struct Shape<'a> {
    vcpus: usize,
    drives: usize,
    specs: &'a [state_io::CaptureSpec],
    ram_len: u64,
}

/// loadvm's first pass: reads snapshot `info`'s whole VM state once, checksumming it
/// against vmsnap's integrity record when there is one and parsing it as a load would
/// (RAM pages bounds-checked and skipped). A damaged state (checksum mismatch) is reported
/// as such even when it also fails to parse.
fn check_pass(
    store: &mut dyn block::SnapshotStore,
    info: &SnapshotInfo,
    tag: &str,
    shape: &Shape<'_>,
    total: u64,
    progress: ProgressFn<'_>,
) -> Result<state_io::CheckedState> {
    let damaged = |source| SnapshotError::Damaged {
        tag: tag.to_string(),
        source,
    };
    let tail = store
        .snapshot_extra_tail(&info.id)
        .map_err(|source| damaged(source.into()))?;
    let record = integrity::parse_tail(&tail).map_err(damaged)?;
    let r = VmstateReader::for_snapshot(store, &info.id).map_err(|source| SnapshotError::Read {
        tag: tag.to_string(),
        source,
    })?;
    let mut r = CrcReader::new(Counting::new(r, total, progress));
    let parsed = state_io::check_state_with(
        shape.vcpus,
        shape.drives,
        shape.specs,
        shape.ram_len,
        &mut r,
    );
    if let Some(record) = record {
        // The checksum covers the whole state, also what the parser did not need.
        std::io::copy(&mut r, &mut std::io::sink())
            .map_err(|e| SnapshotError::Load(StateIoError::Io(e)))?;
        let (len, crc) = r.finish();
        integrity::verify(&info.name, &record, len, crc).map_err(damaged)?;
    }
    parsed.map_err(SnapshotError::Load)
}

/// `delvm TAG`: deletes `tag` from every disk that has it.
pub fn delvm(vm: &Vm, tag: &str) -> Result<()> {
    let captured = vm.captured_drives();
    stopped(vm, || {
        vm.with_block_set(|set| {
            let inc = disks::included(set, &captured)?;
            disks::delete(set, &inc, tag)
        })
    })
}

/// `info snapshots`: QEMU's listing of the snapshots on the VM's disks.
pub fn info_snapshots(vm: &Vm) -> Result<String> {
    let captured = vm.captured_drives();
    stopped(vm, || {
        vm.with_block_set(|set| {
            let inc = disks::included(set, &captured)?;
            let mut all = Vec::with_capacity(inc.len());
            for &i in &inc {
                let (name, store) = disks::store(set, i)?;
                all.push((name.to_string(), store.snapshot_list()));
            }
            Ok(list::info_snapshots(&all))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_look_like_qemu() {
        assert_eq!(default_name(1_700_000_000), "vm-20231114221320");
    }

    #[test]
    fn messages_are_qemu_s() {
        assert_eq!(
            SnapshotError::NotCapable("drive1".into()).to_string(),
            "Device 'drive1' is writable but does not support snapshots"
        );
        assert_eq!(
            SnapshotError::Missing("t".into()).to_string(),
            "Snapshot 't' does not exist in one or more devices"
        );
        assert_eq!(
            SnapshotError::DiskOnly.to_string(),
            "This is a disk-only snapshot. Revert to it offline using qemu-img"
        );
    }
}
