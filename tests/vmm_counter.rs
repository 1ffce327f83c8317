//! Runs the built-in counter guest under KVM: it ticks, and after a pause/save/restore into a
//! brand-new VM (fresh KVM fd, as a new process would have) it carries on from where it was.
mod common;

use std::path::Path;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmsnap::block::{open_image, BlockDriver, OpenOptions};
use vmsnap::vmm::devices::{SerialCapture, SerialOut};
use vmsnap::vmm::guest::counter;
use vmsnap::vmm::{Guest, Vm, VmConfig, VmStatus};

const MEM: u64 = 16 << 20;
const WAIT: Duration = Duration::from_secs(20);

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

fn handled(vm: &Vm) -> u64 {
    vm.guest_memory()
        .read_obj(GuestAddress(counter::LAST_ADDR))
        .unwrap()
}

/// Waits until the guest wrote its first disk record (every 4 ticks), and leaves the VM paused.
fn wait_for_disk_record(vm: &Vm, cap: &SerialCapture) {
    let start = std::time::Instant::now();
    loop {
        vm.pause().unwrap();
        let n: u64 = vm
            .guest_memory()
            .read_obj(GuestAddress(counter::DISK_N_ADDR))
            .unwrap();
        if n != 0 {
            return;
        }
        assert!(start.elapsed() < WAIT, "no disk record: {}", cap.text());
        vm.resume();
        std::thread::sleep(Duration::from_millis(5));
    }
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
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), vcpus, &cap)).unwrap();
    vm.start();
    // Let the first ticks, checks and disk records happen (wait on the counter rather than
    // on the serial text, which may be cut inside a line).
    let start = std::time::Instant::now();
    while handled(&vm) < 6 {
        assert!(
            start.elapsed() < WAIT,
            "status {:?}; serial:\n{}",
            vm.status(),
            cap.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pos = cap.len();
    vm.request_check();
    let pos = wait(&cap, &vm, "CHECK OK\n", pos);
    vm.pause().unwrap();
    assert_eq!(vm.status(), VmStatus::Paused);
    let state = vm.save_state().unwrap();
    let ram = ram_copy(&vm);
    let n = ticks(&vm);
    let last = handled(&vm);
    // The loop is at most a few ticks behind the timer (two interrupts may fall in a round).
    assert!(
        last <= n && n - last <= 2,
        "loop handled tick {last}, timer counted {n}"
    );
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
    // The check runs at the first tick after the restore; wait for two more ticks after it.
    let p2 = wait(&cap2, &vm2, "CHECK OK\n", 0);
    let p3 = wait(&cap2, &vm2, "tick", p2);
    wait(&cap2, &vm2, "tick", p3);
    vm2.pause().unwrap();
    let out = cap2.text();
    assert!(!out.contains("CHECK FAIL"), "{out}");
    // The console reads as one uninterrupted run: a line cut by the pause is completed by the
    // restored guest, and tick numbers count on by one across the restore (the loop handles
    // ticks one by one), so the first tick printed after it is the one the loop was handling
    // when paused, or the next.
    let combined = format!("{printed}{out}");
    let mut prev = None;
    let mut first_after = None;
    let mut offset = 0;
    for line in combined.lines() {
        let start = offset;
        offset += line.len() + 1;
        if line == "CHECK OK" {
            continue;
        }
        let k: u64 = line
            .strip_prefix("tick ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("malformed console line {line:?} in:\n{combined}"));
        if let Some(p) = prev {
            assert_eq!(k, p + 1, "tick {k} after tick {p}:\n{combined}");
        }
        if start >= printed.len() && first_after.is_none() {
            first_after = Some(k);
        }
        prev = Some(k);
    }
    let first_after = first_after.expect("ticks after the restore");
    assert!(
        first_after == last || first_after == last + 1,
        "first tick after restore {first_after}, handled {last}, counted {n}:\n{combined}"
    );
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

/// The guest's check is real: RAM changed behind its back while paused makes it fail.
#[test]
fn counter_guest_check_detects_corrupted_ram() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), 1, &cap)).unwrap();
    vm.start();
    let pos = wait(&cap, &vm, "tick 2", 0);
    // Corrupt only between ticks: while a tick is being handled, the guest's own rewrite of
    // the region could still overwrite the corruption.
    loop {
        vm.pause().unwrap();
        let filled: u64 = vm
            .guest_memory()
            .read_obj(GuestAddress(counter::FILLED_ADDR))
            .unwrap();
        if filled == handled(&vm) {
            break;
        }
        vm.resume();
        std::thread::sleep(Duration::from_millis(1));
    }
    let addr = GuestAddress(counter::REGION_ADDR + 0x800);
    let v: u64 = vm.guest_memory().read_obj(addr).unwrap();
    vm.guest_memory().write_obj(v ^ 1, addr).unwrap();
    vm.request_check();
    vm.resume();
    wait(&cap, &vm, "CHECK FAIL\n", pos);
    let fails: u64 = vm
        .guest_memory()
        .read_obj(GuestAddress(counter::CHECK_FAILS_ADDR))
        .unwrap();
    assert!(fails >= 1);
}

/// The guest's check also covers the disk: a record changed behind its back makes it fail.
#[test]
fn counter_guest_check_detects_corrupted_disk() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), 1, &cap)).unwrap();
    vm.start();
    wait_for_disk_record(&vm, &cap);
    let pos = cap.len();
    // Flip a bit of the record's N in sector 1, through a second handle on the image.
    let path = dir.path().join("disk0.raw");
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[512..520], b"TICKCTNR", "record magic on disk");
    bytes[520] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    vm.request_check();
    vm.resume();
    wait(&cap, &vm, "CHECK FAIL\n", pos);
}

/// An exception in the guest stops the VM with an error instead of hanging.
#[test]
fn guest_exception_is_reported() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), 1, &cap)).unwrap();
    vm.start();
    wait(&cap, &vm, "tick 1\n", 0);
    vm.pause().unwrap();
    // ud2 over the first instruction of the user loop.
    let user_main = GuestAddress(counter::LOAD_ADDR + 0x200);
    vm.guest_memory()
        .write_slice(&[0x0f, 0x0b], user_main)
        .unwrap();
    vm.resume();
    let start = std::time::Instant::now();
    loop {
        if let VmStatus::Failed(why) = vm.status() {
            assert!(why.contains("unexpected exception"), "{why}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "guest kept running: {:?}",
            vm.status()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let faults: u64 = vm
        .guest_memory()
        .read_obj(GuestAddress(counter::FAULTS_ADDR))
        .unwrap();
    assert_eq!(faults, 1);
}

/// A state only fits a VM of the same shape.
#[test]
fn restore_refuses_a_state_with_another_vcpu_count() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm1 = Vm::new(config(dir.path(), 1, &cap)).unwrap();
    let state = vm1.save_state().unwrap();
    drop(vm1);
    let vm2 = Vm::new(config(dir.path(), 2, &cap)).unwrap();
    let err = vm2.restore_state(&state).unwrap_err();
    assert!(
        matches!(
            err,
            vmsnap::vmm::VmError::VcpuCount {
                saved: 1,
                present: 2
            }
        ),
        "{err}"
    );
    let mut bad = state.clone();
    bad.vcpus.push(bad.vcpus[0].clone());
    bad.vcpus[1].xsave.truncate(10);
    let err = vm2.restore_state(&bad).unwrap_err();
    assert!(err.to_string().contains("XSAVE area has 10 words"), "{err}");
    vm2.start();
    let err = vm2.save_state().unwrap_err();
    assert!(matches!(err, vmsnap::vmm::VmError::NotPaused(_)), "{err}");
}

/// The drives can be lent out for all-disks snapshot work while paused, and come back.
#[test]
fn drives_are_lent_as_a_block_set_and_returned() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), 1, &cap)).unwrap();
    vm.start();
    wait_for_disk_record(&vm, &cap);
    vm.flush_drives().unwrap();
    let names = vm.with_block_set(|set| {
        let mut record = [0u8; 8];
        set.devices[0].driver.read_at(512, &mut record).unwrap();
        assert_eq!(&record, b"TICKCTNR");
        set.devices
            .iter()
            .map(|d| d.name.clone())
            .collect::<Vec<_>>()
    });
    assert_eq!(names, ["drive0"]);
    let pos = cap.len();
    vm.request_check();
    vm.resume();
    let p = wait(&cap, &vm, "CHECK OK\n", pos);
    assert!(!cap.text()[pos..p].contains("DISK ERROR"), "{}", cap.text());
}

/// Many quick stop/cont cycles: every pause parks all vCPUs (no lost kick, no deadlock) and
/// the guest's state stays consistent.
#[test]
fn rapid_pause_resume_keeps_the_guest_consistent() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(config(dir.path(), 2, &cap)).unwrap();
    vm.start();
    for i in 0..60u64 {
        vm.pause().unwrap();
        assert_eq!(vm.status(), VmStatus::Paused);
        vm.resume();
        std::thread::sleep(Duration::from_micros(200 * (i % 7)));
    }
    let pos = cap.len();
    vm.request_check();
    wait(&cap, &vm, "CHECK OK\n", pos);
    assert!(!cap.text().contains("CHECK FAIL"), "{}", cap.text());
}

/// State survives several generations of save and restore (each into a new VM).
#[test]
fn state_survives_a_chain_of_restores() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cap = SerialCapture::new();
    let mut vm = Vm::new(config(dir.path(), 2, &cap)).unwrap();
    vm.start();
    let mut last_handled = 0;
    for generation in 0..3 {
        let start = std::time::Instant::now();
        while handled(&vm) < last_handled + 3 {
            assert!(
                start.elapsed() < WAIT,
                "generation {generation}: {}",
                cap.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.pause().unwrap();
        last_handled = handled(&vm);
        let state = vm.save_state().unwrap();
        let ram = ram_copy(&vm);
        drop(vm);
        cap = SerialCapture::new();
        vm = Vm::new(config(dir.path(), 2, &cap)).unwrap();
        vm.guest_memory()
            .write_slice(&ram, GuestAddress(0))
            .unwrap();
        vm.restore_state(&state).unwrap();
        assert_eq!(handled(&vm), last_handled);
        vm.request_check();
        vm.start();
        wait(&cap, &vm, "CHECK OK\n", 0);
        assert!(!cap.text().contains("CHECK FAIL"), "{}", cap.text());
    }
}

/// The committed counter guest is what `build.sh` makes from the committed source.
#[test]
fn counter_image_matches_its_source() {
    let Some(built) = common::rebuild("testdata/guest/build.sh") else {
        return;
    };
    assert!(
        built == vmsnap::vmm::guest::counter::IMAGE,
        "testdata/guest/counter.bin is stale: run testdata/guest/build.sh"
    );
}
