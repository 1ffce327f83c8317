//! Probes what the host's `/dev/kvm` supports. Prints a report; run with `--nocapture`.
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};

#[test]
fn probe_kvm_capabilities() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is missing");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    for (name, cap) in [
        ("Irqchip", Cap::Irqchip),
        ("Pit2", Cap::Pit2),
        ("PitState2", Cap::PitState2),
        ("Xsave", Cap::Xsave),
        ("Xcrs", Cap::Xcrs),
        ("AdjustClock", Cap::AdjustClock),
        ("VcpuEvents", Cap::VcpuEvents),
        ("DebugRegs", Cap::Debugregs),
        ("MpState", Cap::MpState),
        ("ImmediateExit", Cap::ImmediateExit),
        ("TscDeadlineTimer", Cap::TscDeadlineTimer),
        ("KvmclockCtrl", Cap::KvmclockCtrl),
        ("SetTssAddr", Cap::SetTssAddr),
        ("SyncMmu", Cap::SyncMmu),
        ("Irqfd", Cap::Irqfd),
    ] {
        eprintln!("cap {name}: {}", kvm.check_extension(cap));
    }
    eprintln!("max vcpus {}", kvm.get_max_vcpus());
    let r = vm.set_tss_address(0xfffb_d000);
    eprintln!("set_tss_address: {r:?}");
    let r = vm.create_irq_chip();
    eprintln!("create_irq_chip: {r:?}");
    let r = vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    });
    eprintln!("create_pit2: {r:?}");
    eprintln!("get_clock: {:?}", vm.get_clock());
    let msrs = kvm.get_msr_index_list().unwrap();
    eprintln!(
        "msr index list: {} entries: {:x?}",
        msrs.as_slice().len(),
        msrs.as_slice()
    );
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    eprintln!("supported cpuid entries: {}", cpuid.as_slice().len());
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    eprintln!("get_regs ok: {}", vcpu.get_regs().is_ok());
    eprintln!("get_sregs ok: {}", vcpu.get_sregs().is_ok());
    eprintln!("get_fpu: {}", vcpu.get_fpu().is_ok());
    eprintln!("get_xsave: {:?}", vcpu.get_xsave().map(|_| ()));
    eprintln!(
        "get_xcrs: {:?}",
        vcpu.get_xcrs().map(|x| (x.nr_xcrs, x.xcrs[0].value))
    );
    eprintln!("get_lapic: {:?}", vcpu.get_lapic().map(|_| ()));
    eprintln!(
        "get_vcpu_events: {:?}",
        vcpu.get_vcpu_events().map(|e| e.flags)
    );
    eprintln!("get_mp_state: {:?}", vcpu.get_mp_state());
    eprintln!("get_debug_regs: {:?}", vcpu.get_debug_regs().map(|d| d.dr7));
    eprintln!("get_tsc_khz: {:?}", vcpu.get_tsc_khz());
    let mut irq = kvm_bindings::kvm_irqchip {
        chip_id: 0,
        ..Default::default()
    };
    eprintln!("get_irqchip pic0: {:?}", vm.get_irqchip(&mut irq));
    irq.chip_id = 2;
    eprintln!("get_irqchip ioapic: {:?}", vm.get_irqchip(&mut irq));
    eprintln!("get_pit2: {:?}", vm.get_pit2().map(|p| p.flags));
    let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
        .as_slice()
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut m = kvm_bindings::Msrs::from_entries(&entries).unwrap();
    let n = vcpu.get_msrs(&mut m);
    eprintln!("get_msrs of all listed: {n:?} of {}", entries.len());
}
