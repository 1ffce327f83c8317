//! Lazy guest RAM: the guest runs before its memory is loaded, and pages are filled on first
//! touch (QEMU's postcopy, Cloud Hypervisor's `ondemand` restore).
//!
//! ```text
//!   vCPU / KVM / device touches page P ──► userfaultfd (missing) ──► fault thread
//!                                                                   │ source.fetch(P)
//!                                                                   ▼ UFFDIO_COPY/ZEROPAGE
//!   fill thread: source.fill(sink) ──► every page not yet resident ──► UFFDIO_COPY/ZEROPAGE
//!                └─ Ok: unregister, `completed`;  Err: `failed`, the VM is stopped
//! ```
//!
//! One trait, [`PageSource`], says where pages come from: a snapshot's vmstate area (lazy
//! loadvm, `snapshot::lazy`), the migration return path (postcopy, `migrate::postcopy_pages`,
//! where only the pages pre-copy did not deliver are missing: [`LazyRam::start_missing`]). The server knows
//! nothing about streams or images. Both threads install pages; a page installed twice is
//! refused by the kernel with `EEXIST` and counted once (one resident bit per page).
//!
//! Guest RAM must be one private anonymous mapping whose pages were dropped
//! (`MADV_DONTNEED`) before the range is registered, so that every page faults once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::uffd::UffdFd;

/// Page size of lazy RAM.
pub const PAGE: u64 = 4096;

/// Receives runs of pages from [`PageSource::fill`]: `(offset, len, data)`; `data` is
/// `None` for zero pages. Returns false to stop the fill.
pub type PageSink<'a> = dyn FnMut(u64, u64, Option<&[u8]>) -> bool + 'a;

/// Where the pages come from.
pub trait PageSource: Send + Sync {
    /// Reads the page at RAM offset `offset` (page aligned) into `buf` (one page). Returns
    /// false if the page is all zero (`buf` is then left as it was).
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<bool, PageSourceError>;

    /// Hands every page of RAM to `sink`, in the order cheapest for the source, as runs:
    /// `sink(offset, len, Some(data))` with `len` bytes of data, or `sink(offset, len, None)`
    /// for zero pages. Stops early if `sink` returns false. Then verifies what only a whole
    /// pass can (a checksum); an error fails the load.
    fn fill(&self, sink: &mut PageSink<'_>) -> Result<(), PageSourceError>;
}

/// A page source failed; the message names what (the snapshot, the offset).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PageSourceError(pub String);

/// Errors starting a lazy load.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    /// `userfaultfd(2)` or `UFFDIO_API` failed.
    #[error("opening a userfaultfd: {0}")]
    Open(#[source] std::io::Error),
    /// `MADV_DONTNEED` on guest RAM failed.
    #[error("dropping guest RAM pages (MADV_DONTNEED): {0}")]
    Drop(#[source] std::io::Error),
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER of guest RAM: {0}")]
    Register(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("starting the {0} thread: {1}")]
    Spawn(&'static str, #[source] std::io::Error),
}

/// State of a load, with QEMU's migration state words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    /// Pages are still being filled.
    Active,
    /// Every page is resident.
    Completed,
    /// The load failed (the VM was stopped); why.
    Failed(String),
}

impl LoadState {
    /// `active`, `completed` or `failed`.
    pub fn word(&self) -> &'static str {
        match self {
            LoadState::Active => "active",
            LoadState::Completed => "completed",
            LoadState::Failed(_) => "failed",
        }
    }
}

/// Progress of a load of guest RAM, shared by the threads and `info loadvm`.
#[derive(Debug)]
pub struct FillStatus {
    state: Mutex<(LoadState, Option<Duration>)>,
    cond: Condvar,
    resident: AtomicU64,
    total: u64,
    started: Instant,
    resumed: Mutex<Option<Duration>>,
    bits: Vec<AtomicU64>,
}

/// A copy of [`FillStatus`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillReport {
    /// The state.
    pub state: LoadState,
    /// Pages resident.
    pub resident: u64,
    /// Pages of guest RAM.
    pub total: u64,
    /// From the start of the load to the guest's resume, once resumed.
    pub resume_time: Option<Duration>,
    /// From the start of the load to its end (or until now while active).
    pub total_time: Duration,
}

impl FillStatus {
    /// A load of `total` pages that started at `started`.
    pub fn new(total: u64, started: Instant) -> FillStatus {
        let words = usize::try_from(total.div_ceil(64)).unwrap_or(0);
        FillStatus {
            state: Mutex::new((LoadState::Active, None)),
            cond: Condvar::new(),
            resident: AtomicU64::new(0),
            total,
            started,
            resumed: Mutex::new(None),
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// An eager load that completed: every page resident.
    pub fn completed(total: u64, started: Instant, resumed: Duration) -> FillStatus {
        let s = FillStatus::new(total, started);
        s.resident.store(total, Ordering::Relaxed);
        *super::lock(&s.resumed) = Some(resumed);
        s.finish(LoadState::Completed);
        s
    }

    /// Records the time from the start to the guest's resume.
    pub fn set_resumed(&self) {
        *super::lock(&self.resumed) = Some(self.started.elapsed());
    }

    fn is_resident(&self, page: u64) -> bool {
        self.bits
            .get(usize::try_from(page / 64).unwrap_or(usize::MAX))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Marks `page` resident; counts it if it was not.
    fn mark(&self, page: u64) {
        if let Some(w) = self
            .bits
            .get(usize::try_from(page / 64).unwrap_or(usize::MAX))
        {
            let bit = 1 << (page % 64);
            if w.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                self.resident.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ends the load (the first end wins).
    fn finish(&self, state: LoadState) {
        let mut s = super::lock(&self.state);
        if s.0 == LoadState::Active {
            *s = (state, Some(self.started.elapsed()));
        }
        self.cond.notify_all();
    }

    /// The current state.
    pub fn state(&self) -> LoadState {
        super::lock(&self.state).0.clone()
    }

    /// Waits until the load is no longer active.
    pub fn wait(&self) -> LoadState {
        let mut s = super::lock(&self.state);
        while s.0 == LoadState::Active {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.0.clone()
    }

    /// A copy of the progress now.
    pub fn report(&self) -> FillReport {
        let (state, ended) = super::lock(&self.state).clone();
        FillReport {
            state,
            resident: self.resident.load(Ordering::Relaxed),
            total: self.total,
            resume_time: *super::lock(&self.resumed),
            total_time: ended.unwrap_or_else(|| self.started.elapsed()),
        }
    }
}

/// Drops the missing pages of `[base, base + len)` (all of them for `None`) and marks the
/// others resident. A kept page that was never touched is read once, so that it is mapped
/// (to the shared zero page) and never raises a missing-page fault the source would not
/// answer.
///
/// # Safety
///
/// `[base, base + len)` is one private anonymous mapping whose missing pages may be emptied.
unsafe fn drop_missing(
    base: u64,
    len: u64,
    missing: Option<&[u64]>,
    status: &FillStatus,
) -> Result<(), PageServerError> {
    let drop_run = |from: u64, to: u64| {
        let ptr = (base + from * PAGE) as *mut libc::c_void;
        let n = usize::try_from((to - from) * PAGE).unwrap_or(usize::MAX);
        // SAFETY: the run lies inside the caller's mapping; MADV_DONTNEED only drops its
        // pages (they read as missing after).
        if unsafe { libc::madvise(ptr, n, libc::MADV_DONTNEED) } != 0 {
            return Err(PageServerError::Drop(std::io::Error::last_os_error()));
        }
        Ok(())
    };
    let pages = len / PAGE;
    let Some(missing) = missing else {
        return drop_run(0, pages);
    };
    let is_missing = |p: u64| {
        missing
            .get(usize::try_from(p / 64).unwrap_or(usize::MAX))
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    };
    let mut p = 0;
    while p < pages {
        let run_start = p;
        let gone = is_missing(p);
        while p < pages && is_missing(p) == gone {
            if !gone {
                // SAFETY: inside the caller's mapping, which is readable.
                unsafe { std::ptr::read_volatile((base + p * PAGE) as *const u8) };
                status.mark(p);
            }
            p += 1;
        }
        if gone {
            drop_run(run_start, p)?;
        }
    }
    Ok(())
}

/// Guest RAM being filled lazily: the userfaultfd, the fault and fill threads.
#[derive(Debug)]
pub struct LazyRam {
    status: Arc<FillStatus>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What the threads share.
struct Shared {
    uffd: UffdFd,
    base: u64,
    len: u64,
    source: Arc<dyn PageSource>,
    status: Arc<FillStatus>,
    stop: Arc<AtomicBool>,
    on_fail: Box<dyn Fn(&str) + Send + Sync>,
}

impl Shared {
    /// Installs `len` bytes at RAM offset `off` from `data` (or zero pages), skipping the
    /// pages already resident; marks them resident.
    fn install(&self, off: u64, len: u64, data: Option<&[u8]>) -> std::io::Result<()> {
        let mut p = 0;
        while p < len {
            let page = (off + p) / PAGE;
            if self.status.is_resident(page) {
                p += PAGE;
                continue;
            }
            // The run of pages from here that are not resident yet.
            let mut q = p + PAGE;
            while q < len && !self.status.is_resident((off + q) / PAGE) {
                q += PAGE;
            }
            let dst = self.base + off + p;
            let done = match data {
                Some(d) => {
                    let from = usize::try_from(p).unwrap_or(usize::MAX);
                    let to = usize::try_from(q).unwrap_or(usize::MAX);
                    self.uffd.copy(dst, &d[from..to])?
                }
                None => self.uffd.zeropage(dst, q - p)?,
            };
            // EEXIST: the first page was installed by the other thread (it marks it).
            let done = if done == 0 { PAGE } else { done };
            for i in 0..done / PAGE {
                self.status.mark(page + i);
            }
            p += done;
        }
        Ok(())
    }

    fn fail(&self, why: String) {
        if self.status.state() == LoadState::Active {
            (self.on_fail)(&why);
            self.status.finish(LoadState::Failed(why));
        }
    }

    /// The fault thread: serves faults until the load ends or is stopped.
    fn serve_faults(&self) {
        let mut buf = vec![0u8; PAGE as usize];
        while !self.stop.load(Ordering::Acquire) && self.status.state() == LoadState::Active {
            let addr = match self.uffd.next_fault(50) {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(e) => return self.fail(format!("reading page faults: {e}")),
            };
            let Some(off) = addr
                .checked_sub(self.base)
                .filter(|o| *o < self.len)
                .map(|o| o & !(PAGE - 1))
            else {
                continue;
            };
            let r = if self.status.is_resident(off / PAGE) {
                self.uffd.wake(self.base + off, PAGE)
            } else {
                match self.source.fetch(off, &mut buf) {
                    Ok(true) => self.install(off, PAGE, Some(&buf)),
                    Ok(false) => self.install(off, PAGE, None),
                    Err(e) => return self.fail(e.0),
                }
            };
            if let Err(e) = r {
                return self.fail(format!("installing page {off:#x}: {e}"));
            }
        }
    }

    /// The fill thread: every page, then the source's final check.
    fn fill(&self) {
        let mut err = None;
        let r = self.source.fill(&mut |off, len, data| {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            let ok = off.checked_add(len).is_some_and(|end| end <= self.len)
                && data.map_or(true, |d| d.len() as u64 == len);
            if !ok {
                err = Some(format!("page run {off:#x}+{len:#x} outside guest RAM"));
                return false;
            }
            match self.install(off, len, data) {
                Ok(()) => true,
                Err(e) => {
                    err = Some(format!("installing pages at {off:#x}: {e}"));
                    false
                }
            }
        });
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        match (r, err) {
            (_, Some(e)) | (Err(PageSourceError(e)), None) => self.fail(e),
            (Ok(()), None) if self.status.resident.load(Ordering::Relaxed) < self.status.total => {
                self.fail(format!(
                    "the source delivered {} of {} pages",
                    self.status.resident.load(Ordering::Relaxed),
                    self.status.total
                ));
            }
            (Ok(()), None) => {
                // Every page is in: plain memory again.
                let _ = self.uffd.unregister(self.base, self.len);
                self.status.finish(LoadState::Completed);
            }
        }
    }
}

impl LazyRam {
    /// Drops every page of the RAM mapping `[base, base + len)`, registers it with a new
    /// userfaultfd and starts the fault and fill threads, which take pages from `source`.
    /// `on_fail` is called (once) if the load fails, to stop the VM; the message names
    /// the cause.
    ///
    /// # Safety
    ///
    /// `[base, base + len)` must be one private anonymous mapping, page aligned, that stays
    /// mapped until [`LazyRam::stop`] returned, and whose contents the caller wants replaced
    /// (the VM is paused).
    pub unsafe fn start(
        base: u64,
        len: u64,
        source: Arc<dyn PageSource>,
        status: Arc<FillStatus>,
        on_fail: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<LazyRam, PageServerError> {
        // SAFETY: the caller's guarantees are ours.
        unsafe { Self::start_missing(base, len, None, source, status, on_fail) }
    }

    /// [`LazyRam::start`] for RAM that is already loaded except for some pages (postcopy:
    /// the pages pre-copy had not sent, or sent before they changed again). Bit i of
    /// `missing` set = page i must come from `source`; the other pages keep their contents
    /// and count as resident. `None` = every page is missing.
    ///
    /// # Safety
    ///
    /// As [`LazyRam::start`]; the caller wants the missing pages' contents replaced.
    pub unsafe fn start_missing(
        base: u64,
        len: u64,
        missing: Option<&[u64]>,
        source: Arc<dyn PageSource>,
        status: Arc<FillStatus>,
        on_fail: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<LazyRam, PageServerError> {
        let uffd = UffdFd::open().map_err(PageServerError::Open)?;
        // SAFETY: the caller guarantees the range is one private anonymous mapping whose
        // missing pages it wants emptied.
        unsafe { drop_missing(base, len, missing, &status) }?;
        uffd.register(base, len)
            .map_err(PageServerError::Register)?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            uffd,
            base,
            len,
            source,
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
            on_fail,
        });
        let mut threads = Vec::new();
        for (name, run) in [
            ("page-fault", Shared::serve_faults as fn(&Shared)),
            ("page-fill", Shared::fill as fn(&Shared)),
        ] {
            let sh = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || run(&sh))
                .map_err(|e| PageServerError::Spawn(name, e));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let ram = LazyRam {
                        status,
                        stop,
                        threads,
                    };
                    ram.stop();
                    return Err(e);
                }
            }
        }
        Ok(LazyRam {
            status,
            stop,
            threads,
        })
    }

    /// The load's progress.
    pub fn status(&self) -> &Arc<FillStatus> {
        &self.status
    }

    /// Waits for the fill to end (completed or failed) and joins the threads.
    pub fn finish(self) -> LoadState {
        let state = self.status.wait();
        self.join();
        state
    }

    /// Stops the threads, whether the fill is done or not (the VM is going away), and joins
    /// them. Closing the userfaultfd wakes any thread still waiting on a fault.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let status = Arc::clone(&self.status);
        self.join();
        status.finish(LoadState::Failed(
            "stopped before the load completed".into(),
        ));
    }

    fn join(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
