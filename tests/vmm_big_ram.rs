//! A guest with more RAM than fits below the 32-bit PCI hole (5 GiB: 3 GiB at GPA 0, 2 GiB
//! from 4 GiB up, as QEMU's pc machine maps it) is saved live and plainly, resumed in a fresh
//! process at the next tick, and its state has one `pc.ram` block of the whole size. RAM is
//! allocated when touched, so the test touches little of it.
mod common;
use common::run_vm::{assert_check, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::ticks_of;

const RAM: u64 = 5 << 30;

/// The `used_length` of the `pc.ram` block in the RAM section's block list of `stream`.
fn pc_ram_length(stream: &[u8]) -> Option<u64> {
    let name = b"\x06pc.ram";
    let at = stream.windows(name.len()).position(|w| w == name)? + name.len();
    Some(u64::from_be_bytes(stream.get(at..at + 8)?.try_into().ok()?))
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

#[test]
fn a_5_gib_guest_saves_and_resumes_with_one_pc_ram_block() {
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let drives = [format!("file={}", img.display())];
    let big = ["--memory", "5G"];
    let mut vm = RunVm::start_with(dir.path(), &drives, 1, None, 1, &big);
    vm.wait_past(5);
    vm.ok("savevm -l live");
    vm.stop();
    vm.ok("savevm plain");
    let n = vm.last_tick().unwrap();
    vm.quit();
    assert_check(&img);

    // One RAM block of the whole size, as QEMU's pc.ram.
    let state = dir.path().join("plain.bin");
    let s = common::s;
    common::vmsnap(&["vmstate", "export", s(&img), "plain", "-o", s(&state)]).ok();
    assert_eq!(pc_ram_length(&std::fs::read(&state).unwrap()), Some(RAM));

    for (tag, run) in [("plain", 2), ("live", 3)] {
        let vm = RunVm::start_with(dir.path(), &drives, 1, Some(tag), run, &big);
        let text = check_line(&vm);
        let first = *ticks_of(&text).first().unwrap();
        if tag == "plain" {
            // Stopped before the save: the next tick, or the one cut by the stop.
            assert!(first == n + 1 || first == n + 2, "{tag}: {n} then {text}");
        }
        assert!(
            text.contains("CHECK OK") && !text.contains("CHECK FAIL"),
            "{tag}: {text}"
        );
        vm.quit();
    }
    assert_check(&img);
    // A size the host cannot map is refused with the bounds.
    let out = common::vmsnap(&["run", "--memory", "100G", "--monitor", "stdio"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("0x1000000000"), "{}", out.stderr);
}
