//! Lazy loadvm: the guest resumes once the device state is loaded, and its RAM is filled
//! from the snapshot on first touch and by a background pass (`vmm::page_server`).
//!
//! ```text
//!  loadvm TAG (lazy):  stop → [disks] TAG on every disk, VM state on the first →
//!     extra data: kind-1 checksum + kind-2 page index record (else: eager loadvm) →
//!     stream [0, setup_end) + [ram_end_section, end) parsed as a load would (devices,
//!     captured drives; RAM pages there skipped) → goto on every disk → captured drives
//!     written back → guest RAM dropped and served from the snapshot
//!     (`lazy_pages::SnapshotPages`, index chunks read as faults need them) → device
//!     states → resume; none of it grows with RAM
//!  background:  the index read whole and its CRC-32 compared with the record, then the
//!     whole stream read once in order: pages installed where not resident yet, CRC-32
//!     compared with the kind-1 record at the end; a mismatch or read error stops the VM
//!     ("failed"), naming the snapshot
//! ```
//!
//! Pages come from a second, read-only and lock-free open of the image that holds the VM
//! state, read through the snapshot's own L1 table: the fault handler never waits for the
//! VM's block devices (a vCPU doing disk I/O may hold them while touching a missing page),
//! and the snapshot's clusters cannot change while it exists. While a fill runs, every
//! snapshot or migration command first waits for it ([`settle`]), so no `delvm` or
//! `savevm` frees those clusters under the reader; other processes are kept out by the
//! image lock the VM holds.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::block::{Format, SnapshotInfo, SnapshotStore};
use crate::interop::integrity::{self, IntegrityError, StateChecksum};
use crate::interop::page_index_record::PageIndexRecord;
use crate::vmm::page_server::{FillStatus, LoadState};
use crate::vmm::Vm;

use super::lazy_pages::{IndexAt, SnapshotPages};
use super::progress::ProgressFn;
use super::state_io::{self, StateIoError, PAGE_SIZE};
use super::{capture, disks, Result, SnapshotError};

/// How loadvm brings RAM in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadMode {
    /// Resume first, fill RAM on demand and in the background (needs the snapshot's page
    /// index; without one the load is eager).
    #[default]
    Lazy,
    /// Read all of RAM, then resume.
    Eager,
}

impl std::str::FromStr for LoadMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lazy" => Ok(LoadMode::Lazy),
            "eager" => Ok(LoadMode::Eager),
            _ => Err(format!("unknown loadvm mode '{s}' (eager or lazy)")),
        }
    }
}

/// An image path as `vmsnap run --drive` opened it, for the page source's own open.
#[derive(Debug, Clone)]
pub struct DrivePath {
    /// The image.
    pub path: PathBuf,
    /// Its format, if forced.
    pub format: Option<Format>,
}

/// The last loadvm's mode and tag, for `info loadvm`.
static LAST: Mutex<Option<(String, &'static str)>> = Mutex::new(None);

fn set_last(tag: &str, mode: &'static str) {
    *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some((tag.to_string(), mode));
}

/// `loadvm TAG` in `mode`. `drives` are the VM's drive paths in `--drive` order (a lazy
/// load opens the VM-state image once more, read-only); without them the load is eager.
pub fn loadvm(
    vm: &Vm,
    tag: &str,
    mode: LoadMode,
    drives: &[DrivePath],
    progress: ProgressFn<'_>,
) -> Result<()> {
    let started = Instant::now();
    settle(vm)?;
    if mode == LoadMode::Lazy && !drives.is_empty() {
        let lazy = super::stopped(vm, || load_lazily(vm, tag, drives, started))?;
        if lazy {
            crate::killpoint::at("loadvm-lazy:resumed");
            set_last(tag, "lazy");
            return Ok(());
        }
    }
    super::loadvm_with_progress(vm, tag, progress)?;
    let pages = vm.ram().len() as u64 / PAGE_SIZE;
    vm.record_ram_load(Arc::new(FillStatus::completed(
        pages,
        started,
        started.elapsed(),
    )));
    set_last(tag, "eager");
    Ok(())
}

/// Waits for a lazy load still filling RAM (commands that save RAM, move it, or change the
/// snapshots under the reader call this first). Fails if that load failed.
pub fn settle(vm: &Vm) -> Result<()> {
    if vm.lazy_ram_active() {
        let tag = LAST
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        eprintln!(
            "vmsnap: snapshot '{tag}' is still being loaded lazily: finishing its fill first"
        );
    }
    match vm.finish_lazy_ram() {
        Some(LoadState::Failed(why)) => Err(SnapshotError::Failed(why)),
        _ => Ok(()),
    }
}

/// `info loadvm`: the last load's status, pages resident/total, time to resume and total
/// time.
pub fn info_loadvm(vm: &Vm) -> String {
    let Some(r) = vm.ram_load_report() else {
        return "No loadvm has run".to_string();
    };
    let (tag, mode) = LAST
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default();
    let ms = |d: std::time::Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let mut out = format!(
        "status: {}\nsnapshot: {tag}\nmode: {mode}\npages resident: {}/{}\ntime to resume: {}\ntotal time: {}",
        r.state.word(),
        r.resident,
        r.total,
        r.resume_time.map(ms).unwrap_or_else(|| "-".into()),
        ms(r.total_time),
    );
    if let LoadState::Failed(why) = &r.state {
        out.push_str(&format!("\nerror: {why}"));
    }
    out
}

/// What a lazy load needs, found and checked before anything changes.
struct Plan {
    checksum: StateChecksum,
    info: SnapshotInfo,
    checked: state_io::CheckedState,
}

/// The lazy steps once the VM is stopped. `Ok(false)`: the snapshot has no page index
/// (nothing changed; load it eagerly).
fn load_lazily(vm: &Vm, tag: &str, drives: &[DrivePath], started: Instant) -> Result<bool> {
    let (vcpus, ndrives) = (vm.vcpu_count(), vm.drive_count());
    let ram_len = vm.ram().len() as u64;
    let captured = vm.captured_drives();
    let found = vm.with_block_set(|set| -> Result<Option<(Plan, Arc<SnapshotPages>)>> {
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
        let Some((plan, index)) = plan(store, info, tag, ram_len, |r| {
            state_io::check_state_with(vcpus, ndrives, &specs, ram_len, r)
        })?
        else {
            return Ok(None);
        };
        // The page source opens the image a second time; on an NBD export that open shares
        // the drive's connection (`block::storage::nbd_shared`), as the server may serve one
        // client only.
        let Some(drive) = drives.get(inc[0]) else {
            return Ok(None);
        };
        let pages = Arc::new(SnapshotPages::open(
            drive,
            tag,
            &plan.info.id,
            plan.info.vm_state_size,
            plan.checksum,
            index,
        )?);
        crate::killpoint::at("loadvm-lazy:checked");
        disks::goto(set, &inc, tag)?;
        capture::write_back(set, &specs, &plan.checked.captured)?;
        crate::killpoint::at("loadvm-lazy:reverted");
        Ok(Some((plan, pages)))
    })?;
    let Some((plan, pages)) = found else {
        return Ok(false);
    };
    let incomplete = |e: SnapshotError| SnapshotError::LoadIncomplete(Box::new(e));
    let status = vm
        .load_ram_lazily(pages, started, &format!("loadvm of snapshot '{tag}'"))
        .map_err(|e| incomplete(e.into()))?;
    vm.restore_state(&plan.checked.state)
        .map_err(|e| incomplete(e.into()))?;
    crate::killpoint::at("loadvm-lazy:restored");
    status.set_resumed();
    Ok(true)
}

/// Reads and checks what a lazy load needs before the resume from snapshot `info` in
/// `store`: the records, the device part of the stream (parsed by `check`). The index is
/// only located: the page source reads it (see `lazy_pages`).
fn plan(
    store: &mut dyn SnapshotStore,
    info: SnapshotInfo,
    tag: &str,
    ram_len: u64,
    check: impl FnOnce(&mut dyn Read) -> std::result::Result<state_io::CheckedState, StateIoError>,
) -> Result<Option<(Plan, IndexAt)>> {
    let damaged = |source| SnapshotError::Damaged {
        tag: tag.to_string(),
        source,
    };
    let bad = |what: String| {
        damaged(IntegrityError::Read {
            snapshot: tag.to_string(),
            source: std::io::Error::other(what),
        })
    };
    let tail = store
        .snapshot_extra_tail(&info.id)
        .map_err(|source| damaged(source.into()))?;
    let (Some(checksum), Some(record)) = (
        integrity::parse_tail(&tail).map_err(damaged)?,
        PageIndexRecord::find(&tail).map_err(damaged)?,
    ) else {
        return Ok(None);
    };
    let len = info.vm_state_size;
    let pages = ram_len / record.page_size;
    if record.page_size != PAGE_SIZE || record.ram_len != ram_len {
        // Another RAM size (the load would be refused) or page size: the eager path says why.
        return Ok(None);
    }
    if checksum.state_len != len {
        return Err(damaged(IntegrityError::LengthMismatch {
            snapshot: tag.to_string(),
            recorded: checksum.state_len,
            actual: len,
        }));
    }
    if record.index_len != pages * 8
        || record.index_offset < len
        || record.setup_end > record.ram_end_section
        || record.ram_end_section > len
    {
        return Err(bad(format!(
            "page index record does not fit the VM state: {record:?}"
        )));
    }
    let index = IndexAt::of(&record, pages);
    let ranges = [(0, record.setup_end), (record.ram_end_section, len)];
    let mut parts = AreaReader {
        store,
        id: &info.id,
        ranges,
        at: 0,
    };
    let checked = match check(&mut parts) {
        Ok(c) => c,
        Err(e) => {
            // Devices that do not parse: damage, if the whole state's checksum says so.
            return match integrity::verify_snapshot(store, &info.id) {
                Err(IntegrityError::Mismatch {
                    expected, actual, ..
                }) => Err(damaged(IntegrityError::Mismatch {
                    snapshot: tag.to_string(),
                    expected,
                    actual,
                })),
                _ => Err(SnapshotError::Load(e)),
            };
        }
    };
    Ok(Some((
        Plan {
            checksum,
            info,
            checked,
        },
        index,
    )))
}

/// Reads ranges of a snapshot's VM state one after the other, as one stream.
struct AreaReader<'a> {
    store: &'a mut dyn SnapshotStore,
    id: &'a str,
    ranges: [(u64, u64); 2],
    at: usize,
}

impl Read for AreaReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while let Some((from, to)) = self.ranges.get_mut(self.at) {
            if *from >= *to {
                self.at += 1;
                continue;
            }
            let n = usize::try_from(*to - *from)
                .unwrap_or(usize::MAX)
                .min(out.len())
                .min(1 << 20);
            self.store
                .snapshot_vmstate_read(self.id, *from, &mut out[..n])
                .map_err(std::io::Error::other)?;
            *from += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}
