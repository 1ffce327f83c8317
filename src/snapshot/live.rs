//! `savevm -l TAG`: live savevm by dirty-log pre-copy into the image's vmstate area (as
//! Proxmox's savevm-async), with the same stream writer and iteration live migration uses
//! ([`LiveRam`], [`SaveSession`]); see formats/live-savevm.md.
//!
//! ```text
//!  setup:   disks checked → TAG deleted everywhere (HMP) → vmstate area reserved → KVM
//!           dirty logging on, every page dirty → header, configuration, RAM START
//!  active:  while the guest runs: sync the dirty log → stop? (remainder fits the pause
//!           aimed at, or the size bound would be crossed) → one RAM PART of ≤ 16 MiB
//!  stop:    flush the disks (guest running, device lock released) → pause → last sync → the
//!           remaining dirty pages (RAM END), every device (FULL), EOF, vmdesc → create
//!           TAG on every disk (the disk snapshot and the state are of this instant) → resume
//! ```
//!
//! The vmstate area is written through the VM's block set one 1 MiB chunk at a time, so
//! guest disk requests wait at most one chunk while the state is written. Pages sent more
//! than once are legal in QEMU's stream: on load the last copy wins.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::block::storage::{DataHandle, WriteBehind};
use crate::block::vmstate_io::CHUNK as AREA_CHUNK;
use crate::block::{SnapshotInfo, SnapshotParams};
use crate::interop::integrity::{self, CrcWriter};
use crate::migrate::converge::{BandwidthMeter, StopRule};
use crate::migrate::live_ram::{GuestRam, LiveRam, LiveRamEntry};
use crate::migration::page_index::PageRecorder;
use crate::migration::ram::LZ4_CAPABILITY;
use crate::migration::ram_state::RamState;
use crate::migration::savevm::{DeviceState, Registry, SaveSession};
use crate::migration::Value;
use crate::vmm::{vmstate, Vm, VmStatus};

use super::progress::Counting;
use super::save_info::{SaveInfo, SaveStatus};
use super::state_io::{StateIoError, StreamLayout, PAGE_SIZE, RAM_BLOCK};
use super::{
    capture, default_name, disks, lazy_index, state_size_hint, ProgressFn, Result, SnapshotError,
};

/// Most bytes one pre-copy round writes before the loop looks at the dirty log again.
const ROUND: u64 = 16 << 20;
/// Pause aimed at for the final copy once the remainder fits `downtime_ms` (see
/// [`StopRule`]).
const SETTLE_MS: u64 = 2;
/// Most extra rounds while settling.
const SETTLE_ROUNDS: u32 = 8;
/// Most VM state written into the page cache and not yet synced (twice this, with the sync
/// in flight): see [`WriteBehind`].
const WRITE_BEHIND: u64 = 16 << 20;
/// Bytes a RAM page record takes beyond its data (the be64 address/flags word).
const PAGE_RECORD: u64 = 8;

/// How `savevm -l` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveOptions {
    /// The remainder must fit this many ms at the measured write rate before the guest is
    /// stopped for the final copy.
    pub downtime_ms: u64,
    /// RAM pages LZ4-compressed (`x-vmsnap-lz4`).
    pub lz4: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            downtime_ms: 10,
            lz4: false,
        }
    }
}

/// The size bound of a live save: the stream may not grow past twice the RAM size (plus the
/// device sections, written after it). Before each round the loop asks whether the round,
/// then a final copy of everything dirty now plus as much again as the guest dirtied in the
/// last round, still fit; if not it stops the guest and copies the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeBound {
    limit: u64,
}

impl SizeBound {
    /// The bound for `ram` bytes of guest RAM.
    pub fn for_ram(ram: u64) -> Self {
        SizeBound {
            limit: ram.saturating_mul(2),
        }
    }

    /// Largest stream size the RAM may take.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Stream bytes of `pages` full page records.
    fn stream_bytes(pages: u64) -> u64 {
        pages.saturating_mul(PAGE_SIZE + PAGE_RECORD)
    }

    /// Whether another round of up to `round` bytes may be written at stream position
    /// `pos` with `pending` pages dirty and `recent` pages newly dirtied since the last sync.
    ///
    /// The round sends at least `round / (page + record)` of the dirty pages; what is left
    /// of them, and as many pages again as the guest dirtied in the last round, make the
    /// final copy.
    pub fn allows_round(&self, pos: u64, round: u64, pending: u64, recent: u64) -> bool {
        let round = round.min(Self::stream_bytes(pending));
        let sent = round / (PAGE_SIZE + PAGE_RECORD);
        let last = Self::stream_bytes((pending - sent).saturating_add(recent));
        pos.saturating_add(round).saturating_add(last) <= self.limit
    }
}

/// Writes a stream into the vmstate area of drive `device` of a running VM, borrowing the
/// VM's block set for each 1 MiB chunk only, so the guest's disk requests go on in between.
///
/// The block set sits behind the device lock the vCPUs take for every I/O exit (the serial
/// port included), so the lock is held only while the driver places the chunk: the data of
/// fresh clusters goes out through the drive's [`DataHandle`] with the lock released. A
/// write the kernel throttles (the state dirties the page cache far faster than a disk
/// takes it) then stalls this thread, not the guest.
struct AreaWriter<'v> {
    vm: &'v Vm,
    device: usize,
    pos: u64,
    buf: Vec<u8>,
    data: Option<WriteBehind>,
}

impl<'v> AreaWriter<'v> {
    /// A writer from `pos` of drive `device`'s vmstate area; the data goes out through
    /// `data` (the drive's [`DataHandle`]) when it has one.
    fn new(vm: &'v Vm, device: usize, pos: u64, data: Option<DataHandle>) -> Self {
        AreaWriter {
            vm,
            device,
            pos,
            buf: Vec::with_capacity(AREA_CHUNK),
            data: data.and_then(|h| WriteBehind::new(h, WRITE_BEHIND).ok()),
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (device, pos, buf) = (self.device, self.pos, &self.buf);
        let detached = self.data.is_some();
        let runs = self.vm.with_block_set(|set| {
            let (_, store) = disks::store(set, device).map_err(io::Error::other)?;
            if detached {
                store.vmstate_write_detached(pos, buf)
            } else {
                store.vmstate_write(pos, buf).map(|()| Vec::new())
            }
            .map_err(io::Error::other)
        })?;
        if let Some(h) = self.data.as_mut() {
            for r in runs {
                h.write_at(r.host, &buf[r.start..r.start + r.len])?;
            }
        }
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Room left for the device sections past twice the RAM when placing the index ahead.
const INDEX_SLACK: u64 = 64 << 20;

/// Writes the page index `body` at `at` in the vmstate area of drive `device` while the
/// guest runs, through an [`AreaWriter`] (the device lock held only to place each chunk).
fn write_index_ahead(vm: &Vm, device: usize, at: u64, body: &[u8]) -> Result<()> {
    let data =
        vm.with_block_set(|set| set.devices.get(device).and_then(|d| d.driver.data_handle()));
    let mut w = AreaWriter::new(vm, device, at, data);
    w.write_all(body).and_then(|()| w.flush()).map_err(save_err)
}

/// Flushes every drive of a running VM before the pause, so that the flushes of the snapshot
/// creation inside it have only the last writes: through the drives' [`DataHandle`]s with the device lock released
/// (an `fdatasync` behind a GiB of fresh state takes long), or, if a drive has none (NBD),
/// through the drivers.
fn flush_ahead(vm: &Vm) -> Result<()> {
    let handles: Option<Vec<DataHandle>> = vm.with_block_set(|set| {
        set.devices
            .iter()
            .filter(|d| !d.driver.is_read_only())
            .map(|d| d.driver.data_handle())
            .collect()
    });
    match handles {
        Some(hs) => {
            for h in hs {
                h.sync()
                    .map_err(|e| SnapshotError::Flush(crate::block::Error::io("flush", e)))?;
            }
            Ok(())
        }
        None => vm.flush_drives().map_err(SnapshotError::Flush),
    }
}

impl Write for AreaWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (AREA_CHUNK - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == AREA_CHUNK {
            self.write_out()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()
    }
}

/// A device section's value, captured when the guest is stopped.
struct Slot<'s>(&'s RefCell<Option<Value>>);

impl DeviceState for Slot<'_> {
    fn save(&self) -> Value {
        self.0.borrow().clone().unwrap_or(Value::Struct(Vec::new()))
    }

    fn load(&mut self, _value: &Value, _version_id: u32) -> std::result::Result<(), String> {
        Err("a live savevm does not load".into())
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

fn save_err(e: impl Into<StateIoError>) -> SnapshotError {
    SnapshotError::Save(e.into())
}

/// `savevm -l [TAG]`: saves the VM state and a snapshot of every disk while the guest runs,
/// stopping it only for the final copy. A VM that is not running is saved as plain savevm
/// does. `report` receives the figures as they change (for `info savevm`).
pub fn savevm_live(
    vm: &Vm,
    tag: Option<&str>,
    opts: &LiveOptions,
    progress: ProgressFn<'_>,
    report: &mut dyn FnMut(&SaveInfo),
) -> Result<SnapshotInfo> {
    let start = Instant::now();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = tag
        .map(str::to_string)
        .unwrap_or_else(|| default_name(now.as_secs()));
    let mut info = SaveInfo::setup(&name, true);
    report(&info);
    let r = match vm.status() {
        VmStatus::Failed(why) => Err(SnapshotError::Failed(why)),
        VmStatus::Paused => {
            let o = super::SaveOptions { lz4: opts.lz4 };
            let r = super::savevm_with_options(vm, Some(&name), &o, progress);
            info.downtime_ms = Some(0);
            r
        }
        VmStatus::Running => live(vm, &name, now, opts, progress, &mut info, report),
    };
    info.total_time_ms = ms(start.elapsed());
    match &r {
        Ok(s) => {
            info.status = SaveStatus::Completed;
            info.bytes = s.vm_state_size;
        }
        Err(e) => {
            info.status = SaveStatus::Failed;
            info.error = Some(e.to_string());
        }
    }
    report(&info);
    r
}

/// The live save of a running VM: setup, pre-copy, stop and copy, create. Whatever fails,
/// dirty logging ends, held-back discards are dropped and the guest runs again.
fn live(
    vm: &Vm,
    name: &str,
    now: Duration,
    opts: &LiveOptions,
    progress: ProgressFn<'_>,
    info: &mut SaveInfo,
    report: &mut dyn FnMut(&SaveInfo),
) -> Result<SnapshotInfo> {
    let captured = vm.captured_drives();
    let total = vm.ram().len() as u64;
    let (inc, specs, data) = vm.with_block_set(|set| -> Result<_> {
        let inc = disks::included(set, &captured)?;
        let specs = capture::specs(set, &captured)?;
        // Space freed by replacing the tag is where the new state goes (see savevm).
        for &i in &inc {
            disks::store(set, i)?.1.begin_discards();
        }
        let data = set.devices.get(inc[0]).and_then(|d| d.driver.data_handle());
        Ok((inc, specs, data))
    })?;
    // Set when the guest is paused for the final copy.
    let mut down: Option<Instant> = None;
    let r = vm
        .with_block_set(|set| -> Result<()> {
            disks::delete(set, &inc, name)?;
            crate::killpoint::at("savevm-live:old-tag-deleted");
            let (_, store) = disks::store(set, inc[0])?;
            store
                .vmstate_reserve(state_size_hint(total))
                .map_err(|e| save_err(io::Error::other(e)))
        })
        .and_then(|()| {
            vm.set_dirty_logging(true)?;
            let area = AreaWriter::new(vm, inc[0], 0, data);
            let mut w = CrcWriter::new(Counting::new(area, total, progress));
            let recorder = (!opts.lz4).then(|| lazy_index::new_recorder(total));
            // The index goes past the largest stream the save may write, ahead of the pause.
            let captured_bytes: u64 = specs.iter().map(|c| c.size).sum();
            let index_at = lazy_index::ahead_offset(total, captured_bytes + INDEX_SLACK);
            let mut written: Option<Vec<u8>> = None;
            let mut write_ahead = || -> Result<()> {
                if let Some(index) = recorder.as_ref().and_then(PageRecorder::index) {
                    let body = index.encode();
                    write_index_ahead(vm, inc[0], index_at, &body)?;
                    written = Some(body);
                }
                Ok(())
            };
            let (layout, clock) = precopy_and_stop(
                vm,
                &specs,
                opts,
                recorder.clone(),
                &mut w,
                &mut down,
                info,
                report,
                &mut write_ahead,
            )?;
            w.flush().map_err(save_err)?;
            let (len, crc) = w.finish();
            debug_assert_eq!(len, layout.len);
            let size = layout.len;
            let mut extra_tail = integrity::tail_for(crc, size);
            if let Some(r) = recorder {
                extra_tail.extend(vm.with_block_set(|set| -> Result<Vec<u8>> {
                    let (_, store) = disks::store(set, inc[0])?;
                    match &written {
                        Some(old) => {
                            lazy_index::store_index_ahead(store, &r, total, &layout, index_at, old)
                        }
                        None => lazy_index::store_index(store, &r, total, &layout),
                    }
                    .map_err(save_err)
                })?);
            }
            crate::killpoint::at("savevm-live:state-complete");
            Ok((size, extra_tail, clock))
        })
        .and_then(|(size, extra_tail, clock)| {
            let params = SnapshotParams {
                name: name.to_string(),
                vm_state_size: size,
                date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                date_nsec: now.subsec_nanos(),
                vm_clock_nsec: clock,
                icount: None,
                extra_tail,
            };
            let created = vm.with_block_set(|set| disks::create(set, &inc, &params))?;
            crate::killpoint::at("savevm-live:created");
            Ok(created)
        });
    // The guest runs again as soon as the snapshot exists; dirty logging ends and the
    // held-back discards are punched after that.
    if let Some(t) = down {
        vm.resume();
        info.downtime_ms = Some(ms(t.elapsed()));
        crate::killpoint::at("savevm-live:resumed");
    }
    let _ = vm.set_dirty_logging(false);
    let ended = vm.with_block_set(|set| -> Result<()> {
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
        Ok(())
    });
    let s = r?;
    ended?;
    Ok(s)
}

/// Header and RAM setup, pre-copy rounds while the guest runs, then the pause (recorded in
/// `down`) and the rest of the stream; returns the stream's layout (for the page index
/// `recorder` collects) and the VM clock at the pause. The guest stays paused on return,
/// also on error once it was paused.
#[allow(clippy::too_many_arguments)]
fn precopy_and_stop(
    vm: &Vm,
    specs: &[super::state_io::CaptureSpec],
    opts: &LiveOptions,
    recorder: Option<PageRecorder>,
    out: &mut dyn Write,
    down: &mut Option<Instant>,
    info: &mut SaveInfo,
    report: &mut dyn FnMut(&SaveInfo),
    before_pause: &mut dyn FnMut() -> Result<()>,
) -> Result<(StreamLayout, u64)> {
    let start = Instant::now();
    // Pages dirtied before now are dirty in the live RAM state anyway.
    vm.take_dirty_bitmap()?;
    let ram_src = GuestRam(vm.ram());
    let ram = RefCell::new(LiveRam::new(&ram_src, RAM_BLOCK, PAGE_SIZE));
    ram.borrow_mut().lz4 = opts.lz4;
    ram.borrow_mut().recorder = recorder;
    let layout = vmstate::layout(vm.vcpu_count(), vm.drive_count());
    let values: Vec<RefCell<Option<Value>>> = layout.iter().map(|_| RefCell::new(None)).collect();
    let cap_values: Vec<RefCell<Option<Value>>> =
        specs.iter().map(|_| RefCell::new(None)).collect();
    let mut slots: Vec<Slot<'_>> = values.iter().map(Slot).collect();
    let mut cap_slots: Vec<Slot<'_>> = cap_values.iter().map(Slot).collect();
    let mut entry = LiveRamEntry(&ram);
    let mut reg = Registry::new(vmstate::MACHINE);
    reg.page_size = PAGE_SIZE;
    if opts.lz4 {
        reg.add_capability(LZ4_CAPABILITY);
    }
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut entry);
    for ((idstr, inst, vmsd), slot) in layout.iter().zip(slots.iter_mut()) {
        reg.register_device(idstr, *inst, vmsd.clone(), slot);
    }
    for (c, slot) in specs.iter().zip(cap_slots.iter_mut()) {
        let vmsd = Arc::new(vmstate::capture_vmsd(c.size));
        let inst = u32::try_from(c.index).unwrap_or(u32::MAX);
        reg.register_device(vmstate::CAPTURE_IDSTR, inst, vmsd, slot);
    }
    let mut session = SaveSession::begin(&mut reg, out).map_err(save_err)?;
    let setup_end = session.position();
    info.status = SaveStatus::Active;
    report(info);

    let total_pages = ram.borrow().total_bytes() / PAGE_SIZE;
    let bound = SizeBound::for_ram(total_pages * PAGE_SIZE);
    let mut meter = BandwidthMeter::new(Instant::now(), session.position());
    let mut rule = StopRule::new(SETTLE_MS, SETTLE_ROUNDS);
    loop {
        let bitmap = vm.take_dirty_bitmap()?;
        let newly = ram.borrow_mut().sync(&bitmap);
        let pos = session.position();
        let (pending, sent) = {
            let r = ram.borrow();
            let c = r.counters;
            (r.pending_bytes(), c.normal_pages + c.zero_pages)
        };
        meter.update(Instant::now(), pos, sent);
        info.bytes = pos;
        info.remaining = pending;
        info.dirty_sync_count = ram.borrow().counters.dirty_syncs;
        info.total_time_ms = ms(start.elapsed());
        report(info);
        if rule.should_stop(pending, &meter, opts.downtime_ms)
            || !bound.allows_round(pos, ROUND, pending / PAGE_SIZE, newly)
        {
            break;
        }
        let busy = Instant::now();
        ram.borrow_mut().set_budget(ROUND);
        session.iterate().map_err(save_err)?;
        crate::killpoint::at("savevm-live:iterated");
        meter.add_busy(busy.elapsed());
    }

    // Stop and copy. The page index as of now is written and the disks are flushed first
    // while the guest runs, so that the pause has only the last writes.
    before_pause()?;
    crate::killpoint::at("savevm-live:index-ahead");
    flush_ahead(vm)?;
    crate::killpoint::at("savevm-live:flushed-ahead");
    *down = Some(Instant::now());
    vm.pause()?;
    crate::killpoint::at("savevm-live:paused");
    // No flush here: creating the snapshot flushes each image before it publishes the new
    // table (formats/qcow2.md's crash rule), which makes the guest's last writes, the rest
    // of the state and the page index durable before anything refers to them.
    let bitmap = vm.take_dirty_bitmap()?;
    ram.borrow_mut().sync(&bitmap);
    let state = vm.save_state()?;
    for (v, s) in values.iter().zip(vmstate::to_sections(&state)) {
        *v.borrow_mut() = Some(s.value);
    }
    let captured: Vec<usize> = specs.iter().map(|c| c.index).collect();
    let contents = vm.with_block_set(|set| capture::read_all(set, &captured))?;
    for (v, c) in cap_values.iter().zip(&contents) {
        *v.borrow_mut() = Some(vmstate::capture_value(&c.name, &c.data));
    }
    let ram_end_section = session.position();
    let len = session.complete().map_err(save_err)?;
    crate::killpoint::at("savevm-live:stream-complete");
    let layout = StreamLayout {
        setup_end,
        ram_end_section,
        len,
    };
    Ok((layout, state.arch.clock.clock))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE + PAGE_RECORD;

    #[test]
    fn the_bound_leaves_room_for_the_final_copy() {
        let ram = 1000 * PAGE_SIZE;
        let b = SizeBound::for_ram(ram);
        assert_eq!(b.limit(), 2 * ram);
        // First pass of a guest with every page dirty: fits, however large the round.
        assert!(b.allows_round(0, ROUND, 1000, 0));
        assert!(b.allows_round(0, 10 * P, 1000, 0));
        // After the first pass, 100 pages dirty, 50 more dirtied in the last round: the
        // round sends 10 of them, the final copy at most 90 + 50.
        assert!(b.allows_round(1000 * P, 10 * P, 100, 50));
        assert!(b.allows_round(2 * ram - 150 * P, 10 * P, 100, 50));
        assert!(!b.allows_round(2 * ram - 150 * P + 1, 10 * P, 100, 50));
        // A guest that dirties faster than the state is written: the remainder does not
        // shrink and the stream nears the bound, so the loop stops.
        assert!(b.allows_round(1300 * P, 100 * P, 300, 300));
        assert!(!b.allows_round(1400 * P, 100 * P, 300, 300));
        assert!(!b.allows_round(u64::MAX, 1, 1, 1));
    }
}
