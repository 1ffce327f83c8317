//! The VM's side of lazy RAM loading: starting a [`LazyRam`] on guest memory, waiting for
//! it, and the last load's progress for `info loadvm`.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestMemory;

use super::page_server::{FillReport, FillStatus, LazyRam, LoadState, PageSource, PAGE};
use super::{lock, run_control, Vm, VmError};

/// The lazy load in progress (if any) and the progress of the last load.
#[derive(Debug, Default)]
pub(super) struct LazySlot {
    running: Option<LazyRam>,
    last: Option<Arc<FillStatus>>,
}

impl Vm {
    /// Starts loading guest RAM lazily from `source`: drops every page of guest RAM, and from
    /// now on each page is filled on first touch, the rest by a background thread. The VM
    /// must be paused (restore the device state, then resume). If the load fails later, the
    /// VM is stopped with `failed: WHAT` (its status becomes failed). `started` is when the
    /// load began (for `info loadvm`'s times).
    pub fn load_ram_lazily(
        &self,
        source: Arc<dyn PageSource>,
        started: Instant,
        what: &str,
    ) -> super::Result<Arc<FillStatus>> {
        self.load_pages_lazily(source, started, what, None)
    }

    /// [`Vm::load_ram_lazily`] for RAM that is loaded except for the pages whose bit is set
    /// in `missing` (bit i = page i; postcopy): only those are dropped and filled.
    pub fn load_missing_ram_lazily(
        &self,
        source: Arc<dyn PageSource>,
        started: Instant,
        what: &str,
        missing: &[u64],
    ) -> super::Result<Arc<FillStatus>> {
        self.load_pages_lazily(source, started, what, Some(missing))
    }

    fn load_pages_lazily(
        &self,
        source: Arc<dyn PageSource>,
        started: Instant,
        what: &str,
        missing: Option<&[u64]>,
    ) -> super::Result<Arc<FillStatus>> {
        self.ensure_parked("loading guest RAM")?;
        self.finish_lazy_ram();
        let Some(region) = self.mem.iter().next() else {
            return Err(VmError::Config("no guest RAM".into()));
        };
        // The regions (below the PCI hole and from 4 GiB up) are one host mapping of the
        // whole RAM, the first region at its start: pc.ram offsets are mapping offsets.
        let (base, len) = (region.as_ptr() as u64, self.ram_len() as u64);
        let status = Arc::new(FillStatus::new(len / PAGE, started));
        let ctl = Arc::clone(&self.ctl);
        let threads: Vec<libc::pthread_t> = self.threads.iter().map(|t| t.as_pthread_t()).collect();
        let what = what.to_string();
        let on_fail = Box::new(move |why: &str| {
            eprintln!("vmsnap: {what} failed: {why}; the VM is stopped");
            ctl.fail(format!("{what}: {why}"));
            for &t in &threads {
                // SAFETY: the vCPU threads are joined only in `Vm::shutdown`, which stops
                // the lazy load (and so this callback's thread) first: `t` is alive.
                unsafe { libc::pthread_kill(t, run_control::kick_signal()) };
            }
        });
        // SAFETY: `base..base + len` is the VM's one private anonymous RAM mapping, all of
        // its regions (see `memory::create_ram`), owned by `self.mem`, which outlives the LazyRam: it is kept in
        // `self.lazy` and stopped in `shutdown` before the memory goes. The vCPUs are parked
        // (checked above) and the caller replaces RAM's contents.
        let ram = unsafe {
            LazyRam::start_missing(base, len, missing, source, Arc::clone(&status), on_fail)
        }
        .map_err(|e| VmError::Config(format!("lazy RAM: {e}")))?;
        let mut slot = lock(&self.lazy);
        slot.running = Some(ram);
        slot.last = Some(Arc::clone(&status));
        Ok(status)
    }

    /// Records the progress of an eager load (for `info loadvm`).
    pub fn record_ram_load(&self, status: Arc<FillStatus>) {
        lock(&self.lazy).last = Some(status);
    }

    /// Waits until a lazy load in progress has every page (or failed) and returns its end
    /// state; `None` if no lazy load was running.
    pub fn finish_lazy_ram(&self) -> Option<LoadState> {
        let running = lock(&self.lazy).running.take();
        running.map(LazyRam::finish)
    }

    /// True while a lazy load is filling guest RAM.
    pub fn lazy_ram_active(&self) -> bool {
        lock(&self.lazy)
            .running
            .as_ref()
            .is_some_and(|r| r.status().state() == LoadState::Active)
    }

    /// Progress of the last load of guest RAM, if there was one.
    pub fn ram_load_report(&self) -> Option<FillReport> {
        lock(&self.lazy).last.as_ref().map(|s| s.report())
    }

    /// Stops a lazy load without waiting for it (the VM is going away).
    pub(super) fn stop_lazy_ram(&self) {
        let running = lock(&self.lazy).running.take();
        if let Some(r) = running {
            r.stop();
        }
    }
}
