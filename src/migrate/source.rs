//! The source side: QEMU's migration thread. Named steps:
//! connect → start dirty logging (every page dirty) → iterate (send dirty pages at up to
//! max-bandwidth, measure the bandwidth, sync the dirty bitmap when the remainder is small,
//! throttle the vCPUs under auto-converge) → stop the vCPUs → last sync → flush and release
//! the disks → device state → the rest of RAM, devices, EOF, vmdesc → wait for the
//! destination to have it all. Any failure puts things back: disks reopened, guest resumed
//! if it was running, dirty logging off, no throttle.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crate::migration::ram::LZ4_CAPABILITY;
use crate::migration::ram_state::RamState;
use crate::migration::savevm::{DeviceState, Registry, SaveSession};
use crate::migration::stream::StreamError;
use crate::migration::Value;
use crate::snapshot::state_io::{PAGE_SIZE, RAM_BLOCK};
use crate::vmm::{vmstate, Vm, VmError, VmStatus};

use super::block::send::{BlockEntry, BlockSendError, BlockSender};
use super::converge::{BandwidthMeter, DirtyPeriod, RateLimiter, StopRule, ThrottleParams};
use super::disks::{self, DiskError, DriveOpen};
use super::info::{MigrationInfo, RamInfo, Status};
use super::live_ram::{GuestRam, LiveRam, LiveRamEntry};
use super::params::Parameters;
use super::postcopy::{self, PostcopyCounters, ReturnPath, RpMsg};
use super::uri::{Aborter, MigrateUri, Outgoing, UriError};
use super::xbzrle_send::XbzrleSender;

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The channel could not be opened.
    #[error(transparent)]
    Connect(#[from] UriError),
    /// A VM operation (dirty log, pause, state capture) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the stream failed (the destination went away or refused it).
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The end of the stream was not taken by the destination.
    #[error("the destination did not take the whole stream: {0}")]
    Finish(#[source] std::io::Error),
    /// Handing the disks over failed.
    #[error(transparent)]
    Disks(#[from] DiskError),
    /// Preparing the drives for a block migration failed.
    #[error(transparent)]
    Block(#[from] BlockSendError),
    /// The migration failed after the disks were released, and they could not be taken
    /// back: the guest stays paused, the disks inactive.
    #[error("{failure}; the disks could not be taken back: {reopen}")]
    Reactivate {
        /// Why the migration failed.
        failure: Box<MigrateError>,
        /// Why reopening failed.
        reopen: DiskError,
    },
    /// The device sections do not match the VM's layout (a bug).
    #[error("device state has {got} sections, the layout {want}")]
    Layout {
        /// Sections captured.
        got: usize,
        /// Sections registered.
        want: usize,
    },
    /// `migrate_cancel`.
    #[error("cancelled")]
    Cancelled,
    /// Postcopy could not start (no return path, the destination did not agree, or it
    /// failed to load the pre-copy stream); nothing is lost, the guest runs on here.
    #[error("postcopy: {0}")]
    Postcopy(String),
    /// The channel broke once the destination could run the guest: its RAM is split
    /// between the two sides; the guest stays paused here with its pages.
    #[error("postcopy: {0}")]
    PostcopyLost(String),
}

/// What the migration thread reports to, and learns from, its owner.
pub trait Observer {
    /// New figures (called often; cheap).
    fn progress(&self, info: &MigrationInfo);
    /// Whether `migrate_cancel` was asked for.
    fn cancelled(&self) -> bool;
    /// The channel is open: `aborter` interrupts it.
    fn channel_open(&self, aborter: Aborter);
    /// The parameters now (`migrate_set_parameter` may change max-bandwidth and
    /// downtime-limit while the migration runs, as in QEMU).
    fn parameters(&self) -> Option<Parameters> {
        None
    }
    /// Whether `migrate_start_postcopy` was asked for.
    fn postcopy_requested(&self) -> bool {
        false
    }
}

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct Job {
    /// Destination.
    pub uri: MigrateUri,
    /// Parameters at the start (QEMU reads them as it goes; we snapshot them).
    pub params: Parameters,
    /// The auto-converge capability.
    pub auto_converge: bool,
    /// The `x-vmsnap-lz4` capability: RAM pages LZ4-compressed.
    pub lz4: bool,
    /// The `xbzrle` capability: re-sent pages as XBZRLE deltas.
    pub xbzrle: bool,
    /// `migrate -b`: the writable drives travel in the stream (`vmsnap-block`).
    pub block: bool,
    /// The `postcopy-ram` capability: a return path, and `migrate_start_postcopy` may
    /// switch to postcopy.
    pub postcopy: bool,
    /// How to reopen the drives if the handover must be undone.
    pub drives: Vec<DriveOpen>,
}

/// How a completed migration went.
#[derive(Debug, Clone)]
pub struct Completed {
    /// Final figures (status completed).
    pub info: MigrationInfo,
}

/// Biggest PART sent between two looks at the clock, the cancel flag and the dirty log.
const CHUNK: u64 = 16 << 20;
/// Downtime aimed at once the remainder fits the limit (see [`StopRule`]).
const SETTLE_MS: u64 = 8;
/// How long the source waits for the destination to close after the last byte.
const FINISH_WAIT: Duration = Duration::from_secs(10);

struct Slot<'s>(&'s RefCell<Option<Value>>);

impl DeviceState for Slot<'_> {
    fn save(&self) -> Value {
        self.0.borrow().clone().unwrap_or(Value::Struct(Vec::new()))
    }

    fn load(&mut self, _value: &Value, _version_id: u32) -> Result<(), String> {
        Err("the migration source does not load".into())
    }
}

/// Where the guest stands, to undo on failure.
#[derive(Debug, Default)]
struct Undo {
    was_running: bool,
    paused: bool,
    inactive: bool,
}

/// How often a pending connect looks at the cancel flag.
const CONNECT_POLL: Duration = Duration::from_millis(20);

/// Opens the channel on a helper thread, so that `migrate_cancel` is answered while a connect
/// hangs (an unreachable host keeps a tcp connect waiting for minutes; QEMU connects
/// asynchronously too). A channel that opens after the cancel is dropped at once.
pub(super) fn connect(uri: &MigrateUri, obs: &dyn Observer) -> Result<Outgoing, MigrateError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = uri.clone();
    std::thread::Builder::new()
        .name("mig-connect".into())
        .spawn(move || {
            let _ = tx.send(Outgoing::connect(&target));
        })
        .map_err(|source| UriError::Io {
            what: "Failed to start connecting to",
            target: uri.to_string(),
            source,
        })?;
    loop {
        match rx.recv_timeout(CONNECT_POLL) {
            Ok(r) => return Ok(r?),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if obs.cancelled() => {
                return Err(MigrateError::Cancelled)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(UriError::Io {
                    what: "Failed to connect to",
                    target: uri.to_string(),
                    source: std::io::ErrorKind::Other.into(),
                }
                .into())
            }
        }
    }
}

/// Runs one outgoing migration of `vm` to completion. On success the VM is left paused
/// with its disks released (QEMU's postmigrate); on error everything is put back.
pub fn migrate(vm: &Vm, job: &Job, obs: &dyn Observer) -> Result<Completed, MigrateError> {
    let start = Instant::now();
    crate::killpoint::at("migrate:started");
    let mut undo = Undo {
        was_running: vm.status() == VmStatus::Running,
        ..Undo::default()
    };
    obs.progress(&MigrationInfo {
        status: Status::Setup,
        ..MigrationInfo::default()
    });
    let result = connect(&job.uri, obs).and_then(|out| {
        obs.channel_open(out.aborter());
        vm.set_dirty_logging(true)?;
        run(vm, job, obs, out, start, &mut undo)
    });
    let _ = vm.set_dirty_logging(false);
    vm.set_throttle(0);
    match result {
        Ok(done) => Ok(done),
        // The destination may run the guest: nothing here may resume it or take the disks.
        Err(e @ MigrateError::PostcopyLost(_)) => Err(e),
        Err(e) => {
            if undo.inactive {
                // The destination never activated (it had not got the whole stream), so
                // the locks are free again; if this fails the guest stays paused.
                if let Err(reopen) = disks::activate(vm, &job.drives) {
                    return Err(MigrateError::Reactivate {
                        failure: Box::new(e),
                        reopen,
                    });
                }
            }
            if undo.paused {
                vm.set_pause_reason(None);
                if undo.was_running {
                    vm.resume();
                }
            }
            Err(if obs.cancelled() {
                MigrateError::Cancelled
            } else {
                e
            })
        }
    }
}

/// Captures the stopped VM's device state into the registry's slots.
fn capture_devices(vm: &Vm, values: &[RefCell<Option<Value>>]) -> Result<(), MigrateError> {
    let state = vm.save_state()?;
    let sections = vmstate::to_sections(&state);
    if sections.len() != values.len() {
        return Err(MigrateError::Layout {
            got: sections.len(),
            want: values.len(),
        });
    }
    for (v, s) in values.iter().zip(sections) {
        *v.borrow_mut() = Some(s.value);
    }
    Ok(())
}

/// RAM figures for `info migrate`; `split` is (bytes sent while running, while stopped).
fn ram_info(
    r: &LiveRam<'_, GuestRam<'_>>,
    transferred: u64,
    secs: f64,
    meter: &BandwidthMeter,
    period: &DirtyPeriod,
    split: (u64, u64),
) -> RamInfo {
    RamInfo {
        transferred,
        remaining: r.pending_bytes(),
        total: r.total_bytes(),
        duplicate: r.counters.zero_pages,
        normal: r.counters.normal_pages,
        dirty_sync_count: r.counters.dirty_syncs,
        page_size: r.page_size(),
        mbps: transferred as f64 * 8.0 / 1e6 / secs,
        pages_per_second: meter.pages_per_second,
        dirty_pages_rate: period.dirty_pages_rate,
        precopy_bytes: split.0,
        downtime_bytes: split.1,
        ..RamInfo::default()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

fn run(
    vm: &Vm,
    job: &Job,
    obs: &dyn Observer,
    mut out: Outgoing,
    start: Instant,
    undo: &mut Undo,
) -> Result<Completed, MigrateError> {
    // The snapshot trees are copied first (the guest runs meanwhile); from here on the
    // guest's writes are tracked.
    let block = match job.block {
        true => Some(RefCell::new(BlockSender::prepare(vm, &job.drives)?)),
        false => None,
    };
    let block_pending = || block.as_ref().map_or(0, |b| b.borrow().pending_bytes());
    // RAM's figures leave the disk records out, as QEMU's do.
    let disk_stream = || block.as_ref().map_or(0, |b| b.borrow().stream_bytes());
    let rp = if job.postcopy {
        Some(open_return_path(&out, vm.ram().len() as u64 / PAGE_SIZE)?)
    } else {
        None
    };
    // Pages dirtied before now are all dirty in the live RAM state anyway.
    vm.take_dirty_bitmap()?;
    let ram_src = GuestRam(vm.ram());
    let ram = RefCell::new(LiveRam::new(&ram_src, RAM_BLOCK, PAGE_SIZE));
    ram.borrow_mut().lz4 = job.lz4;
    if job.xbzrle {
        ram.borrow_mut().xbzrle = Some(XbzrleSender::new(
            job.params.xbzrle_cache_size,
            PAGE_SIZE as usize,
        ));
    }
    let layout = vmstate::layout(vm.vcpu_count(), vm.drive_count());
    let values: Vec<RefCell<Option<Value>>> = layout.iter().map(|_| RefCell::new(None)).collect();
    let mut slots: Vec<Slot<'_>> = values.iter().map(Slot).collect();
    let mut entry = LiveRamEntry(&ram);
    let mut reg = Registry::new(vmstate::MACHINE);
    reg.page_size = PAGE_SIZE;
    if job.lz4 {
        reg.add_capability(LZ4_CAPABILITY);
    }
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut entry);
    let mut block_entry = block.as_ref().map(BlockEntry);
    if let Some(e) = block_entry.as_mut() {
        reg.register_iterative(super::block::IDSTR, 0, super::block::VERSION, e);
    }
    for ((idstr, inst, vmsd), slot) in layout.iter().zip(slots.iter_mut()) {
        reg.register_device(idstr, *inst, vmsd.clone(), slot);
    }
    let mut params = job.params.clone();
    let mut session = SaveSession::begin(&mut reg, &mut out)?;
    let setup_ms = ms(start.elapsed());

    let now = Instant::now();
    let mut meter = BandwidthMeter::new(now, session.position());
    let mut limiter = RateLimiter::new(params.max_bandwidth, now, session.position());
    let throttle = ThrottleParams {
        trigger: params.throttle_trigger_threshold,
        initial: params.cpu_throttle_initial,
        increment: params.cpu_throttle_increment,
        max: params.max_cpu_throttle,
    };
    let mut period = DirtyPeriod::new(throttle, job.auto_converge, now, session.position());
    let mut rule = StopRule::new(SETTLE_MS, 4);
    let iter_start = Instant::now();
    let report = |pos: u64, meter: &BandwidthMeter, period: &DirtyPeriod| {
        let r = ram.borrow();
        let elapsed = iter_start.elapsed().as_secs_f64().max(1e-3);
        obs.progress(&MigrationInfo {
            status: Status::Active,
            total_time_ms: ms(start.elapsed()),
            expected_downtime_ms: Some(
                meter
                    .expected_ms(r.pending_bytes() + block_pending())
                    .unwrap_or(job.params.downtime_limit_ms),
            ),
            setup_ms: Some(setup_ms),
            ram: Some({
                let ram_pos = pos - disk_stream();
                ram_info(&r, ram_pos, elapsed, meter, period, (ram_pos, 0))
            }),
            xbzrle: r.xbzrle.as_ref().map(XbzrleSender::info),
            disk: block.as_ref().map(|b| b.borrow().counters()),
            cpu_throttle_percentage: job.auto_converge.then_some(period.throttle),
            ..MigrationInfo::default()
        });
    };
    report(session.position(), &meter, &period);

    // Iterate while the guest runs.
    let mut switched = false;
    loop {
        if obs.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if rp.is_some() && obs.postcopy_requested() {
            switched = true;
            break;
        }
        let now = Instant::now();
        let pos = session.position();
        if let Some(p) = obs.parameters().filter(|p| *p != params) {
            if p.max_bandwidth != params.max_bandwidth {
                limiter = RateLimiter::new(p.max_bandwidth, now, pos);
            }
            params = p;
        }
        let sent_pages = {
            let c = ram.borrow().counters;
            c.normal_pages + c.zero_pages + c.xbzrle_pages
        };
        meter.update(now, pos, sent_pages);
        let limit = params.downtime_limit_ms;
        // While settling, the dirty set of the last sync is sent whole before the next
        // sync, so that the rule compares round with round.
        let pending = ram.borrow().pending_bytes() + block_pending();
        if pending <= meter.threshold(limit) && (pending == 0 || !rule.settling()) {
            let bitmap = vm.take_dirty_bitmap()?;
            let newly = ram.borrow_mut().sync(&bitmap);
            if let Some(x) = ram.borrow_mut().xbzrle.as_mut() {
                x.update_rates(sent_pages);
            }
            if let Some(pct) = period.on_sync(now, pos, newly, PAGE_SIZE) {
                vm.set_throttle(pct);
            }
            let pending = ram.borrow().pending_bytes() + block_pending();
            if rule.should_stop(pending, &meter, limit) {
                break;
            }
        }
        let busy = Instant::now();
        match limiter.allowance(busy, pos) {
            Ok(allow) => {
                ram.borrow_mut().set_budget(allow.min(CHUNK));
                if let Some(b) = &block {
                    b.borrow_mut().budget = allow.min(CHUNK);
                }
                session.iterate()?;
                crate::killpoint::at("migrate:iterated");
            }
            Err(wait) => std::thread::sleep(wait),
        }
        meter.add_busy(busy.elapsed());
        report(session.position(), &meter, &period);
    }

    // Stop and copy. Flushing first while the guest still runs leaves the final flush
    // (inside the downtime) with only the last writes.
    vm.flush_drives()
        .map_err(|e| MigrateError::Disks(DiskError::Flush(e)))?;
    let precopy = session.position() - disk_stream();
    let down_start = Instant::now();
    vm.set_pause_reason(Some("finish-migrate"));
    undo.paused = true;
    vm.pause()?;
    let bitmap = vm.take_dirty_bitmap()?;
    ram.borrow_mut().sync(&bitmap);
    // Postcopy: the pages still dirty are sent after the switch, on demand.
    let missing = switched.then(|| ram.borrow_mut().take_dirty());
    crate::killpoint::at("migrate:stopped");
    let total = if job.block {
        // The last dirty chunks are read from the drives inside the final copy, so they
        // are released after it (the destination writes its own images).
        capture_devices(vm, &values)?;
        let total = session.complete()?;
        disks::inactivate(vm)?;
        undo.inactive = true;
        total
    } else {
        disks::inactivate(vm)?;
        undo.inactive = true;
        crate::killpoint::at("migrate:inactivated");
        capture_devices(vm, &values)?;
        session.complete()?
    };
    crate::killpoint::at("migrate:sent");
    if let Some(rp) = &rp {
        let words = ram.borrow().total_bytes().div_ceil(PAGE_SIZE * 64);
        let missing = missing.unwrap_or_else(|| vec![0; usize::try_from(words).unwrap_or(0)]);
        let base = ram_info(
            &ram.borrow(),
            total,
            start.elapsed().as_secs_f64().max(1e-3),
            &meter,
            &period,
            (precopy, total - precopy),
        );
        return postcopy_phase(vm, obs, out, rp, missing, base, start, down_start, setup_ms);
    }
    out.finish(FINISH_WAIT).map_err(MigrateError::Finish)?;
    crate::killpoint::at("migrate:finished");
    let downtime = down_start.elapsed();
    vm.set_pause_reason(Some("postmigrate"));

    let total = total - disk_stream();
    let r = ram.borrow();
    let elapsed = start.elapsed();
    let info = MigrationInfo {
        status: Status::Completed,
        total_time_ms: ms(elapsed),
        downtime_ms: Some(ms(downtime)),
        setup_ms: Some(setup_ms),
        ram: Some(ram_info(
            &r,
            total,
            elapsed.as_secs_f64().max(1e-3),
            &meter,
            &period,
            (precopy, total - precopy),
        )),
        xbzrle: r.xbzrle.as_ref().map(XbzrleSender::info),
        disk: block.as_ref().map(|b| b.borrow().counters()),
        ..MigrationInfo::default()
    };
    Ok(Completed { info })
}

/// Opens the return path and waits for the destination's ADVISE.
fn open_return_path(out: &Outgoing, pages: u64) -> Result<ReturnPath, MigrateError> {
    let r = out
        .return_path()
        .ok_or_else(|| {
            MigrateError::Postcopy(
                "postcopy-ram needs a return path: migrate over tcp:, unix: or an fd: socket"
                    .into(),
            )
        })?
        .map_err(|e| MigrateError::Postcopy(format!("opening the return path: {e}")))?;
    let rp = ReturnPath::start(r, pages)
        .map_err(|e| MigrateError::Postcopy(format!("starting the return path: {e}")))?;
    rp.expect(
        &RpMsg::Advise,
        postcopy::ADVISE_WAIT,
        "the destination did not agree to postcopy (is postcopy-ram on there too?)",
    )
    .map_err(MigrateError::Postcopy)?;
    Ok(rp)
}

/// After the pre-copy stream (devices included) went out with the postcopy-ram capability:
/// waits for the destination to have loaded it, sends the missing pages (none if pre-copy
/// finished), and waits for the destination to have them all. Downtime ends when the
/// destination can start the guest (the postcopy header is sent).
#[allow(clippy::too_many_arguments)]
fn postcopy_phase(
    vm: &Vm,
    obs: &dyn Observer,
    mut out: Outgoing,
    rp: &ReturnPath,
    missing: Vec<u64>,
    base: RamInfo,
    start: Instant,
    down_start: Instant,
    setup_ms: u64,
) -> Result<Completed, MigrateError> {
    // Until the header goes out the destination cannot run the guest: a failure here is an
    // ordinary one (the caller resumes the guest).
    rp.expect(
        &RpMsg::Loaded,
        postcopy::HANDSHAKE_WAIT,
        "the destination did not load the stream",
    )
    .map_err(MigrateError::Postcopy)?;
    let lost = MigrateError::PostcopyLost;
    let ram = vm.ram();
    let header = postcopy::write_header(&mut out, ram.len() as u64 / PAGE_SIZE, &missing)
        .map_err(|e| lost(format!("sending the postcopy header: {e}")))?;
    let downtime = ms(down_start.elapsed());
    vm.set_pause_reason(Some("postmigrate"));
    let info = |status: Status, c: &PostcopyCounters| MigrationInfo {
        status,
        total_time_ms: ms(start.elapsed()),
        downtime_ms: Some(downtime),
        setup_ms: Some(setup_ms),
        ram: Some(RamInfo {
            transferred: base.transferred + header + c.bytes,
            remaining: c.remaining * PAGE_SIZE,
            duplicate: base.duplicate + c.zero,
            normal: base.normal + c.normal,
            postcopy_requests: c.requests,
            postcopy_bytes: header + c.bytes,
            ..base.clone()
        }),
        ..MigrationInfo::default()
    };
    let bandwidth = obs.parameters().map_or(0, |p| p.max_postcopy_bandwidth);
    let c = postcopy::send_pages(&mut out, ram, missing, rp, bandwidth, &mut |c| {
        obs.progress(&info(Status::PostcopyActive, c));
    })
    .map_err(lost)?;
    // The destination said DONE: only the orderly close is left.
    let _ = out.finish(FINISH_WAIT);
    Ok(Completed {
        info: info(Status::Completed, &c),
    })
}
