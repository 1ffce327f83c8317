//! Pausing and resuming vCPU threads the way QEMU's `cpu_pause`/`cpu_resume` do: a stop flag
//! that each vCPU thread checks before every `KVM_RUN`, plus a kick (a real-time signal whose
//! handler sets `kvm_run.immediate_exit`) to get a thread out of `KVM_RUN`.
//!
//! Setting `immediate_exit` from the handler closes the race where the signal arrives after the
//! thread checked the flag but before it entered the kernel: KVM then returns `EINTR` at once.
//! A thread that parks after a port-I/O exit first re-enters `KVM_RUN` with `immediate_exit`
//! set, which completes the pending I/O (the data of an `in` reaches the guest register)
//! without running guest code, so the state captured while parked is consistent.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

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
