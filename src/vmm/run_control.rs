//! Pausing and resuming vCPU threads the way QEMU's `cpu_pause`/`cpu_resume` do: a stop flag
//! that each vCPU thread checks before every `KVM_RUN`, plus a kick (a real-time signal whose
//! handler sets `kvm_run.immediate_exit`) to get a thread out of `KVM_RUN`.
//!
//! Setting `immediate_exit` from the handler closes the race where the signal arrives after the
//! thread checked the flag but before it entered the kernel: KVM then returns `EINTR` at once.
//! A thread that parks after a port-I/O exit first re-enters `KVM_RUN` with `immediate_exit`
//! set, which completes the pending I/O (the data of an `in` reaches the guest register)
//! without running guest code, so the state captured while parked is consistent.
//!
//! Throttling (auto-converge) follows QEMU's `cpu_throttle`: a throttled vCPU runs for a
//! timeslice of [`THROTTLE_TIMESLICE`], then sleeps `pct / (100 - pct)` timeslices. A per-thread
//! [`KickTimer`] sends the kick signal every timeslice so that a guest that never exits still
//! leaves `KVM_RUN` to take its sleep; the sleep ends early when a pause or exit is requested.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

thread_local! {
    /// The `kvm_run` area of the vCPU this thread runs, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: the first real-time signal.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_sig: libc::c_int) {
    // `try_with` does not allocate for a const-initialised thread local without destructor.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` was registered by this very thread with `register_kvm_run` and
            // points into the vCPU's mmap-ed `kvm_run` area, which stays mapped until the
            // thread unregisters it; a byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process (without `SA_RESTART`, so blocking calls return
/// `EINTR`).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = kick_handler as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = 0;
        // SAFETY: `act` is fully initialised, the handler only touches async-signal-safe
        // state, and a null old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// Makes the kick handler of the calling thread target `run`.
///
/// # Safety
///
/// `run` must point to the `kvm_run` mapping of a vCPU that stays mapped until
/// [`unregister_kvm_run`] is called on this same thread.
pub unsafe fn register_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

/// Stops the kick handler of the calling thread from touching any `kvm_run`.
pub fn unregister_kvm_run() {
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// Length of the running slice of a throttled vCPU (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);

/// How long a vCPU throttled at `percent` sleeps after each running slice:
/// `percent / (100 - percent)` timeslices (0 when not throttled; `percent` is clamped to 99).
pub fn throttle_sleep_for(percent: u32) -> Duration {
    let pct = percent.min(99);
    THROTTLE_TIMESLICE * pct / (100 - pct)
}

/// A POSIX timer that sends the kick signal to the thread that created it.
#[derive(Debug)]
pub struct KickTimer {
    id: libc::timer_t,
}

impl KickTimer {
    /// Creates a disarmed timer targeting the calling thread.
    pub fn for_current_thread() -> std::io::Result<KickTimer> {
        // SAFETY: a zeroed `sigevent` is a valid "no notification" value; every field read by
        // the kernel for SIGEV_THREAD_ID is set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are live, initialised values the call reads and writes; the
        // kick signal's handler is installed before any vCPU thread runs.
        let rc = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(KickTimer { id })
    }

    /// Fires every `interval`, or never with `None`.
    pub fn set(&self, interval: Option<Duration>) -> std::io::Result<()> {
        let d = interval.unwrap_or(Duration::ZERO);
        let ts = libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(d.subsec_nanos()),
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `self.id` is a timer created by `timer_create` and not yet deleted; `spec`
        // is a live value and a null old-value pointer is allowed.
        let rc = unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` came from `timer_create` and is deleted only here, once.
        unsafe { libc::timer_delete(self.id) };
    }
}

/// What a vCPU thread should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Enter the guest.
    Run,
    /// Complete pending I/O, then park.
    Park,
    /// Leave the thread.
    Exit,
}

#[derive(Debug, Default)]
struct Flags {
    pause: bool,
    exit: bool,
    parked: usize,
    live: usize,
    failure: Option<String>,
}

/// Shared stop flag, parked-thread count and the first fatal vCPU error.
#[derive(Debug, Default)]
pub struct RunControl {
    flags: Mutex<Flags>,
    cond: Condvar,
    /// Percentage of time the vCPUs should sleep (auto-converge); 0 = not throttled.
    throttle: std::sync::atomic::AtomicU32,
}

impl RunControl {
    /// A control for `threads` vCPU threads that start paused.
    pub fn new(threads: usize) -> Self {
        RunControl {
            flags: Mutex::new(Flags {
                pause: true,
                live: threads,
                ..Default::default()
            }),
            cond: Condvar::new(),
            throttle: Default::default(),
        }
    }

    /// Sets the throttle percentage (clamped to 0..=99).
    pub fn set_throttle(&self, percent: u32) {
        self.throttle
            .store(percent.min(99), std::sync::atomic::Ordering::Relaxed);
    }

    /// The throttle percentage.
    pub fn throttle(&self) -> u32 {
        self.throttle.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Flags> {
        // A poisoned lock only means a vCPU thread panicked; the flags are still coherent.
        self.flags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a throttled vCPU thread after a running slice: sleeps `d`, or less if a pause
    /// or exit is requested meanwhile.
    pub fn throttle_sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut f = self.lock();
        while !f.pause && !f.exit {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            f = self
                .cond
                .wait_timeout(f, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Called by a vCPU thread before each `KVM_RUN`.
    pub fn next(&self) -> Next {
        let f = self.lock();
        if f.exit {
            Next::Exit
        } else if f.pause {
            Next::Park
        } else {
            Next::Run
        }
    }

    /// Called by a vCPU thread: waits while paused. Returns `false` if the thread should exit.
    pub fn park(&self) -> bool {
        let mut f = self.lock();
        f.parked += 1;
        self.cond.notify_all();
        while f.pause && !f.exit {
            f = self.cond.wait(f).unwrap_or_else(|e| e.into_inner());
        }
        f.parked -= 1;
        !f.exit
    }

    /// Called by a vCPU thread when it leaves, with the reason if it failed.
    pub fn thread_exited(&self, failure: Option<String>) {
        let mut f = self.lock();
        f.live -= 1;
        if f.failure.is_none() {
            f.failure = failure;
        }
        self.cond.notify_all();
    }

    /// Sets the stop flag. The caller then kicks every thread and calls
    /// [`RunControl::wait_parked`].
    pub fn request_pause(&self) {
        self.lock().pause = true;
        // Wakes threads sleeping in `throttle_sleep`.
        self.cond.notify_all();
    }

    /// Waits until every live vCPU thread is parked; `false` on timeout.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let f = self.lock();
        let (f, res) = self
            .cond
            .wait_timeout_while(f, timeout, |f| f.parked < f.live)
            .unwrap_or_else(|e| e.into_inner());
        drop(f);
        !res.timed_out()
    }

    /// Clears the stop flag and wakes the parked threads.
    pub fn resume(&self) {
        self.lock().pause = false;
        self.cond.notify_all();
    }

    /// Records a fatal error found outside the vCPU threads (a lazy RAM load that failed)
    /// and stops the vCPUs; the caller kicks them.
    pub fn fail(&self, why: String) {
        let mut f = self.lock();
        if f.failure.is_none() {
            f.failure = Some(why);
        }
        f.pause = true;
        self.cond.notify_all();
    }

    /// Asks every thread to leave.
    pub fn request_exit(&self) {
        self.lock().exit = true;
        self.cond.notify_all();
    }

    /// Whether the stop flag is set.
    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }

    /// The first fatal vCPU error, if any.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Number of vCPU threads still running their loop.
    pub fn live_threads(&self) -> usize {
        self.lock().live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn throttle_sleep_follows_qemus_ratio() {
        assert_eq!(throttle_sleep_for(0), Duration::ZERO);
        assert_eq!(throttle_sleep_for(20), Duration::from_micros(2500));
        assert_eq!(throttle_sleep_for(50), Duration::from_millis(10));
        assert_eq!(throttle_sleep_for(99), Duration::from_millis(990));
        assert_eq!(throttle_sleep_for(150), Duration::from_millis(990));
    }

    #[test]
    fn throttle_sleep_ends_early_on_pause_and_exit() {
        let ctl = Arc::new(RunControl::new(1));
        ctl.resume();
        let t = Instant::now();
        ctl.throttle_sleep(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30));

        // A pause and an exit request each cut a long throttle sleep short.
        let wake: [fn(&RunControl); 2] = [RunControl::request_pause, RunControl::request_exit];
        for request in wake {
            ctl.resume();
            let c = Arc::clone(&ctl);
            let sleeper = std::thread::spawn(move || {
                let t = Instant::now();
                c.throttle_sleep(Duration::from_secs(10));
                t.elapsed()
            });
            std::thread::sleep(Duration::from_millis(50));
            request(&ctl);
            assert!(sleeper.join().unwrap() < Duration::from_secs(5));
        }
    }

    #[test]
    fn kick_timer_interrupts_a_blocking_call() {
        install_kick_handler().unwrap();
        let timer = KickTimer::for_current_thread().unwrap();
        timer.set(Some(Duration::from_millis(20))).unwrap();
        // A blocking read of a pipe nobody writes returns EINTR once the timer fires (the
        // handler is installed without SA_RESTART).
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut b = [0u8; 1];
        // SAFETY: `b` is a live one-byte buffer and `fds[0]` the pipe's read end.
        let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        let err = std::io::Error::last_os_error();
        timer.set(None).unwrap();
        // SAFETY: both descriptors came from pipe() above and are closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(n, -1);
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
    }

    #[test]
    fn pause_waits_for_every_thread_and_resume_releases_them() {
        let ctl = Arc::new(RunControl::new(2));
        let mut handles = Vec::new();
        for _ in 0..2 {
            let c = Arc::clone(&ctl);
            handles.push(std::thread::spawn(move || {
                let mut rounds = 0u32;
                loop {
                    match c.next() {
                        Next::Run => {
                            rounds += 1;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Next::Park => {
                            if !c.park() {
                                break;
                            }
                        }
                        Next::Exit => break,
                    }
                }
                c.thread_exited(None);
                rounds
            }));
        }
        assert!(
            ctl.wait_parked(Duration::from_secs(5)),
            "threads start parked"
        );
        ctl.resume();
        std::thread::sleep(Duration::from_millis(20));
        ctl.request_pause();
        assert!(ctl.wait_parked(Duration::from_secs(5)));
        assert!(ctl.is_paused());
        ctl.request_exit();
        let rounds: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(rounds > 0);
        assert_eq!(ctl.live_threads(), 0);
        assert_eq!(ctl.failure(), None);
    }
}
