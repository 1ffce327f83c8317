//! Probes what the host's `/dev/kvm` offers and checks that everything the VMM relies on is
//! there. Run with `--nocapture` to see the report (recorded in formats/vm-state-capture.md).
mod common;

use std::time::Duration;

use kvm_ioctls::{Cap, Kvm};
use vm_memory::{Bytes, GuestAddress};
use vmsnap::vmm::devices::{SerialCapture, SerialOut};
use vmsnap::vmm::guest::counter;
use vmsnap::vmm::{Guest, Vm, VmConfig};

#[test]
fn probe_capabilities_the_vmm_needs() {
    if !common::kvm(module_path!()) {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let needed = [
        ("Irqchip", Cap::Irqchip),
        ("Pit2", Cap::Pit2),
        ("PitState2", Cap::PitState2),
        ("Xsave", Cap::Xsave),
        ("Xcrs", Cap::Xcrs),
        ("AdjustClock", Cap::AdjustClock),
        ("VcpuEvents", Cap::VcpuEvents),
        ("Debugregs", Cap::Debugregs),
        ("MpState", Cap::MpState),
        ("ImmediateExit", Cap::ImmediateExit),
        ("SetTssAddr", Cap::SetTssAddr),
    ];
    for (name, cap) in needed {
        let has = kvm.check_extension(cap);
        eprintln!("cap {name}: {has}");
        assert!(has, "KVM lacks {name}");
    }
    for (name, cap) in [
        ("TscDeadlineTimer", Cap::TscDeadlineTimer),
        ("KvmclockCtrl", Cap::KvmclockCtrl),
        ("Irqfd", Cap::Irqfd),
        ("SyncMmu", Cap::SyncMmu),
    ] {
        eprintln!("cap {name} (optional): {}", kvm.check_extension(cap));
    }
    let msrs = kvm.get_msr_index_list().unwrap();
    eprintln!(
        "MSR index list ({}): {:x?}",
        msrs.as_slice().len(),
        msrs.as_slice()
    );
    assert!(msrs.as_slice().contains(&0x10), "IA32_TSC is saved");
}

/// The counter guest runs, takes timer interrupts, and KVM's clock and dirty log work.
#[test]
fn probe_clock_and_dirty_log_with_a_running_guest() {
    if !common::kvm(module_path!()) {
        return;
    }
    let cap = SerialCapture::new();
    let vm = Vm::new(VmConfig {
        mem_size: 16 << 20,
        vcpus: 1,
        drives: Vec::new(),
        serial: SerialOut::Capture(cap.clone()),
        guest: Guest::Counter,
    })
    .unwrap();
    vm.set_dirty_logging(true).unwrap();
    vm.start();
    assert!(
        cap.wait_for("tick 3\n", 0, Duration::from_secs(20))
            .is_some(),
        "{}",
        cap.text()
    );
    vm.pause().unwrap();
    let bitmap = vm.take_dirty_bitmap().unwrap();
    let dirty = |gpa: u64| {
        let page = (gpa >> 12) as usize;
        bitmap
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    };
    let dirty_pages: u32 = bitmap.iter().map(|w| w.count_ones()).sum();
    eprintln!("dirty pages after 3 ticks: {dirty_pages}");
    assert!(dirty(counter::TICKS_ADDR), "tick counter page is dirty");
    assert!(dirty(counter::REGION_ADDR), "rewritten region is dirty");
    assert!(!dirty(8 << 20), "untouched RAM is clean");
    // Fetching cleared it: nothing runs while paused.
    let again = vm.take_dirty_bitmap().unwrap();
    assert_eq!(again.iter().map(|w| w.count_ones()).sum::<u32>(), 0);

    // As in QEMU, kvmclock stands still while the VM is stopped and runs again after `cont`.
    let st1 = vm.save_state().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let st2 = vm.save_state().unwrap();
    assert_eq!(
        st1.arch.clock.clock, st2.arch.clock.clock,
        "kvmclock stopped while paused"
    );
    vm.resume();
    std::thread::sleep(Duration::from_millis(30));
    vm.pause().unwrap();
    let st3 = vm.save_state().unwrap();
    let ran = st3.arch.clock.clock - st2.arch.clock.clock;
    eprintln!(
        "kvmclock {} -> {} ns over a 30 ms run",
        st2.arch.clock.clock, st3.arch.clock.clock
    );
    assert!(ran >= 25_000_000, "kvmclock advanced by the run: {ran} ns");
    assert!(ran < 5_000_000_000, "kvmclock did not jump: {ran} ns");
    let ticks: u64 = vm
        .guest_memory()
        .read_obj(GuestAddress(counter::TICKS_ADDR))
        .unwrap();
    assert!(ticks >= 3);
}
