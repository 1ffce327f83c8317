//! Killing the VMM with SIGKILL at random moments during `savevm` must leave images that
//! `qemu-img check` reports without corruption (leaks allowed), and an older snapshot must
//! still load and run.
mod common;
use common::monitor::Monitor;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Vm {
    child: Child,
    mon: Monitor,
    serial: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn available() -> bool {
    if !common::kvm(module_path!()) {
        return false;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIPPED: qemu-img is not installed");
        return false;
    }
    true
}

fn start(dir: &Path, img: &Path, run: u32, loadvm: Option<&str>) -> Vm {
    let sock = dir.join(format!("mon{run}.sock"));
    let serial = dir.join(format!("serial{run}.txt"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
    cmd.args(["run", "--drive"])
        .arg(format!("file={}", img.display()))
        .args([
            "--guest", "counter", "--memory", "128M", "--smp", "1", "--serial",
        ])
        .arg(format!("file:{}", serial.display()))
        .arg("--monitor")
        .arg(format!("unix:{}", sock.display()));
    if let Some(tag) = loadvm {
        cmd.args(["--loadvm", tag]);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mon = Monitor::connect(&sock, || {
        let st = child.try_wait().ok()??;
        Some(format!("vmsnap run exited early: {st}"))
    });
    Vm { child, mon, serial }
}

impl Vm {
    /// Sends a command and waits for its reply (terminated by an `info status` answer).
    fn cmd(&mut self, line: &str) -> String {
        self.mon.cmd(line).0
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&self, what: &str) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.serial();
            if s.contains(what) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no '{what}' in:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn qemu_img_check(img: &Path) -> (i32, String) {
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn sigkill_during_savevm_leaves_a_consistent_image_and_older_snapshots_load() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let o = Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(o.status.success());

    // A complete snapshot to come back to, and the time a full savevm takes.
    let mut vm = start(dir.path(), &img, 0, None);
    vm.wait_for("tick 5\n");
    let t0 = Instant::now();
    let r = vm.cmd("savevm base");
    let full = t0.elapsed();
    assert!(!r.contains("Error"), "{r}");
    vm.mon.quit();
    assert!(vm.child.wait().unwrap().success());
    drop(vm);
    // savevm stored a checksum of the state, and it verifies.
    {
        use vmsnap::block::{open_image, OpenOptions};
        use vmsnap::interop::integrity::{verify_snapshot, Verification};
        let mut d = open_image(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let store = d.snapshots().unwrap();
        assert!(!store.snapshot_extra_tail("base").unwrap().is_empty());
        assert!(matches!(
            verify_snapshot(store, "base").unwrap(),
            Verification::Verified(_)
        ));
    }

    // Kill savevm at spread-out moments from its start to a bit past its usual end.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    for run in 1..=8u32 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let frac = (seed >> 33) as f64 / (1u64 << 31) as f64; // 0..1
        let delay = full.mul_f64(frac * 1.3);
        let mut vm = start(dir.path(), &img, run, None);
        vm.wait_for("tick 3\n");
        vm.mon.send(&format!("savevm k{run}"));
        std::thread::sleep(delay);
        vm.child.kill().unwrap();
        vm.child.wait().unwrap();
        drop(vm);
        kills += 1;
        let (code, out) = qemu_img_check(&img);
        let listed = Command::new("qemu-img")
            .args(["snapshot", "-l"])
            .arg(&img)
            .output()
            .unwrap();
        let done = String::from_utf8_lossy(&listed.stdout).contains(&format!("k{run} "));
        eprintln!(
            "run {run}: killed {delay:?} into a savevm that takes {full:?}: qemu-img check exit \
             {code}, snapshot k{run} {}",
            if done { "complete" } else { "absent" }
        );
        assert!(
            code == 0 || code == 3,
            "run {run}: killed {delay:?} into a {full:?} savevm: qemu-img check exit {code}:\n{out}"
        );
        let o = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
            .arg("check")
            .arg(&img)
            .output()
            .unwrap();
        let c = o.status.code().unwrap_or(-1);
        assert!(c == 0 || c == 3, "run {run}: vmsnap check exit {c}");
    }
    assert_eq!(kills, 8);

    // The older snapshot still loads in a new process, and the guest's own check passes.
    let vm = start(dir.path(), &img, 100, Some("base"));
    let s = vm.wait_for("CHECK ");
    assert!(s.contains("CHECK OK") && !s.contains("CHECK FAIL"), "{s}");
    drop(vm);
    let (code, out) = qemu_img_check(&img);
    assert!(code == 0 || code == 3, "{out}");
    let list = Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("base"));
}
