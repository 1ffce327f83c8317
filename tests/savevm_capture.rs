//! `capture=on` raw drives: savevm keeps their contents in the VM state, loadvm (in the
//! running process and with `--loadvm` in a new one) writes them back; limits are enforced at
//! startup; a writable raw drive without capture=on still refuses savevm as in QEMU.
mod common;
use common::run_vm::{assert_check, command, create_qcow2, kvm_and_qemu_img, RunVm};

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The tests boot guests whose timing matters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RAW_SIZE: usize = 1 << 20;

fn pattern() -> Vec<u8> {
    (0..RAW_SIZE as u32)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

/// The VM state stream of snapshot `tag` on `image`.
fn stream_of(image: &Path, tag: &str) -> Vec<u8> {
    use vmsnap::block::vmstate_io::VmstateReader;
    use vmsnap::block::{open_image, OpenOptions};
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let mut drv = open_image(image, opts).unwrap();
    let mut r = VmstateReader::for_snapshot(drv.snapshots().unwrap(), tag).unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut out).unwrap();
    out
}

#[test]
fn captured_raw_contents_return_on_loadvm() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    let raw = dir.path().join("vars.raw");
    create_qcow2(&d0);
    let saved = pattern();
    std::fs::write(&raw, &saved).unwrap();
    let drives = [
        format!("file={}", d0.display()),
        format!("file={},format=raw,capture=on", raw.display()),
    ];
    let changed = vec![0xeeu8; RAW_SIZE];

    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 1);
    vm.wait_past(3);
    vm.ok("savevm s1");
    // The raw drive takes no part in the disk snapshots.
    let (list, _) = vm.cmd("info snapshots");
    assert!(list.contains(" s1 ") && !list.contains("drive1"), "{list}");
    // Changed behind the VM's back (the guest only writes disk 0); loadvm puts it back.
    std::fs::write(&raw, &changed).unwrap();
    vm.ok("loadvm s1");
    assert!(std::fs::read(&raw).unwrap() == saved, "in-process loadvm");
    let (_, status) = vm.cmd("info status");
    assert_eq!(status, "running");
    let t = vm.last_tick().unwrap();
    vm.wait_past(t + 2);
    std::fs::write(&raw, &changed).unwrap();
    vm.quit();
    assert_check(&d0);

    // The contents travel in their own section, described in the vmdesc.
    let stream = stream_of(&d0, "s1");
    let has = |needle: &[u8]| stream.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"vmsnap-capture"));
    assert!(has(b"\"name\": \"data\"") || has(b"\"name\":\"data\""));
    assert!(has(&saved[..4096]));
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .arg(&d0)
        .args(["--snapshot", "s1", "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ours = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let section = &json["vmsnap-capture (11)"];
    assert!(section.get("data").is_some(), "{:.2000}", ours);
    assert!(
        section["size"].as_str().unwrap().ends_with("100000"),
        "{section:.200}"
    );
    let mig = dir.path().join("s1.mig");
    std::fs::write(&mig, &stream).unwrap();
    if let Some(out) = common::analyze_migration(module_path!(), &["-f", common::s(&mig)]) {
        assert_eq!(ours.trim_end(), out.ok().stdout.trim_end());
    }

    // --loadvm in a new process writes them back before the guest runs.
    assert_eq!(std::fs::read(&raw).unwrap(), changed);
    let vm = RunVm::start(dir.path(), &drives, 1, Some("s1"), 2);
    assert!(std::fs::read(&raw).unwrap() == saved, "--loadvm");
    vm.wait_past(1);
    vm.quit();
    assert_check(&d0);

    // A captured drive of another size: the stream is refused before anything changes.
    let small = vec![0x11u8; RAW_SIZE / 2];
    std::fs::write(&raw, &small).unwrap();
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 3);
    vm.wait_past(3);
    let before = vm.last_tick().unwrap();
    let (reply, status) = vm.cmd("loadvm s1");
    assert!(
        reply.starts_with("Error: Error -22 while loading VM state")
            && reply.contains("vmsnap-capture.size")
            && reply.contains("must equal 0x80000"),
        "{reply}"
    );
    assert_eq!(status, "running");
    vm.wait_past(before + 1);
    vm.quit();
    assert_eq!(std::fs::read(&raw).unwrap(), small);
}

/// Runs `vmsnap run` expecting it to refuse to start; returns its stderr.
fn refused_at_startup(dir: &Path, drives: &[String]) -> String {
    let out = command(dir, drives, 1, None, 9)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "vmsnap run started with {drives:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn capture_on_is_refused_above_64_mib_and_on_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    let big = dir.path().join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let err = refused_at_startup(
        dir.path(),
        &[format!("file={},format=raw,capture=on", big.display())],
    );
    assert!(
        err.contains("capture=on drives may hold at most 0x4000000 bytes")
            && err.contains("0x4100000"),
        "{err}"
    );
    if !common::require("capture_on_is_refused (qcow2 part)", &["qemu-img"]) {
        return;
    }
    create_qcow2(&d0);
    let err = refused_at_startup(dir.path(), &[format!("file={},capture=on", d0.display())]);
    assert!(err.contains("capture=on needs a raw drive"), "{err}");
    let err = refused_at_startup(
        dir.path(),
        &[format!("file={},format=qcow2,capture=on", d0.display())],
    );
    assert!(err.contains("capture=on needs format=raw"), "{err}");
}

#[test]
fn a_writable_raw_drive_without_capture_still_refuses_savevm() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    let raw = dir.path().join("r.raw");
    create_qcow2(&d0);
    std::fs::write(&raw, vec![0x5au8; RAW_SIZE]).unwrap();
    let drives = [
        format!("file={}", d0.display()),
        format!("file={},format=raw,capture=off", raw.display()),
    ];
    let mut vm = RunVm::start(dir.path(), &drives, 1, None, 1);
    vm.wait_past(2);
    let (reply, status) = vm.cmd("savevm s1");
    assert_eq!(
        reply.trim_end(),
        "Error: Device 'drive1' is writable but does not support snapshots"
    );
    assert_eq!(status, "running");
    vm.quit();
    assert!(std::fs::read(&raw).unwrap().iter().all(|&b| b == 0x5a));
}
