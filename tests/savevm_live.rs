//! `savevm -l` (live savevm) of the counter guest while it runs, with RAM of random bytes
//! (`--mem-path`) and with the guest dirtying RAM: the snapshot resumes in a fresh process at
//! the exact next tick with `CHECK OK`, its RAM outside the guest's working areas is the
//! file's, its disk and RAM are of one instant, the image checks clean with qemu-img, the
//! exported state decodes, and `info savevm` tells how it went.
mod common;
use common::run_vm::{assert_check, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::{assert_one_instant, snapshot_disk_record, ticks_of};

use std::path::Path;
use std::sync::Mutex;

use vmsnap::vmm::guest::counter::{DIRTY_AREA_START, DISK_N_ADDR, LAST_ADDR};

/// The tests boot guests whose timing matters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `RunVm`'s guest RAM.
const RAM: usize = 16 << 20;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Snapshot `tag`'s guest RAM, read with the library's loader.
fn snapshot_ram(image: &Path, tag: &str) -> Vec<u8> {
    common::run_vm::snapshot_ram_of(image, tag, RAM, 1, 1)
}

fn word(ram: &[u8], a: u64) -> u64 {
    u64::from_le_bytes(ram[a as usize..a as usize + 8].try_into().unwrap())
}

/// Every byte of `ram` from the guest's dirtying area up equals `file`'s, except the first
/// qword of each page, where the dirtying guest stores its tick (below that area lie the
/// guest's code, tables, stacks and checked region).
fn assert_ram_is_the_files(what: &str, ram: &[u8], file: &[u8]) {
    let start = DIRTY_AREA_START as usize;
    let mut differing = 0;
    for (i, (a, b)) in ram[start..]
        .chunks(4096)
        .zip(file[start..].chunks(4096))
        .enumerate()
    {
        if a[8..] != b[8..] {
            differing += 1;
            assert!(
                differing < 4,
                "{what}: page {:#x} differs",
                start + i * 4096
            );
        }
    }
    assert_eq!(
        differing, 0,
        "{what}: pages outside the working area differ"
    );
}

/// `info savevm`'s `key: value` line.
fn field<'a>(info: &'a str, key: &str) -> &'a str {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no '{key}' in:\n{info}"))
}

/// Waits for the guest's whole `CHECK OK` / `CHECK FAIL` line; returns the serial text.
fn check_line(vm: &RunVm) -> String {
    vm.wait_check();
    let start = std::time::Instant::now();
    loop {
        let t = vm.serial_text();
        if t.contains("CHECK OK\n") || t.contains("CHECK FAIL") {
            return t;
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "CHECK line not complete:\n{t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (20 s at most) until the serial text after byte `from` holds the line `tick N`;
/// returns the text from that line on.
fn tick_after(vm: &RunVm, from: usize, n: u64) -> String {
    let line = format!("tick {n}\n");
    let start = std::time::Instant::now();
    loop {
        let text = vm.serial_text();
        if let Some(i) = text[from..].find(&line) {
            return text[from + i..].to_string();
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "no '{}' after byte {from}: {:?}",
            line.trim_end(),
            &text[from..]
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn ms(v: &str) -> u64 {
    v.strip_suffix(" ms").unwrap().parse().unwrap()
}

fn live_save_and_resume(dirty_rate: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let drives = [format!("file={}", img.display())];
    let file = random_bytes(RAM, 0x5eed);
    let ram_path = dir.path().join("ram");
    std::fs::write(&ram_path, &file).unwrap();
    let ram_arg = ram_path.to_str().unwrap();

    let extra = ["--mem-path", ram_arg, "--dirty-rate", dirty_rate];
    let mut vm = RunVm::start_with(dir.path(), &drives, 1, None, 1, &extra);
    vm.wait_past(10);
    assert_eq!(vm.ok("info savevm").trim_end(), "savevm status: none");
    let (reply, status) = vm.cmd("savevm -l s1");
    assert_eq!((reply.trim_end(), status.as_str()), ("", "running"));
    let info = vm.ok("info savevm");
    assert_eq!(field(&info, "savevm status"), "completed", "{info}");
    assert_eq!(field(&info, "tag"), "s1");
    assert_eq!(field(&info, "mode"), "live");
    let bytes: u64 = field(&info, "bytes").parse().unwrap();
    let total = ms(field(&info, "total time"));
    let down = ms(field(&info, "downtime"));
    assert!(down <= total, "{info}");
    // Random RAM goes out whole; the stream stays within the bound of twice the RAM.
    assert!(
        bytes > RAM as u64 && bytes <= 2 * RAM as u64 + (1 << 20),
        "{info}"
    );
    // The guest went on running during and after the save.
    let after = vm.last_tick().unwrap();
    vm.wait_past(after + 5);
    vm.quit();
    assert_check(&img);

    // One instant: the disk record in the snapshot is the one the RAM says was written last.
    let ram = snapshot_ram(&img, "s1");
    let (n, disk_n) = (word(&ram, LAST_ADDR), word(&ram, DISK_N_ADDR));
    assert!(n >= 10, "N {n}");
    assert_one_instant(snapshot_disk_record(dir.path(), &img, "s1"), n, disk_n);
    assert_ram_is_the_files("snapshot", &ram, &file);
    let vm_state_size = common::vmsnap(&["info", "--output", "json", common::s(&img)]).ok();
    assert!(
        vm_state_size
            .stdout
            .contains(&format!("\"vm-state-size\": {bytes}")),
        "{}",
        vm_state_size.stdout
    );

    // A fresh process over other random RAM resumes at the next tick with CHECK OK, and its
    // RAM is the snapshot's.
    let other = dir.path().join("other");
    std::fs::write(&other, random_bytes(RAM, 77)).unwrap();
    let extra = ["--mem-path", other.to_str().unwrap()];
    let mut vm = RunVm::start_with(dir.path(), &drives, 1, Some("s1"), 2, &extra);
    let text = check_line(&vm);
    assert_eq!(ticks_of(&text).first(), Some(&(n + 1)), "{text}");
    assert!(
        text.contains("CHECK OK") && !text.contains("CHECK FAIL"),
        "{text}"
    );
    // The live save recorded a page index, so the load was lazy (not the eager fallback of
    // a snapshot without one), and the background fill completed.
    let loaded = vm.wait_loaded();
    assert!(
        loaded.contains("mode: lazy") && loaded.contains("status: completed"),
        "{loaded}"
    );
    vm.stop();
    vm.ok("savevm s2");
    let info = vm.ok("info savevm");
    assert_eq!(field(&info, "mode"), "stop", "{info}");
    vm.ok("cont");
    // The same in the running process: `loadvm` (lazy), then `loadvm -e` (eager); each
    // resumes at the snapshot's next tick and leaves the snapshot's RAM in the guest.
    for (cmd, mode, tag) in [("loadvm s1", "lazy", "s3"), ("loadvm -e s1", "eager", "s4")] {
        vm.wait_past(n + 3);
        let from = vm.serial_text().len();
        vm.ok(cmd);
        // The snapshot's next tick comes next (its line may follow a partial line the guest
        // printed before loadvm stopped it), and the ticks count on from there.
        let after = tick_after(&vm, from, n + 1);
        common::ticks::assert_counts_on(cmd, &after);
        let loaded = vm.wait_loaded();
        assert!(
            loaded.contains(&format!("mode: {mode}")) && loaded.contains("status: completed"),
            "{cmd}: {loaded}"
        );
        vm.stop();
        vm.ok(&format!("savevm {tag}"));
        vm.ok("cont");
    }
    vm.quit();
    assert_check(&img);
    // And an eager load in a fresh process over other RAM.
    let extra = [
        "--mem-path",
        other.to_str().unwrap(),
        "--loadvm-mode",
        "eager",
    ];
    let mut vm = RunVm::start_with(dir.path(), &drives, 1, Some("s1"), 3, &extra);
    let text = check_line(&vm);
    assert_eq!(ticks_of(&text).first(), Some(&(n + 1)), "eager: {text}");
    assert!(text.contains("CHECK OK"), "eager: {text}");
    vm.stop();
    vm.ok("savevm s5");
    vm.quit();
    assert_check(&img);
    for (what, tag) in [
        ("lazy --loadvm", "s2"),
        ("loadvm in the process", "s3"),
        ("loadvm -e in the process", "s4"),
        ("eager --loadvm", "s5"),
    ] {
        assert_ram_is_the_files(what, &snapshot_ram(&img, tag), &file);
    }

    // The exported state is a whole stream the inspector decodes, as is the snapshot itself.
    let state = dir.path().join("s1.bin");
    common::vmsnap(&[
        "vmstate",
        "export",
        common::s(&img),
        "s1",
        "-o",
        common::s(&state),
    ])
    .ok();
    let out = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[common::s(&state), "--dump", "state"],
    )
    .ok();
    assert!(out.stdout.contains("pc.ram"), "{}", out.stdout);
    common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[common::s(&img), "--snapshot", "s1"],
    )
    .ok();
    analyze_migration(&state);
}

/// QEMU's analyze-migration.py decodes the exported state, when it is there.
fn analyze_migration(state: &Path) {
    if let Some(out) = common::analyze_migration(module_path!(), &["-f", common::s(state)]) {
        let out = out.ok();
        assert!(out.stdout.contains("\"pc.ram\""), "{}", out.stdout);
    }
}

#[test]
fn live_savevm_of_a_running_guest_resumes_at_the_next_tick() {
    live_save_and_resume("0");
}

#[test]
fn live_savevm_of_a_guest_dirtying_50_mib_s_resumes_at_the_next_tick() {
    live_save_and_resume("50");
}

#[test]
fn live_savevm_replaces_a_tag_and_is_refused_on_a_raw_disk() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let drives = [format!("file={}", img.display())];
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 1);
    vm.wait_past(3);
    vm.ok("savevm -l a");
    vm.ok("savevm -l a");
    let list = vm.ok("info snapshots");
    assert_eq!(list.matches(" a ").count(), 1, "{list}");
    vm.quit();
    assert_check(&img);

    let drives = [
        format!("file={}", img.display()),
        format!("file={},format=raw", raw.display()),
    ];
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 2);
    vm.wait_past(3);
    let (reply, status) = vm.cmd("savevm -l b");
    assert_eq!(
        reply.trim_end(),
        "Error: Device 'drive1' is writable but does not support snapshots"
    );
    assert_eq!(status, "running");
    let info = vm.ok("info savevm");
    assert_eq!(field(&info, "savevm status"), "failed", "{info}");
    vm.quit();
    assert_check(&img);
}
