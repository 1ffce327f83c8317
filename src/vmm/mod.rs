//! A small KVM virtual machine monitor. The only module where `unsafe` is allowed.
//!
//! ```text
//!  Vm ── VmFd (irqchip, PIT, clock: vm.rs)      guest RAM (memory.rs, one mmap, slot 0)
//!   ├── Vcpu × n, one thread each (vcpu.rs; paused/resumed by run_control.rs)
//!   ├── Devices on the port-I/O bus (devices/: serial, pvblock per drive, control)
//!   └── Guest image and long-mode tables written at boot (guest/)
//! ```
//!
//! A VM is created paused: [`Vm::start`] (or [`Vm::resume`]) lets the vCPUs run,
//! [`Vm::pause`] parks them all at a safe point, [`Vm::save_state`] then captures everything
//! except RAM (read it through [`Vm::guest_memory`]), and [`Vm::restore_state`] applies such a
//! state to a freshly created, paused VM built from the same configuration, possibly in
//! another process. The capture is documented in `formats/vm-state-capture.md`.

pub mod devices;
pub mod fd_passing;
pub mod guest;
mod lazy_ram;
pub mod memory;
pub mod page_server;
pub mod run_control;
pub mod termination;
pub mod uffd;
pub mod vcpu;
mod vcpu_thread;
pub mod vm;
pub mod vmstate;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::block::{BlockDriver, BlockSet, Device};
use devices::control::ControlShared;
use devices::{Control, DeviceStates, Devices, DevicesError, PvBlock, Serial, SerialOut};
pub use guest::Guest;
use run_control::RunControl;
use vcpu::{Vcpu, VcpuError, VcpuState};
use vm::{VmArchState, VmIoctlError};

/// How long [`Vm::pause`] waits for the vCPUs to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to build.
#[derive(Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Disks, in order; drive `i` is the paravirtual block device `i`.
    pub drives: Vec<Box<dyn BlockDriver>>,
    /// Where the serial console goes.
    pub serial: SerialOut,
    /// The built-in guest to boot.
    pub guest: Guest,
}

/// Everything needed to resume a paused VM, except guest RAM.
#[derive(Debug, Clone)]
pub struct VmState {
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// In-kernel PIC/IOAPIC, PIT and kvmclock.
    pub arch: VmArchState,
    /// Emulated devices.
    pub devices: DeviceStates,
}

/// Run state as the monitor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// A vCPU stopped on an error (the first one is given).
    Failed(String),
}

/// Errors of VM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A system-level KVM ioctl failed.
    #[error("{ioctl} failed: {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM-wide ioctl failed.
    #[error(transparent)]
    VmIoctl(#[from] VmIoctlError),
    /// A vCPU ioctl failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Guest(#[from] guest::GuestError),
    /// A device state could not be applied.
    #[error(transparent)]
    Devices(#[from] DevicesError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Setting up the serial output or the kick signal failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operation needs the vCPUs parked.
    #[error("the VM must be paused for {0}")]
    NotPaused(&'static str),
    /// The vCPUs did not park in time.
    #[error("vCPUs did not stop within {0:?}")]
    PauseTimeout(Duration),
    /// The saved state does not fit this VM.
    #[error("saved state has {saved} vCPUs, this VM has {present}")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs here.
        present: usize,
    },
    /// A vCPU thread could not be started.
    #[error("spawning the thread of vCPU {index}: {source}")]
    Spawn {
        /// vCPU index.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of VM operations.
pub type Result<T> = std::result::Result<T, VmError>;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = guest::long_mode::MAX_VCPUS;

/// A running (or paused) virtual machine.
#[derive(Debug)]
pub struct Vm {
    /// Guest RAM being loaded lazily, and the last load's progress (`info loadvm`).
    lazy: Mutex<lazy_ram::LazySlot>,
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    threads: Vec<JoinHandle<()>>,
    ctl: Arc<RunControl>,
    devices: Arc<Mutex<Devices>>,
    control: Arc<ControlShared>,
    msr_list: Vec<u32>,
    /// kvmclock read when the vCPUs were last paused; written back on resume so the guest's
    /// clock does not advance while it is stopped (QEMU's kvmclock vm-state handler).
    paused_clock: Mutex<Option<kvm_bindings::kvm_clock_data>>,
    /// Pages the devices wrote by DMA while dirty logging is on.
    dma_dirty: Arc<memory::DmaDirtyLog>,
    /// Indexes of the drives whose contents savevm keeps in the VM state (`capture=on`).
    captured: Mutex<Vec<usize>>,
    /// Why the VM is paused, when it is for a migration (`inmigrate`, `finish-migrate`,
    /// `postmigrate`, as QEMU's `info status` shows); cleared on resume.
    pause_reason: Mutex<Option<&'static str>>,
    // Keeps /dev/kvm open for as long as the VM exists.
    _kvm: Kvm,
    /// The mapping under guest RAM when it is split around the PCI hole (see
    /// `memory::create_ram`). Declared last: dropped after `mem` and the devices' clones of
    /// it, once the vCPU threads are joined.
    _ram_owner: Option<memory::RamMapping>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means a vCPU thread panicked; the data itself is still usable for shutdown.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vm {
    /// Builds a VM: KVM objects, RAM, devices, the guest image and boot registers. The vCPU
    /// threads exist but are parked until [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Vm> {
        Self::new_with_ram_file(config, None)
    }

    /// [`Vm::new`] with guest RAM first filled from `ram_file` (exactly the RAM size; see
    /// [`memory::fill_from_file`]); the guest image is loaded on top of it.
    pub fn new_with_ram_file(config: VmConfig, ram_file: Option<&std::path::Path>) -> Result<Vm> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs requested, 1..={MAX_VCPUS} supported",
                config.vcpus
            )));
        }
        run_control::install_kick_handler().map_err(|source| VmError::Io {
            what: "installing the vCPU kick handler",
            source,
        })?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(|source| VmError::Kvm {
            ioctl: "KVM_CREATE_VM",
            source,
        })?;
        vm::create_irqchip_and_pit(&vm)?;
        let (mem, ram_owner) = memory::create_ram(config.mem_size)?;
        if let Some(path) = ram_file {
            memory::fill_from_file(&mem, path)?;
        }
        memory::register(&vm, &mem, false)?;
        config.guest.load(&mem, config.vcpus)?;

        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                ioctl: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|source| VmError::Kvm {
                ioctl: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let fd = vm
                .create_vcpu(index as u64)
                .map_err(|source| VmError::Kvm {
                    ioctl: "KVM_CREATE_VCPU",
                    source,
                })?;
            let vcpu = Vcpu::new(index, fd);
            vcpu.set_cpuid(&cpuid)?;
            let sregs = config.guest.initial_sregs(index, &vcpu.sregs()?);
            vcpu.set_boot_state(&config.guest.initial_regs(index), &sregs)?;
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }

        let serial = Serial::new(&config.serial).map_err(|source| VmError::Io {
            what: "opening the serial output",
            source,
        })?;
        let control = Control::new();
        let control_shared = control.shared();
        let dma_dirty = Arc::new(memory::DmaDirtyLog::new(config.mem_size));
        let blocks = config
            .drives
            .into_iter()
            .map(|d| PvBlock::new(d, mem.clone(), Arc::clone(&dma_dirty)))
            .collect();
        let devices = Arc::new(Mutex::new(Devices {
            serial,
            blocks,
            control,
        }));

        let ctl = Arc::new(RunControl::new(config.vcpus));
        let mut vm = Vm {
            lazy: Mutex::new(lazy_ram::LazySlot::default()),
            vm,
            mem,
            vcpus,
            threads: Vec::new(),
            ctl,
            devices,
            control: control_shared,
            msr_list,
            paused_clock: Mutex::new(None),
            dma_dirty,
            captured: Mutex::new(Vec::new()),
            pause_reason: Mutex::new(None),
            _kvm: kvm,
            _ram_owner: ram_owner,
        };
        vm.spawn_threads()?;
        Ok(vm)
    }

    fn spawn_threads(&mut self) -> Result<()> {
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let ctx = vcpu_thread::VcpuThread {
                vcpu: Arc::clone(vcpu),
                ctl: Arc::clone(&self.ctl),
                devices: Arc::clone(&self.devices),
                control: Arc::clone(&self.control),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || ctx.run())
                .map_err(|source| VmError::Spawn { index, source })?;
            self.threads.push(handle);
        }
        // Threads start parked; wait so that a pause/save right after new() is consistent.
        if !self.ctl.wait_parked(PAUSE_TIMEOUT) {
            return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        Ok(())
    }

    /// Lets the vCPUs run (the VM is created paused).
    pub fn start(&self) {
        self.resume();
    }

    /// Resumes parked vCPUs. The kvmclock continues from where it was when they stopped.
    pub fn resume(&self) {
        *lock(&self.pause_reason) = None;
        if let Some(clock) = lock(&self.paused_clock).take() {
            // If this fails, the guest clock jumps by the paused time: not fatal.
            let _ = vm::restore_clock(&self.vm, &clock);
        }
        self.ctl.resume();
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined yet
            // (joining only happens in `shutdown`, which consumes the handles), so it is
            // valid; the kick signal's handler is installed process-wide in `new`.
            unsafe { libc::pthread_kill(t.as_pthread_t(), run_control::kick_signal()) };
        }
    }

    /// Stops every vCPU at a safe point (pending port I/O completed) and waits until all are
    /// parked.
    pub fn pause(&self) -> Result<()> {
        self.ctl.request_pause();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            self.kick_all();
            if self.ctl.wait_parked(Duration::from_millis(20)) {
                let mut clock = lock(&self.paused_clock);
                if clock.is_none() {
                    *clock = Some(vm::get_clock(&self.vm)?);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
    }

    /// Current run state.
    pub fn status(&self) -> VmStatus {
        if let Some(f) = self.ctl.failure() {
            VmStatus::Failed(f)
        } else if self.ctl.is_paused() {
            VmStatus::Paused
        } else {
            VmStatus::Running
        }
    }

    /// Records why the VM is paused (QEMU's run state name, shown by `info status` as
    /// `paused (REASON)`); [`Vm::resume`] clears it.
    pub fn set_pause_reason(&self, reason: Option<&'static str>) {
        *lock(&self.pause_reason) = reason;
    }

    /// The reason given to [`Vm::set_pause_reason`], if the VM has not resumed since.
    pub fn pause_reason(&self) -> Option<&'static str> {
        *lock(&self.pause_reason)
    }

    fn ensure_parked(&self, what: &'static str) -> Result<()> {
        if !self.ctl.is_paused() || !self.ctl.wait_parked(PAUSE_TIMEOUT) {
            return Err(VmError::NotPaused(what));
        }
        Ok(())
    }

    /// Captures the state of a paused VM (everything but RAM).
    pub fn save_state(&self) -> Result<VmState> {
        self.ensure_parked("save_state")?;
        let devices = lock(&self.devices).save();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(lock(v).save_state(&self.msr_list)?);
        }
        let mut arch = vm::save(&self.vm)?;
        if let Some(clock) = *lock(&self.paused_clock) {
            arch.clock = clock;
        }
        Ok(VmState {
            vcpus,
            arch,
            devices,
        })
    }

    /// Applies a saved state to this paused VM (built from the same configuration). Guest RAM
    /// is restored separately through [`Vm::guest_memory`]. Order: irqchip and PIT, devices,
    /// vCPUs, clock (see [`vm`] and [`vcpu`]). On error the VM may be partly restored: discard
    /// it (QEMU likewise refuses to continue after a failed `loadvm`).
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        self.ensure_parked("restore_state")?;
        if state.vcpus.len() != self.vcpus.len() {
            return Err(VmError::VcpuCount {
                saved: state.vcpus.len(),
                present: self.vcpus.len(),
            });
        }
        vm::restore_irqchip_and_pit(&self.vm, &state.arch)?;
        lock(&self.devices).restore(&state.devices)?;
        for (v, st) in self.vcpus.iter().zip(&state.vcpus) {
            lock(v).restore_state(st)?;
        }
        vm::restore_clock(&self.vm, &state.arch.clock)?;
        *lock(&self.paused_clock) = Some(state.arch.clock);
        Ok(())
    }

    /// Guest RAM (shared with the vCPUs; read or write it only while paused for a
    /// consistent picture).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Number of drives (paravirtual block devices).
    pub fn drive_count(&self) -> usize {
        lock(&self.devices).blocks.len()
    }

    /// Guest RAM as one byte slice (GPA 0 up), for saving it without a copy. Read it only
    /// while the VM is paused for a consistent picture.
    pub fn ram(&self) -> &[u8] {
        let region = self.mem.iter().next();
        let len = self.ram_len();
        match region {
            // SAFETY: the regions are one anonymous mapping of `len` bytes, the first region
            // at its start (memory::create_ram), owned by `self.mem` or `self._ram_owner`,
            // which live as long as the returned borrow of `self`. The vCPUs may write it
            // concurrently while running (callers read it while paused, when they cannot);
            // the bytes are plain data, every value is valid.
            Some(r) => unsafe { std::slice::from_raw_parts(r.as_ptr(), len) },
            None => &[],
        }
    }

    /// Bytes of guest RAM (all regions: they are one mapping).
    fn ram_len(&self) -> usize {
        let len: u64 = self.mem.iter().map(|r| r.len()).sum();
        usize::try_from(len).unwrap_or(0)
    }

    /// Lends guest RAM as a mutable byte slice to `f`, for loading it. The vCPUs must be
    /// parked (they are the only other users of guest RAM; devices only touch it from a
    /// vCPU's port I/O).
    pub fn with_ram_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        self.ensure_parked("writing guest RAM")?;
        let len = self.ram_len();
        let Some(r) = self.mem.iter().next() else {
            return Ok(f(&mut []));
        };
        // SAFETY: the regions are one anonymous mapping of `len` bytes, the first region at
        // its start (memory::create_ram), alive for the whole call. Every vCPU is parked
        // (checked above) and the device models only access RAM from inside a vCPU's exit,
        // so nothing else touches the memory while `f` holds the slice; the slice does not
        // escape `f`.
        let mem = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), len) };
        Ok(f(mem))
    }

    /// Switches KVM's dirty-page tracking of guest RAM on or off (for live migration).
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        memory::register(&self.vm, &self.mem, on)?;
        self.dma_dirty.set_enabled(on);
        Ok(())
    }

    /// Fetches and clears the dirty bitmap (see [`memory::dirty_bitmap`]): pages the vCPUs
    /// wrote (KVM's log) or the devices wrote by DMA. Dirty logging must be on.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>> {
        let mut bitmap = memory::dirty_bitmap(&self.vm, &self.mem)?;
        for (w, d) in bitmap.iter_mut().zip(self.dma_dirty.take()) {
            *w |= d;
        }
        Ok(bitmap)
    }

    /// Throttles the vCPUs like QEMU's `cpu_throttle_set`: they sleep `percent` % of the
    /// time (0 = off, at most 99). Used by live migration's auto-converge.
    pub fn set_throttle(&self, percent: u32) {
        self.ctl.set_throttle(percent);
    }

    /// The current throttle percentage (0 = not throttled).
    pub fn throttle(&self) -> u32 {
        self.ctl.throttle()
    }

    /// Asks the guest to check RAM and disk at its next tick (the counter guest prints
    /// `CHECK OK` or `CHECK FAIL`).
    pub fn request_check(&self) {
        self.control.request_check();
    }

    /// Marks the drives (by index) whose contents savevm keeps in the VM state and loadvm
    /// writes back (`capture=on`); replaces any earlier list. The snapshot layer checks
    /// that they are raw and small enough.
    pub fn set_captured_drives(&self, drives: Vec<usize>) {
        *lock(&self.captured) = drives;
    }

    /// Indexes of the drives marked with [`Vm::set_captured_drives`], in the order given.
    pub fn captured_drives(&self) -> Vec<usize> {
        lock(&self.captured).clone()
    }

    /// Flushes every drive (for a consistent disk before a snapshot).
    pub fn flush_drives(&self) -> crate::block::Result<()> {
        let mut devs = lock(&self.devices);
        for b in &mut devs.blocks {
            b.drive_mut().flush()?;
        }
        Ok(())
    }

    /// Has drive `i`'s device record the ranges the guest writes into `log` (None: stop);
    /// block migration resends them.
    pub fn track_drive_writes(&self, i: usize, log: Option<Arc<crate::block::dirty::DirtyChunks>>) {
        if let Some(b) = lock(&self.devices).blocks.get_mut(i) {
            b.set_write_log(log);
        }
    }

    /// Lends every drive to `f` as a [`BlockSet`] (devices named `drive0`, `drive1`, … in
    /// `--drive` order), for snapshot operations across all disks, and attaches them back to
    /// their devices afterwards. The VM should be paused: guest requests fail while the drives
    /// are lent out. A device whose drive `f` removed from the set stays detached.
    pub fn with_block_set<R>(&self, f: impl FnOnce(&mut BlockSet) -> R) -> R {
        let mut devs = lock(&self.devices);
        let mut set = BlockSet {
            devices: devs
                .blocks
                .iter_mut()
                .enumerate()
                .map(|(i, b)| Device {
                    name: drive_name(i),
                    driver: b.detach(),
                })
                .collect(),
        };
        let result = f(&mut set);
        for dev in set.devices {
            let slot = (0..devs.blocks.len()).find(|&i| drive_name(i) == dev.name);
            if let Some(b) = slot.and_then(|i| devs.blocks.get_mut(i)) {
                b.attach(dev.driver);
            }
        }
        result
    }

    /// Stops the vCPU threads and joins them. Also done on drop.
    pub fn shutdown(&mut self) {
        self.stop_lazy_ram();
        self.ctl.request_exit();
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Name of drive `i` in [`Vm::with_block_set`].
pub fn drive_name(i: usize) -> String {
    format!("drive{i}")
}
