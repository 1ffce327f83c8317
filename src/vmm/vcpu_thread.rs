//! The body of a vCPU thread: `KVM_RUN` in a loop, port I/O to the devices, parking when
//! [`super::Vm::pause`] asks (see [`super::run_control`] for the protocol), and sleeping
//! between running slices while throttled ([`super::Vm::set_throttle`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use super::devices::{self, control::ControlShared, Devices};
use super::lock;
use super::run_control::{self, KickTimer, Next, RunControl};
use super::vcpu::Vcpu;

/// What one vCPU thread owns.
pub(crate) struct VcpuThread {
    pub(crate) vcpu: Arc<Mutex<Vcpu>>,
    pub(crate) ctl: Arc<RunControl>,
    pub(crate) devices: Arc<Mutex<Devices>>,
    pub(crate) control: Arc<ControlShared>,
}

impl VcpuThread {
    /// The thread's body: registers the kick target, runs until told to exit or a failure.
    pub(crate) fn run(self) {
        let run_ptr = {
            let mut v = lock(&self.vcpu);
            std::ptr::from_mut(v.fd.get_kvm_run())
        };
        // SAFETY: `run_ptr` is the kvm_run mapping of `self.vcpu`, which this thread keeps
        // alive (Arc) until after `unregister_kvm_run` below.
        unsafe { run_control::register_kvm_run(run_ptr) };
        let failure = self.run_loop().err();
        run_control::unregister_kvm_run();
        self.ctl.thread_exited(failure);
    }

    fn run_loop(&self) -> std::result::Result<(), String> {
        let mut pending_io = false;
        let mut throttle = Throttle::default();
        loop {
            match self.ctl.next() {
                Next::Exit => return Ok(()),
                Next::Park => {
                    throttle.stop();
                    if pending_io {
                        self.complete_pending_io()?;
                        pending_io = false;
                    }
                    if !self.ctl.park() {
                        return Ok(());
                    }
                }
                Next::Run => {
                    throttle.before_run(&self.ctl);
                    pending_io = self.run_once()?;
                }
            }
        }
    }

    /// Re-enters KVM_RUN with immediate_exit set: KVM finishes the last port I/O and returns
    /// EINTR without running guest code.
    fn complete_pending_io(&self) -> std::result::Result<(), String> {
        let mut v = lock(&self.vcpu);
        v.fd.set_kvm_immediate_exit(1);
        let r = v.fd.run().map(|_| ());
        v.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() != libc::EINTR => Err(format!(
                "vCPU {}: completing I/O before pausing: {e}",
                v.index
            )),
            _ => Ok(()),
        }
    }

    /// One KVM_RUN. Returns whether the exit was port I/O (to be completed on the next entry).
    fn run_once(&self) -> std::result::Result<bool, String> {
        let mut v = lock(&self.vcpu);
        let index = v.index;
        let unexpected = match v.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                lock(&self.devices).pio_write(port, data);
                let fault = self.control.fault();
                if fault != 0 {
                    format!("guest reported an unexpected exception (marker {fault:#x})")
                } else {
                    return Ok(true);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) if port == devices::IDLE_PORT => {
                data.fill(0);
                drop(v);
                std::thread::sleep(devices::control::IDLE);
                return Ok(true);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                lock(&self.devices).pio_read(port, data);
                return Ok(true);
            }
            Ok(VcpuExit::Hlt) => {
                drop(v);
                std::thread::sleep(Duration::from_millis(1));
                return Ok(false);
            }
            Ok(VcpuExit::Intr) => return Ok(false),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                v.fd.set_kvm_immediate_exit(0);
                return Ok(false);
            }
            Ok(exit) => format!("unexpected exit {exit:?}"),
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        let rip = v.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        Err(format!("vCPU {index}: {unexpected} at rip {rip:#x}"))
    }
}

/// Per-thread throttling state: when the current running slice began, and the kick timer
/// that ends each slice (created on first use, armed only while throttled and running).
#[derive(Debug, Default)]
struct Throttle {
    slice_start: Option<Instant>,
    timer: Option<KickTimer>,
    timer_failed: bool,
    armed: bool,
}

impl Throttle {
    /// Before each KVM_RUN: sleeps if the running slice is over, keeps the kick timer in step
    /// with the throttle percentage.
    fn before_run(&mut self, ctl: &RunControl) {
        let pct = ctl.throttle();
        if pct == 0 {
            self.stop();
            return;
        }
        let now = Instant::now();
        let start = *self.slice_start.get_or_insert(now);
        let mut rephase = !self.armed;
        if now.duration_since(start) >= run_control::THROTTLE_TIMESLICE {
            ctl.throttle_sleep(run_control::throttle_sleep_for(pct));
            self.slice_start = Some(Instant::now());
            rephase = true;
        }
        if rephase {
            // Restart the timer with the slice, so that its kick ends this very slice.
            self.arm(Some(run_control::THROTTLE_TIMESLICE));
        }
    }

    /// Not throttled (or parking): no slice, no timer.
    fn stop(&mut self) {
        self.slice_start = None;
        if self.armed {
            self.arm(None);
        }
    }

    fn arm(&mut self, interval: Option<Duration>) {
        if self.timer.is_none() && !self.timer_failed {
            match KickTimer::for_current_thread() {
                Ok(t) => self.timer = Some(t),
                Err(e) => {
                    // Without the timer the vCPU still sleeps at its next exit.
                    eprintln!("vmsnap: cannot create the vCPU throttle timer: {e}");
                    self.timer_failed = true;
                }
            }
        }
        if let Some(t) = &self.timer {
            let ok = t.set(interval).is_ok();
            self.armed = interval.is_some() && ok;
        }
    }
}
