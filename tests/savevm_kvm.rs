//! savevm / loadvm / delvm of the counter guest through `vmsnap run`'s monitor, checked with
//! the guest's own tick counter and checks, `qemu-img` and the inspector.
mod common;
use common::run_vm::{assert_check, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::{assert_one_instant, snapshot_disk_record, ticks_of};

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests boot guests whose timing matters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn continuity(smp: u32) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let drives = [format!("file={}", img.display())];
    let mut vm = RunVm::start(dir.path(), &drives, smp, None, 1);
    vm.wait_past(10);
    let printed = vm.stop();
    vm.ok("savevm s1");
    vm.ok("cont");
    // N: the last tick the guest handled, from the snapshot's RAM (the serial output can lag
    // by one when the stop lands inside the printing of a tick).
    let (n, disk_n) = guest_counters(&img, "s1", smp as usize, 1);
    assert!(
        n == printed || n == printed + 1,
        "RAM {n}, serial {printed}"
    );
    vm.wait_past(n + 20);
    // A second snapshot taken while the guest runs.
    vm.ok("savevm live");
    vm.wait_past(n + 30);
    vm.quit();
    assert_check(&img);
    // The snapshot's disk holds the record the guest last wrote before the save.
    assert!(disk_n <= n, "N {n}, disk_n {disk_n}");
    if disk_n == 0 {
        let serial = std::fs::read_to_string(dir.path().join("serial1.txt")).unwrap_or_default();
        eprintln!("note: no disk record before N {n}:\n{serial}");
    }
    let on_disk = snapshot_disk_record(dir.path(), &img, "s1");
    assert_one_instant(on_disk, n, disk_n);

    for (tag, run) in [("s1", 2), ("live", 3)] {
        let (n, _) = guest_counters(&img, tag, smp as usize, 1);
        let vm = RunVm::start(dir.path(), &drives, smp, Some(tag), run);
        vm.wait_past(n + 1);
        let text = vm.wait_check();
        let ticks = ticks_of(&text);
        assert_eq!(ticks.first(), Some(&(n + 1)), "{tag}: {text}");
        assert!(
            text.contains("CHECK OK") && !text.contains("CHECK FAIL"),
            "{text}"
        );
        vm.quit();
        assert_check(&img);
    }
}

/// The counter guest's `last` (the last tick it handled) and `disk_n` (the N of the last
/// disk record it wrote) in snapshot `tag`'s RAM.
fn guest_counters(image: &Path, tag: &str, vcpus: usize, drives: usize) -> (u64, u64) {
    use vmsnap::vmm::guest::counter::{DISK_N_ADDR, LAST_ADDR};
    let ram = common::run_vm::snapshot_ram_of(image, tag, 16 << 20, vcpus, drives);
    let word = |a| common::run_vm::guest_word(&ram, a);
    (word(LAST_ADDR), word(DISK_N_ADDR))
}

#[test]
fn savevm_then_loadvm_in_a_new_process_continues_at_the_next_tick_1_vcpu() {
    continuity(1);
}

#[test]
fn savevm_then_loadvm_in_a_new_process_continues_at_the_next_tick_2_vcpus() {
    continuity(2);
}

/// Ticks printed after byte `from` of the serial output.
fn ticks_after(vm: &RunVm, from: usize) -> Vec<u64> {
    ticks_of(vm.serial_text().get(from..).unwrap_or(""))
}

/// Waits for a tick printed after byte `from`; returns the first one.
fn first_tick_after(vm: &RunVm, from: usize) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(&t) = ticks_after(vm, from).first() {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no tick");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn loadvm_in_the_running_process_goes_back_and_forth_between_two_snapshots() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let drives = [format!("file={}", img.display())];
    let mut vm = RunVm::start(dir.path(), &drives, 2, None, 1);
    vm.wait_past(5);
    vm.ok("savevm a");
    let (na, _) = guest_counters(&img, "a", 2, 1);
    vm.wait_past(na + 30);
    vm.ok("savevm b");
    let (nb, _) = guest_counters(&img, "b", 2, 1);
    vm.wait_past(nb + 10);
    for round in 0..3 {
        for (tag, n) in [("a", na), ("b", nb)] {
            vm.stop();
            let from = vm.serial_text().len();
            vm.ok(&format!("loadvm {tag}"));
            let (_, st) = vm.cmd("cont");
            assert_eq!(st, "running");
            assert_eq!(
                first_tick_after(&vm, from),
                n + 1,
                "round {round}, loadvm {tag}"
            );
            vm.wait_past(n + 5);
        }
    }
    // A check runs every 64 ticks: let one happen after the last loadvm.
    vm.stop();
    let from = vm.serial_text().len();
    vm.ok("loadvm a");
    vm.ok("cont");
    let start = Instant::now();
    // Wait for the whole CHECK line, so a half-printed "CHECK F" is not missed.
    while !vm.serial_text()[from..]
        .find("CHECK ")
        .is_some_and(|i| vm.serial_text()[from + i..].contains('\n'))
    {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = vm.serial_text();
    assert!(!text.contains("CHECK FAIL"), "{text}");
    let (list, _) = vm.cmd("info snapshots");
    assert!(
        list.starts_with("List of snapshots present on all disks:"),
        "{list}"
    );
    assert_eq!(
        list.lines().filter(|l| l.starts_with("-- ")).count(),
        2,
        "{list}"
    );
    // savevm of an existing tag replaces it (HMP semantics).
    vm.ok("savevm b");
    let (list, _) = vm.cmd("info snapshots");
    assert_eq!(list.matches(" b ").count(), 1, "{list}");
    vm.ok("delvm a");
    let (list, _) = vm.cmd("info snapshots");
    assert!(!list.contains(" a ") && list.contains(" b "), "{list}");
    vm.quit();
    assert_check(&img);
    let out = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.contains(" b "))
        .expect("snapshot b");
    // VM SIZE is not zero, and the VM CLOCK has advanced past the start.
    assert!(!row.contains(" 0 B "), "{text}");
    assert!(!row.contains("00:00:00.000"), "{text}");
}

/// Copies snapshot `tag`'s VM state out of `image` into a stream file.
fn extract_stream(image: &Path, tag: &str, out: &Path) {
    use vmsnap::block::vmstate_io::VmstateReader;
    use vmsnap::block::{open_image, OpenOptions};
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut drv = open_image(image, opts).unwrap();
    let store = drv.snapshots().unwrap();
    let mut r = VmstateReader::for_snapshot(store, tag).unwrap();
    let mut f = std::fs::File::create(out).unwrap();
    std::io::copy(&mut r, &mut f).unwrap();
}

#[test]
fn snapshots_decode_with_the_inspector_and_analyze_migration() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let drives = [format!("file={}", img.display())];
    let mut vm = RunVm::start(dir.path(), &drives, 2, None, 1);
    vm.wait_past(3);
    vm.ok("savevm s1");
    vm.quit();
    assert_check(&img);

    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .arg(&img)
        .args(["--snapshot", "s1", "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ours = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(&ours).unwrap();
    for section in [
        "cpu (1)",
        "cpu (2)",
        "i8259 (3)",
        "i8259 (4)",
        "ioapic (5)",
        "i8254 (6)",
        "kvmclock (7)",
        "serial (8)",
        "vmsnap-pvblock (9)",
        "vmsnap-control (10)",
    ] {
        assert!(json.get(section).is_some(), "{section} missing: {ours}");
    }
    assert!(json["cpu (1)"]["rip"].as_str().unwrap().starts_with("0x"));
    // The counter guest's page tables are at 0x8000; its user code runs with CS 0x23.
    assert_eq!(json["cpu (1)"]["cr3"], "0x0000000000008000", "{ours}");
    assert!(json["cpu (1)"]["cs"]["selector"].is_string(), "{ours}");
    assert_eq!(
        json["cpu (2)"]["msrs"].as_array().map(|a| a.is_empty()),
        Some(false)
    );
    assert!(json["serial (8)"].get("divider").is_some());

    if common::analyze_migration_script(module_path!()).is_none() {
        return;
    }
    let stream = dir.path().join("s1.mig");
    extract_stream(&img, "s1", &stream);
    if let Some(out) = common::analyze_migration(module_path!(), &["-f", common::s(&stream)]) {
        assert_eq!(ours.trim_end(), out.ok().stdout.trim_end());
    }
}

fn snapshot_list(img: &Path) -> String {
    let out = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn two_qcow2_disks_get_the_snapshot_with_the_vm_state_on_the_first() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = (dir.path().join("d0.qcow2"), dir.path().join("d1.qcow2"));
    create_qcow2(&d0);
    create_qcow2(&d1);
    let drives = [
        format!("file={}", d0.display()),
        format!("file={},format=qcow2", d1.display()),
    ];
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 1);
    vm.wait_past(3);
    vm.ok("savevm both");
    let (n, _) = guest_counters(&d0, "both", 1, 2);
    vm.wait_past(n + 10);
    vm.quit();
    for d in [&d0, &d1] {
        assert_check(d);
    }
    let l0 = snapshot_list(&d0);
    let l1 = snapshot_list(&d1);
    let row0 = l0.lines().find(|l| l.contains(" both ")).expect("on d0");
    let row1 = l1.lines().find(|l| l.contains(" both ")).expect("on d1");
    assert!(!row0.contains(" 0 B "), "{l0}");
    assert!(row1.contains(" 0 B "), "{l1}");

    let vm = RunVm::start(dir.path(), &drives, 1, Some("both"), 2);
    assert_eq!(first_tick_after(&vm, 0), n + 1);
    vm.quit();
}

#[test]
fn a_writable_raw_disk_refuses_savevm_and_a_read_only_one_is_skipped() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    let raw = dir.path().join("r.raw");
    create_qcow2(&d0);
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let before = std::fs::read(&d0).unwrap();
    let drives = [
        format!("file={}", d0.display()),
        format!("file={},format=raw", raw.display()),
    ];
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 1);
    vm.wait_past(3);
    let (reply, status) = vm.cmd("savevm s1");
    assert_eq!(
        reply.trim_end(),
        "Error: Device 'drive1' is writable but does not support snapshots"
    );
    assert_eq!(status, "running");
    let (list, _) = vm.cmd("info snapshots");
    assert!(list.contains("drive1"), "{list}");
    let t = *vm.ticks().last().unwrap();
    vm.wait_past(t + 3);
    vm.quit();
    // No snapshot anywhere; the raw disk (the guest only writes disk 0) is untouched.
    assert!(!snapshot_list(&d0).contains("s1"));
    assert_check(&d0);
    assert!(std::fs::read(&d0).unwrap().len() <= before.len() + (256 << 10));
    assert!(std::fs::read(&raw).unwrap().iter().all(|&b| b == 0x5a));

    let drives = [
        format!("file={}", d0.display()),
        format!("file={},format=raw,readonly=on", raw.display()),
    ];
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 2);
    vm.wait_past(3);
    vm.ok("savevm s1");
    vm.quit();
    assert!(snapshot_list(&d0).contains(" s1 "));
    assert_check(&d0);
}

/// Sends a bad request and checks the exact error, that the VM still runs, and that it goes
/// on counting from where it was (no jump back).
fn refused(vm: &mut RunVm, line: &str, expected: &str) {
    let before = *vm.ticks().last().expect("ticks before the request");
    let (reply, status) = vm.cmd(line);
    assert_eq!(reply.trim_end(), expected, "{line}");
    assert_eq!(status, "running", "{line}");
    let from = vm.serial_text().len();
    let next = first_tick_after(vm, from);
    assert!(next > before, "{line}: tick {next} after {before}");
}

#[test]
fn bad_loadvm_requests_are_refused_and_the_vm_runs_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = (dir.path().join("d0.qcow2"), dir.path().join("d1.qcow2"));
    create_qcow2(&d0);
    create_qcow2(&d1);
    let one = [format!("file={}", d0.display())];
    let two = [
        format!("file={}", d0.display()),
        format!("file={}", d1.display()),
    ];
    // A snapshot of a 1-vCPU, 1-disk VM, a disk-only one, and one only on d0.
    let mut vm = RunVm::start(dir.path(), &one, 1, None, 1);
    vm.wait_past(3);
    vm.ok("savevm onecpu");
    vm.quit();
    for (img, tag) in [(&d0, "diskonly"), (&d1, "diskonly"), (&d0, "only0")] {
        let out = qemu_img(&["snapshot", "-c", tag, img.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    }

    let mut vm = RunVm::start(dir.path(), &two, 1, None, 2);
    vm.wait_past(3);
    refused(
        &mut vm,
        "loadvm nosuch",
        "Error: Snapshot 'nosuch' does not exist in one or more devices",
    );
    refused(
        &mut vm,
        "loadvm diskonly",
        "Error: This is a disk-only snapshot. Revert to it offline using qemu-img",
    );
    refused(
        &mut vm,
        "loadvm only0",
        "Error: Snapshot 'only0' does not exist in one or more devices",
    );
    vm.quit();

    // The same disk, but a VM with 2 vCPUs: the stream lacks cpu 1.
    let mut vm = RunVm::start(dir.path(), &one, 2, None, 3);
    vm.wait_past(3);
    refused(
        &mut vm,
        "loadvm onecpu",
        "Error: Error -22 while loading VM state: section 'cpu' instance 1 is missing from the \
         VM state",
    );
    vm.quit();
    // Other RAM size: refused at start-up with the RAM block's length, exit status 1.
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args([
            "run", "--drive", &one[0], "--memory", "32M", "--serial", "none",
        ])
        .args(["--loadvm", "onecpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Error -22 while loading VM state") && err.contains("Length mismatch"),
        "{err}"
    );
    for d in [&d0, &d1] {
        assert_check(d);
    }
}

#[test]
fn a_corrupted_vm_state_is_refused_and_the_vm_runs_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    create_qcow2(&d0);
    let one = [format!("file={}", d0.display())];
    let mut vm = RunVm::start(dir.path(), &one, 1, None, 1);
    vm.wait_past(3);
    vm.ok("savevm s1");
    vm.quit();
    // Rename the control device's section wherever its name is stored in the image.
    let mut bytes = std::fs::read(&d0).unwrap();
    let needle = b"vmsnap-control";
    let mut hits = 0;
    for i in 0..bytes.len() - needle.len() {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i + 7] = b'X';
            hits += 1;
        }
    }
    assert!(hits > 0, "section name not found in the image");
    std::fs::write(&d0, &bytes).unwrap();

    let mut vm = RunVm::start(dir.path(), &one, 1, None, 2);
    vm.wait_past(3);
    let before = *vm.ticks().last().unwrap();
    let (reply, status) = vm.cmd("loadvm s1");
    // vmsnap's checksum of the state (formats/snapshot-integrity.md) catches the damage before
    // the stream is parsed, and names the snapshot.
    assert!(
        reply.starts_with("Error: Refusing to load snapshot 's1': ")
            && reply.contains("VM state is damaged"),
        "{reply}"
    );
    assert_eq!(status, "running");
    vm.wait_past(before + 3);
    vm.quit();
    // --loadvm with the same snapshot: refused at start-up, exit status 1.
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args([
            "run", "--drive", &one[0], "--memory", "16M", "--serial", "none",
        ])
        .args(["--loadvm", "s1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshot 's1'") && err.contains("damaged"),
        "{err}"
    );
}

#[test]
fn monitor_answers_malformed_snapshot_commands_like_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let mut vm = RunVm::start(dir.path(), &[format!("file={}", img.display())], 1, None, 1);
    let (r, _) = vm.cmd("loadvm");
    assert_eq!(r.trim_end(), "Parameter 'name' is missing");
    let (r, _) = vm.cmd("savevm a b");
    assert_eq!(
        r.trim_end(),
        "savevm: extraneous characters at the end of line"
    );
    let (r, _) = vm.cmd("info snapshots");
    assert_eq!(r.trim_end(), "There is no snapshot available.");
    // Without a tag, savevm names the snapshot from the date, as QEMU does.
    vm.ok("savevm");
    let (r, _) = vm.cmd("info snapshots");
    assert!(r.contains("\n--        vm-20"), "{r}");
    vm.quit();
    assert_check(&img);
}
