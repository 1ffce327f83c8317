//! Runs the built-in counter guest under KVM: it ticks, and after a pause/save/restore into a
//! brand-new VM (fresh KVM fd, as a new process would have) it carries on from where it was.
use std::path::Path;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmsnap::block::{open_image, BlockDriver, OpenOptions};
use vmsnap::vmm::devices::{SerialCapture, SerialOut};
use vmsnap::vmm::guest::counter;
use vmsnap::vmm::{Guest, Vm, VmConfig, VmStatus};

const MEM: u64 = 16 << 20;
const WAIT: Duration = Duration::from_secs(20);

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is missing or not accessible");
    }
    ok
}

fn disk(dir: &Path) -> Box<dyn BlockDriver> {
    let path = dir.join("disk0.raw");
    if !path.exists() {
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    }
    open_image(&path, OpenOptions::default()).unwrap()
}

fn config(dir: &Path, vcpus: usize, cap: &SerialCapture) -> VmConfig {
    VmConfig {
        mem_size: MEM,
        vcpus,
        drives: vec![disk(dir)],
        serial: SerialOut::Capture(cap.clone()),
        guest: Guest::Counter,
    }
}

fn ram_copy(vm: &Vm) -> Vec<u8> {
    let mem = vm.guest_memory();
    let size = mem.iter().map(|r| r.len()).sum::<u64>() as usize;
    let mut buf = vec![0u8; size];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    buf
}

fn ticks(vm: &Vm) -> u64 {
    vm.guest_memory()
        .read_obj(GuestAddress(counter::TICKS_ADDR))
        .unwrap()
}

fn wait(cap: &SerialCapture, vm: &Vm, needle: &str, from: usize) -> usize {
    match cap.wait_for(needle, from, WAIT) {
        Some(end) => end,
        None => panic!(
            "no {needle:?} after byte {from}; status {:?}; serial:\n{}",
            vm.status(),
            cap.text()
        ),
    }
}

/// Boots, pauses at some tick N, saves, restores into a new VM and expects `tick N+1` then
/// `CHECK OK`.
fn save_restore_round_trip(vcpus: usize) {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), vcpus, &cap)).unwrap();
    vm.start();
    // Let the first periodic checks and disk records happen.
    let pos = wait(&cap, &vm, "tick 6\n", 0);
    vm.request_check();
    let pos = wait(&cap, &vm, "CHECK OK\n", pos);
    vm.pause().unwrap();
    assert_eq!(vm.status(), VmStatus::Paused);
    let state = vm.save_state().unwrap();
    let ram = ram_copy(&vm);
    let n = ticks(&vm);
    let printed = cap.text();
    assert!(!printed.contains("CHECK FAIL"), "{printed}");
    let ap_counts: Vec<u64> = (1..vcpus)
        .map(|i| {
            vm.guest_memory()
                .read_obj(GuestAddress(counter::AP_COUNTERS_ADDR + 8 * i as u64))
                .unwrap()
        })
        .collect();
    assert!(ap_counts.iter().all(|&c| c > 0), "APs ran: {ap_counts:?}");
    // Saving twice while paused gives the same registers: nothing runs. (TSC and the LAPIC
    // timer's current count move with host time, so they are not compared.)
    let again = vm.save_state().unwrap();
    for (a, b) in again.vcpus.iter().zip(&state.vcpus) {
        assert_eq!(a.regs, b.regs);
        assert_eq!(a.sregs, b.sregs);
        assert_eq!(a.xsave, b.xsave);
        assert_eq!(a.events, b.events);
    }
    assert_eq!(again.devices, state.devices);
    drop(vm);
    assert!(pos <= printed.len());

    // A new VM, as a new process would build it, with the saved RAM and state.
    let cap2 = SerialCapture::new();
    let vm2 = Vm::new(config(dir.path(), vcpus, &cap2)).unwrap();
    vm2.guest_memory()
        .write_slice(&ram, GuestAddress(0))
        .unwrap();
    vm2.restore_state(&state).unwrap();
    vm2.request_check();
    vm2.start();
    let next = format!("tick {}\n", n + 1);
    let p2 = wait(&cap2, &vm2, &next, 0);
    let p3 = wait(&cap2, &vm2, "CHECK OK\n", p2 - next.len());
    vm2.pause().unwrap();
    let out = cap2.text();
    assert!(
        out.starts_with(&format!("tick {}", n + 1)),
        "restored guest resumed at its next tick: {out}"
    );
    assert!(!out[..p3].contains("CHECK FAIL"), "{out}");
    assert!(ticks(&vm2) > n);
    for (i, before) in ap_counts.iter().enumerate() {
        let now: u64 = vm2
            .guest_memory()
            .read_obj(GuestAddress(counter::AP_COUNTERS_ADDR + 8 * (i as u64 + 1)))
            .unwrap();
        assert!(
            now >= *before,
            "vCPU {} counter went back: {before} -> {now}",
            i + 1
        );
    }
}

#[test]
fn counter_guest_survives_save_restore_1_vcpu() {
    save_restore_round_trip(1);
}

#[test]
fn counter_guest_survives_save_restore_2_vcpus() {
    save_restore_round_trip(2);
}
