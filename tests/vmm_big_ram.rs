//! A guest with more RAM than fits below the 32-bit PCI hole (5 GiB: 3 GiB at GPA 0, 2 GiB
//! from 4 GiB up, as QEMU's pc machine maps it) is saved live, resumed in a fresh process
//! with `CHECK OK` and ticks counting on, and its state has one `pc.ram` block of the whole
//! size. RAM is allocated when touched, so the test touches little of it; the monitor is
//! driven over stdin with no per-command timeout (a debug build on a loaded machine takes
//! tens of seconds to move 5 GiB of zero pages).
mod common;
use common::run_vm::{assert_check, create_qcow2, kvm_and_qemu_img};
use common::ticks::{assert_counts_on, ticks_of};

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RAM: u64 = 5 << 30;

/// The `used_length` of the `pc.ram` block in the RAM section's block list of `stream`.
fn pc_ram_length(stream: &[u8]) -> Option<u64> {
    let name = b"\x06pc.ram";
    let at = stream.windows(name.len()).position(|w| w == name)? + name.len();
    Some(u64::from_be_bytes(stream.get(at..at + 8)?.try_into().ok()?))
}

/// Runs a 5 GiB counter guest on `img` (resuming `loadvm` if given), waits until its serial
/// output (`serial`) satisfies `ready`, then gives the monitor `commands` and waits for the
/// process to end; returns the monitor's output.
fn run(img: &Path, serial: &Path, loadvm: Option<&str>, ready: &str, commands: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
    cmd.arg("run")
        .arg("--drive")
        .arg(format!("file={}", img.display()))
        .args(["--memory", "5G", "--monitor", "stdio", "--serial"])
        .arg(format!("file:{}", serial.display()));
    if let Some(tag) = loadvm {
        cmd.args(["--loadvm", tag]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(ready) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("vmsnap run exited early ({st}): {text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no '{ready}' on the serial console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(commands.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_5_gib_guest_saves_live_and_resumes_with_one_pc_ram_block() {
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    create_qcow2(&img);
    let serial = dir.path().join("s1.txt");
    let out = run(
        &img,
        &serial,
        None,
        "tick 5\n",
        "savevm -l big\ninfo savevm\nquit\n",
    );
    assert!(out.contains("savevm status: completed"), "{out}");
    assert!(!out.contains("Error"), "{out}");
    assert_check(&img);

    // One RAM block of the whole size, as QEMU's pc.ram.
    let state = dir.path().join("big.bin");
    let s = common::s;
    common::vmsnap(&["vmstate", "export", s(&img), "big", "-o", s(&state)]).ok();
    assert_eq!(pc_ram_length(&std::fs::read(&state).unwrap()), Some(RAM));

    // A fresh process resumes it: its guest checks RAM and disk, and counts on.
    let serial = dir.path().join("s2.txt");
    let out = run(
        &img,
        &serial,
        Some("big"),
        "CHECK OK\n",
        "info loadvm\nquit\n",
    );
    // Lazily, over all 5 GiB (both regions of the split layout are one page-server range).
    assert!(out.contains("mode: lazy"), "{out}");
    assert!(out.contains(&format!("/{}\n", RAM / 4096)), "{out}");
    assert!(!out.contains("status: failed"), "{out}");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(!text.contains("CHECK FAIL"), "{text}");
    assert!(ticks_of(&text).first().is_some_and(|&t| t > 5), "{text}");
    assert_counts_on("resumed 5 GiB guest", &text);
    assert_check(&img);

    // A size beyond the limit is refused with the bounds.
    let out = common::vmsnap(&["run", "--memory", "100G", "--monitor", "stdio"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("0x1000000000"), "{}", out.stderr);
}
