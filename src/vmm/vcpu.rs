//! One vCPU: its KVM file descriptor, complete state capture/restore, and its run loop.
//!
//! # Restore ordering
//!
//! [`Vcpu::restore_state`] issues the ioctls in this order, for these reasons (QEMU's
//! `kvm_arch_put_registers` and Firecracker's `restore_state` agree on it):
//!
//! 1. `KVM_SET_CPUID2` happens when the vCPU is created, before anything else: KVM checks MSR
//!    writes and XSAVE features against the guest CPUID.
//! 2. `KVM_SET_MP_STATE` early: an AP still `UNINITIALIZED` would ignore the register state.
//! 3. `KVM_SET_REGS`, `KVM_SET_XSAVE` (covers the legacy FPU/SSE image too), `KVM_SET_XCRS`,
//!    then `KVM_SET_SREGS`: sregs carries EFER, CR0/CR4 and the APIC base, which the MSR and
//!    LAPIC writes depend on.
//! 4. `KVM_SET_MSRS` for every MSR except the TSC deadline: IA32_TSC here also makes the
//!    guest's TSC continue from the saved value.
//! 5. `KVM_SET_LAPIC` after sregs (the APIC base must be set and enabled first), then the
//!    TSC-deadline MSR, which KVM ignores unless the LAPIC timer is in TSC-deadline mode.
//! 6. `KVM_SET_VCPU_EVENTS` after the LAPIC: pending exceptions, NMIs and the interrupt shadow
//!    would otherwise be clobbered by the LAPIC reset that `KVM_SET_LAPIC` implies.
//! 7. `KVM_SET_DEBUGREGS` last.
//!
//! Capture ([`Vcpu::save_state`]) only happens when the vCPU is parked after a `KVM_RUN` that
//! completed any pending port I/O (see [`crate::vmm::run_control`]): KVM documents that an
//! `in` whose data userspace supplied is only written to the guest's registers on the next
//! `KVM_RUN`.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;

/// The TSC-deadline MSR, restored after the LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Most MSRs we accept in a saved state (KVM reports about 60 here).
pub const MAX_MSRS: usize = 1024;
/// Size of the XSAVE area in 32-bit words (`struct kvm_xsave`).
pub const XSAVE_WORDS: usize = 1024;

/// Errors of vCPU state ioctls; each names the ioctl that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {ioctl} failed: {source}")]
    Ioctl {
        /// vCPU index.
        index: usize,
        /// The ioctl.
        ioctl: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSR list.
    #[error("vCPU {index}: {ioctl} handled {done} of {total} MSRs; stopped at MSR {msr:#x}")]
    PartialMsrs {
        /// vCPU index.
        index: usize,
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        ioctl: &'static str,
        /// MSRs handled.
        done: usize,
        /// MSRs asked for.
        total: usize,
        /// The first MSR not handled.
        msr: u32,
    },
    /// The saved state is malformed.
    #[error("vCPU {index}: invalid saved state: {what}")]
    InvalidState {
        /// vCPU index.
        index: usize,
        /// What is wrong, with the offending value.
        what: String,
    },
}

/// Complete architectural state of one x86-64 vCPU, as KVM exposes it.
#[derive(Clone, PartialEq)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base, pending interrupt.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (also contained in `xsave`; kept for inspection and for hosts
    /// without XSAVE).
    pub fpu: kvm_fpu,
    /// The XSAVE area (`struct kvm_xsave.region`), [`XSAVE_WORDS`] words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Every MSR of KVM's `KVM_GET_MSR_INDEX_LIST`, with its value.
    pub msrs: Vec<kvm_msr_entry>,
    /// In-kernel local APIC register page.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, waiting for SIPI, ...).
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// TSC frequency the vCPU ran at, kHz (0 if unknown).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("rflags", &format_args!("{:#x}", self.regs.rflags))
            .field("cs", &format_args!("{:#x}", self.sregs.cs.selector))
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

/// A vCPU file descriptor and its index.
#[derive(Debug)]
pub struct Vcpu {
    /// Index (also its APIC ID).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(index: usize, fd: VcpuFd) -> Self {
        Vcpu { index, fd }
    }

    fn ioctl_err(&self, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Ioctl {
            index,
            ioctl,
            source,
        }
    }

    /// Sets the guest CPUID, with this vCPU's APIC ID patched in (leaves 1 and 0xb).
    pub fn set_cpuid(&self, supported: &CpuId) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((self.index as u32 & 0xff) << 24),
                0xb | 0x1f => e.edx = self.index as u32,
                _ => {}
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))
    }

    /// Captures the complete state. The vCPU must not be running.
    pub fn save_state(&self, msr_index_list: &[u32]) -> Result<VcpuState, VcpuError> {
        let fd = &self.fd;
        let mp_state = fd
            .get_mp_state()
            .map_err(self.ioctl_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(self.ioctl_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(self.ioctl_err("KVM_GET_FPU"))?;
        let xsave = fd.get_xsave().map_err(self.ioctl_err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(self.ioctl_err("KVM_GET_XCRS"))?;
        let lapic = fd.get_lapic().map_err(self.ioctl_err("KVM_GET_LAPIC"))?;
        let events = fd
            .get_vcpu_events()
            .map_err(self.ioctl_err("KVM_GET_VCPU_EVENTS"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(self.ioctl_err("KVM_GET_DEBUGREGS"))?;
        let msrs = self.get_msrs(msr_index_list)?;
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave: xsave.region.to_vec(),
            xcrs,
            msrs,
            lapic,
            events,
            mp_state,
            debug_regs,
            tsc_khz,
        })
    }

    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = self.msrs_wrapper(&entries)?;
        let done = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.ioctl_err("KVM_GET_MSRS"))?;
        if done != entries.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                ioctl: "KVM_GET_MSRS",
                done,
                total: entries.len(),
                msr: entries.get(done).map_or(0, |e| e.index),
            });
        }
        Ok(msrs.as_slice().to_vec())
    }

    fn msrs_wrapper(&self, entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuError> {
        Msrs::from_entries(entries).map_err(|e| VcpuError::InvalidState {
            index: self.index,
            what: format!("{} MSRs do not fit KVM's MSR list: {e:?}", entries.len()),
        })
    }

    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        if entries.is_empty() {
            return Ok(());
        }
        let msrs = self.msrs_wrapper(entries)?;
        let done = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl_err("KVM_SET_MSRS"))?;
        if done != entries.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                ioctl: "KVM_SET_MSRS",
                done,
                total: entries.len(),
                msr: entries.get(done).map_or(0, |e| e.index),
            });
        }
        Ok(())
    }

    /// Restores a state captured by [`Vcpu::save_state`], in the order documented at the top
    /// of this module. The vCPU must not be running.
    pub fn restore_state(&self, st: &VcpuState) -> Result<(), VcpuError> {
        if st.xsave.len() != XSAVE_WORDS {
            return Err(VcpuError::InvalidState {
                index: self.index,
                what: format!(
                    "XSAVE area has {} words, expected {XSAVE_WORDS}",
                    st.xsave.len()
                ),
            });
        }
        if st.msrs.len() > MAX_MSRS {
            return Err(VcpuError::InvalidState {
                index: self.index,
                what: format!("{} MSRs, at most {MAX_MSRS} accepted", st.msrs.len()),
            });
        }
        let fd = &self.fd;
        fd.set_mp_state(st.mp_state)
            .map_err(self.ioctl_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&st.regs)
            .map_err(self.ioctl_err("KVM_SET_REGS"))?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&st.xsave);
        fd.set_xsave(&xsave)
            .map_err(self.ioctl_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&st.xcrs)
            .map_err(self.ioctl_err("KVM_SET_XCRS"))?;
        fd.set_sregs(&st.sregs)
            .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
        let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = st
            .msrs
            .iter()
            .partition(|e| e.index == MSR_IA32_TSC_DEADLINE);
        self.set_msrs(&others)?;
        fd.set_lapic(&st.lapic)
            .map_err(self.ioctl_err("KVM_SET_LAPIC"))?;
        self.set_msrs(&deadline)?;
        fd.set_vcpu_events(&st.events)
            .map_err(self.ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&st.debug_regs)
            .map_err(self.ioctl_err("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    /// Sets the boot state: registers, special registers, default FPU, runnable.
    pub fn set_boot_state(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        let fd = &self.fd;
        fd.set_sregs(sregs)
            .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
        fd.set_regs(regs).map_err(self.ioctl_err("KVM_SET_REGS"))?;
        // FCW: all exceptions masked, extended precision; MXCSR: all exceptions masked.
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(self.ioctl_err("KVM_SET_FPU"))?;
        // APs start UNINITIALIZED (waiting for INIT/SIPI); ours start directly in long mode.
        fd.set_mp_state(kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(self.ioctl_err("KVM_SET_MP_STATE"))
    }

    /// The reset special registers (starting point for [`Vcpu::set_boot_state`]).
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(self.ioctl_err("KVM_GET_SREGS"))
    }
}
