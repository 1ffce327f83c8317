//! VM-wide KVM state: the in-kernel interrupt controllers, the PIT and the KVM clock.
//!
//! # Ordering
//!
//! Creation: `KVM_CREATE_IRQCHIP` (PIC pair + IOAPIC; each vCPU then gets an in-kernel LAPIC)
//! and `KVM_CREATE_PIT2` must both precede `KVM_CREATE_VCPU`.
//!
//! Restore, on a freshly created, never-run VM whose vCPUs are parked:
//! 1. `KVM_SET_IRQCHIP` for PIC master, PIC slave and IOAPIC, then `KVM_SET_PIT2`: the PIT
//!    raises IRQ 0 into the PIC, so the PIC must already have its vector base and mask.
//! 2. The vCPUs ([`super::vcpu`]), whose LAPICs receive what the PIC and IOAPIC deliver.
//! 3. `KVM_SET_CLOCK` last, and again on resume, so that kvmclock continues from the saved
//!    value rather than counting the time spent restoring or paused. As QEMU's kvmclock
//!    device does, [`super::Vm::pause`] reads the clock once the vCPUs are parked and
//!    [`super::Vm::resume`] writes it back; `save_state` saves that stopped value.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;

/// Identity-map and TSS addresses KVM needs on Intel hosts (just below the 4 GiB BIOS area).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Errors of VM-wide ioctls; each names the ioctl.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl} failed: {source}")]
pub struct VmIoctlError {
    /// The ioctl.
    pub ioctl: &'static str,
    /// The errno.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmIoctlError {
    move |source| VmIoctlError { ioctl, source }
}

/// Saved state of the in-kernel PIC pair, IOAPIC and PIT, and of the KVM clock.
#[derive(Clone, Copy)]
pub struct VmArchState {
    /// 8259 master (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_irqchip,
    /// 8259 slave (`KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: kvm_irqchip,
    /// IOAPIC (`KVM_IRQCHIP_IOAPIC`).
    pub ioapic: kvm_irqchip,
    /// 8254 PIT channels and speaker flags.
    pub pit: kvm_pit_state2,
    /// kvmclock (guest nanoseconds).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmArchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmArchState")
            .field("pit_flags", &self.pit.flags)
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// Creates the in-kernel irqchip and PIT. Must come before the first vCPU.
pub fn create_irqchip_and_pit(vm: &VmFd) -> Result<(), VmIoctlError> {
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(err("KVM_CREATE_PIT2"))?;
    discard_lost_ticks(vm)
}

/// `KVM_REINJECT_CONTROL` (`_IO(KVMIO, 0x71)`).
const KVM_REINJECT_CONTROL: libc::c_ulong = 0xae71;

/// Makes the PIT drop ticks the guest could not take in time instead of re-injecting them
/// back to back later (QEMU's `lost_tick_policy=discard`). A guest stopped for a savevm, or
/// restored and not yet scheduled on a busy host, then sees one tick, not a burst, when it
/// runs again.
fn discard_lost_ticks(vm: &VmFd) -> Result<(), VmIoctlError> {
    let ctl = kvm_bindings::kvm_reinject_control {
        pit_reinject: 0,
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one `struct kvm_reinject_control` from the pointer,
    // which points to a live, initialised value of that type; the fd is our VM's.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(vm),
            KVM_REINJECT_CONTROL as _,
            &ctl as *const kvm_bindings::kvm_reinject_control,
        )
    };
    if ret < 0 {
        return Err(VmIoctlError {
            ioctl: "KVM_REINJECT_CONTROL",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmIoctlError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Captures irqchip, PIT and clock. The vCPUs must be parked.
pub fn save(vm: &VmFd) -> Result<VmArchState, VmIoctlError> {
    Ok(VmArchState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
    })
}

/// Reads the KVM clock.
pub fn get_clock(vm: &VmFd) -> Result<kvm_clock_data, VmIoctlError> {
    vm.get_clock().map_err(err("KVM_GET_CLOCK"))
}

/// Restores irqchip and PIT (step 1 of the ordering above).
pub fn restore_irqchip_and_pit(vm: &VmFd, st: &VmArchState) -> Result<(), VmIoctlError> {
    let mut chips = [st.pic_master, st.pic_slave, st.ioapic];
    chips[0].chip_id = KVM_IRQCHIP_PIC_MASTER;
    chips[1].chip_id = KVM_IRQCHIP_PIC_SLAVE;
    chips[2].chip_id = KVM_IRQCHIP_IOAPIC;
    for chip in &chips {
        vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&st.pit).map_err(err("KVM_SET_PIT2"))
}

/// Restores the KVM clock (step 3 of the ordering above).
pub fn restore_clock(vm: &VmFd, clock: &kvm_clock_data) -> Result<(), VmIoctlError> {
    // Only the clock value: host-time flags from another boot are meaningless here.
    let data = kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    };
    vm.set_clock(&data).map_err(err("KVM_SET_CLOCK"))
}
