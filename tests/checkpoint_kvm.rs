//! Checkpoint files with the counter guest (2 vCPUs, a qcow2 drive and a `capture=on` raw
//! drive): `save FILE` ends the run process with 0 and `vmsnap restore FILE` continues at the
//! next tick; `save -c` lets the guest run on and a restore returns guest and disks to the
//! checkpoint's instant; `--paused` waits for `cont`; a save onto a full file system changes
//! nothing; a live-migration stream file and an internal snapshot convert to checkpoints that
//! continue the guest the same way.
mod common;
use common::run_vm::{assert_check, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::{assert_continues, ticks_of};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests boot guests whose timing matters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RAW_SIZE: usize = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    d0: PathBuf,
    raw: PathBuf,
    drives: Vec<String>,
}

fn setup(with_raw: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    let raw = dir.path().join("vars.raw");
    create_qcow2(&d0);
    let mut drives = vec![format!("file={}", d0.display())];
    if with_raw {
        let pattern: Vec<u8> = (0..RAW_SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&raw, pattern).unwrap();
        drives.push(format!("file={},format=raw,capture=on", raw.display()));
    }
    Setup {
        dir,
        d0,
        raw,
        drives,
    }
}

/// Waits for a whole `CHECK` line in the restored guest's output and asserts it is OK.
fn assert_check_ok(vm: &RunVm, what: &str) {
    let text = vm.wait_check();
    assert!(
        text.contains("CHECK OK\n") && !text.contains("CHECK FAIL"),
        "{what}: {text}"
    );
}

fn vmsnap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn save_exits_0_and_restore_continues_at_the_next_tick_paused_until_cont() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let st = setup(true);
    let dir = st.dir.path();
    let file = dir.join("vm.ckpt");
    let vm = RunVm::start(dir, &st.drives, 2, None, 1);
    vm.wait_past(10);
    let (reply, status) = vm.finish_with(&format!("save {}", file.display()));
    assert!(status.success(), "save: {status}: {reply}");
    assert!(reply.contains("saved"), "{reply}");
    let src = std::fs::read_to_string(dir.join("serial1.txt")).unwrap();
    assert!(file.exists());
    assert!(!dir.join(".vm.ckpt.vmsnap-tmp").exists());
    assert_check(&st.d0);
    let saved_raw = std::fs::read(&st.raw).unwrap();
    // The captured drive changes behind the VM's back; restore puts it back.
    std::fs::write(&st.raw, vec![0xeeu8; RAW_SIZE]).unwrap();

    let mut vm = RunVm::restore(dir, &file, 2, &["--paused"]);
    assert!(
        std::fs::read(&st.raw).unwrap() == saved_raw,
        "capture=on drive"
    );
    let (_, status) = vm.cmd("info status");
    assert_eq!(status, "paused");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vm.ticks().is_empty(),
        "ran before cont: {}",
        vm.serial_text()
    );
    vm.ok("cont");
    let last = *ticks_of(&src).last().unwrap();
    vm.wait_past(last + 3);
    assert_continues(&src, &vm.serial_text());
    // The guest checks that its RAM and its disk records agree.
    assert_check_ok(&vm, "after restore");
    vm.quit();
    assert_check(&st.d0);
}

/// The guest-visible contents of `image`'s active layer or of snapshot `tag` (qemu-img
/// convert, sharing the image with a running vmsnap).
fn layer(dir: &Path, image: &Path, tag: Option<&str>) -> Vec<u8> {
    let out = dir.join("layer.raw");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U"]);
    if let Some(t) = tag {
        cmd.args(["-l", &format!("snapshot.name={t}")]);
    }
    let r = cmd.args(["-O", "raw", s(image), s(&out)]).output().unwrap();
    assert!(r.status.success(), "{r:?}");
    std::fs::read(&out).unwrap()
}

/// The names of `image`'s internal snapshots (qemu-img snapshot -l).
fn snapshot_names(image: &Path) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", s(image)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

#[test]
fn save_c_runs_on_and_restore_returns_guest_and_disks_to_the_checkpoint() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let st = setup(true);
    let dir = st.dir.path();
    let file = dir.join("c.ckpt");
    let mut vm = RunVm::start(dir, &st.drives, 2, None, 1);
    vm.wait_past(10);
    let before = vm.last_tick().unwrap();
    let reply = vm.ok(&format!("save -c {}", file.display()));
    assert!(reply.contains("runs on"), "{reply}");
    let (_, status) = vm.cmd("info status");
    assert_eq!(status, "running");
    let n = vm.last_tick().unwrap();
    vm.wait_past(n + 40);
    vm.quit();
    let snaps = snapshot_names(&st.d0);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0].starts_with("checkpoint-"), "{snaps:?}");
    assert_check(&st.d0);
    let at_checkpoint = layer(dir, &st.d0, Some(&snaps[0]));
    assert!(
        layer(dir, &st.d0, None) != at_checkpoint,
        "the guest wrote nothing to its disk after save -c: the test proves nothing"
    );

    let mut vm = RunVm::restore(dir, &file, 2, &["--paused"]);
    // Before the guest runs again, its disk is the checkpoint's.
    assert!(
        layer(dir, &st.d0, None) == at_checkpoint,
        "restore did not revert the disk"
    );
    vm.ok("cont");
    vm.wait_past(n + 2);
    let dst = vm.serial_text();
    let first = *ticks_of(&dst).first().unwrap();
    // The checkpoint's instant lies between the ticks printed before and after `save -c`
    // (one more for a line the stop cut).
    assert!(
        first > before && first <= n + 2,
        "restore must go back to the checkpoint: ticks {before}..{n} around save -c, {} at \
         quit, the restored guest starts at {first}:\n{dst}",
        n + 40
    );
    common::ticks::assert_counts_on("restored", &dst);
    assert_check_ok(&vm, "after restoring the -c checkpoint");
    vm.quit();
    assert_check(&st.d0);
}

#[test]
fn a_save_that_fails_leaves_the_vm_running_and_no_file() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let st = setup(true);
    let dir = st.dir.path();
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", s(&full)])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "SKIPPED: {}: cannot mount a tmpfs (needs root)",
            module_path!()
        );
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(full.clone());
    let mut vm = RunVm::start(dir, &st.drives, 2, None, 1);
    vm.wait_past(5);
    for (cmd, name) in [("save", "a.ckpt"), ("save -c", "b.ckpt")] {
        let target = full.join(name);
        let (reply, status) = vm.cmd(&format!("{cmd} {}", target.display()));
        assert!(
            reply.starts_with("Error:") && reply.contains("No space left on device"),
            "{cmd}: {reply}"
        );
        assert_eq!(status, "running", "{cmd}");
        let left: Vec<_> = std::fs::read_dir(&full).unwrap().collect();
        assert!(left.is_empty(), "{cmd} left {left:?}");
        let t = vm.last_tick().unwrap();
        vm.wait_past(t + 2);
    }
    let (list, _) = vm.cmd("info snapshots");
    assert!(
        !list.contains("checkpoint-"),
        "a failed save -c kept its snapshot: {list}"
    );
    vm.quit();
    assert_check(&st.d0);
    assert!(snapshot_names(&st.d0).is_empty());
}

/// Waits until `vm`'s `info status` says `want`.
fn wait_status(vm: &mut RunVm, want: &str) {
    let start = Instant::now();
    loop {
        let (_, st) = vm.cmd("info status");
        if st == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "status {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_migration_file_and_an_internal_snapshot_convert_to_checkpoints() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let st = setup(false);
    let dir = st.dir.path();

    // A live-migration stream file → checkpoint → restore.
    let mig = dir.join("m.bin");
    let mut vm = RunVm::start(dir, &st.drives, 2, None, 1);
    vm.wait_past(10);
    vm.ok(&format!("migrate file:{}", mig.display()));
    wait_status(&mut vm, "paused (postmigrate)");
    let src = vm.serial_text();
    vm.quit();
    let ckpt = dir.join("m.ckpt");
    let out = vmsnap(&[
        "vmstate",
        "checkpoint",
        s(&mig),
        "-o",
        s(&ckpt),
        "--drive",
        &st.drives[0],
    ]);
    assert!(out.status.success(), "{out:?}");
    // The inspector decodes the checkpoint's stream exactly as the stream file, and shows
    // the configuration.
    let inspect = |f: &Path, output: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
            .arg(f)
            .args(["--output", output])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    let (bare, wrapped) = (inspect(&mig, "json"), inspect(&ckpt, "json"));
    assert!(bare.contains("\"cpu (1)\""), "{bare:.500}");
    assert_eq!(bare, wrapped);
    // … which is what QEMU's analyze-migration.py prints for the stream file.
    if let Some(o) = common::analyze_migration(module_path!(), &["-f", common::s(&mig)]) {
        assert_eq!(o.ok().stdout, wrapped);
    }
    let human = inspect(&ckpt, "human");
    assert!(
        human.starts_with("CHECKPOINT\n")
            && human.contains("ok\nconfiguration:")
            && human.contains("\"vcpus\": 2")
            && human.contains("vmsnap-pvblock"),
        "{human:.3000}"
    );
    let vm = RunVm::restore(dir, &ckpt, 2, &[]);
    let last = *ticks_of(&src).last().unwrap();
    vm.wait_past(last + 2);
    assert_continues(&src, &vm.serial_text());
    assert_check_ok(&vm, "checkpoint of a migration file");
    vm.quit();

    // An internal snapshot → export --checkpoint → import as another snapshot; both the
    // checkpoint and the imported snapshot continue the guest at the same tick.
    let mut vm = RunVm::start(dir, &st.drives, 2, None, 3);
    vm.wait_past(5);
    vm.stop();
    vm.ok("savevm s1");
    let src = vm.serial_text();
    vm.quit();
    let exported = dir.join("s1.ckpt");
    let out = vmsnap(&[
        "vmstate",
        "export",
        s(&st.d0),
        "s1",
        "-o",
        s(&exported),
        "--checkpoint",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = vmsnap(&["vmstate", "import", s(&st.d0), "s2", s(&exported)]);
    assert!(out.status.success(), "{out:?}");
    assert_check(&st.d0);
    let last = *ticks_of(&src).last().unwrap();
    let mut firsts = Vec::new();
    for (run, how) in [(4, "restore"), (5, "loadvm")] {
        let vm = if how == "restore" {
            RunVm::restore(dir, &exported, run, &[])
        } else {
            RunVm::start(dir, &st.drives, 2, Some("s2"), run)
        };
        vm.wait_past(last + 2);
        let dst = vm.serial_text();
        assert_continues(&src, &dst);
        firsts.push(ticks_of(&dst)[0]);
        assert_check_ok(&vm, how);
        vm.quit();
    }
    assert_eq!(firsts[0], firsts[1]);
    assert_check(&st.d0);
}
