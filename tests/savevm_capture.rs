//! `capture=on` raw drives: savevm keeps their contents in the VM state, loadvm (in the
//! running process and with `--loadvm` in a new one) writes them back; limits are enforced at
//! startup; a writable raw drive without capture=on still refuses savevm as in QEMU.
mod common;
use common::monitor::Monitor;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests boot guests whose timing matters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RAW_SIZE: usize = 1 << 20;

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tools_available() -> bool {
    if !common::kvm(module_path!()) {
        return false;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIPPED: qemu-img is not installed");
        return false;
    }
    true
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn create_qcow2(path: &Path) {
    let out = qemu_img(&["create", "-f", "qcow2", path.to_str().unwrap(), "16M"]);
    assert!(out.status.success(), "{out:?}");
}

fn run_cmd(dir: &Path, drives: &[String], loadvm: Option<&str>, run: u32) -> Command {
    let sock = dir.join(format!("mon{run}.sock"));
    let serial = dir.join(format!("serial{run}.txt"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
    cmd.arg("run");
    for d in drives {
        cmd.args(["--drive", d]);
    }
    cmd.args(["--guest", "counter", "--memory", "16M"])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--monitor")
        .arg(format!("unix:{}", sock.display()));
    if let Some(tag) = loadvm {
        cmd.args(["--loadvm", tag]);
    }
    cmd
}

/// A running `vmsnap run` with a Unix-socket monitor.
struct Vmm {
    child: KillOnDrop,
    mon: Monitor,
    serial: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, drives: &[String], loadvm: Option<&str>, run: u32) -> Vmm {
        let sock = dir.join(format!("mon{run}.sock"));
        let child = run_cmd(dir, drives, loadvm, run)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(Some(child));
        let mon = Monitor::connect(&sock, || {
            let st = child.0.as_mut()?.try_wait().ok()??;
            let out = child.0.take()?.wait_with_output().ok()?;
            Some(format!("{st}: {}", String::from_utf8_lossy(&out.stderr)))
        });
        Vmm {
            child,
            mon,
            serial: dir.join(format!("serial{run}.txt")),
        }
    }

    /// Sends a command; returns its reply and the VM status after it.
    fn cmd(&mut self, line: &str) -> (String, String) {
        self.mon.cmd(line)
    }

    fn ok(&mut self, line: &str) -> String {
        self.mon.ok(line)
    }

    fn last_tick(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.serial).unwrap_or_default();
        common::ticks::ticks_of(&text).last().copied()
    }

    /// Waits until a tick above `n` has been printed.
    fn wait_past(&self, n: u64) {
        let start = Instant::now();
        while !self.last_tick().is_some_and(|t| t > n) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no tick past {n}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn quit(mut self) {
        self.mon.quit();
        let child = self.child.0.take().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn pattern() -> Vec<u8> {
    (0..RAW_SIZE as u32)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

fn assert_check(path: &Path) {
    let out = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "qemu-img check: {out:?}");
}

/// The VM state stream of snapshot `tag` on `image`.
fn stream_of(image: &Path, tag: &str) -> Vec<u8> {
    use vmsnap::block::{open_image, OpenOptions};
    use vmsnap::migration::snapshot_io::VmstateReader;
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
    if !tools_available() {
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

    let mut vm = Vmm::start(dir.path(), &drives, None, 1);
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
    let oracle = Path::new("/work/oracle/analyze-migration.py");
    if oracle.exists() {
        let mig = dir.path().join("s1.mig");
        std::fs::write(&mig, &stream).unwrap();
        let out = Command::new("python3")
            .arg(oracle)
            .arg("-f")
            .arg(&mig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            ours.trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end()
        );
    } else {
        eprintln!(
            "SKIPPED (analyze-migration part): {} is missing",
            oracle.display()
        );
    }

    // --loadvm in a new process writes them back before the guest runs.
    assert_eq!(std::fs::read(&raw).unwrap(), changed);
    let vm = Vmm::start(dir.path(), &drives, Some("s1"), 2);
    assert!(std::fs::read(&raw).unwrap() == saved, "--loadvm");
    vm.wait_past(1);
    vm.quit();
    assert_check(&d0);

    // A captured drive of another size: the stream is refused before anything changes.
    let small = vec![0x11u8; RAW_SIZE / 2];
    std::fs::write(&raw, &small).unwrap();
    let mut vm = Vmm::start(dir.path(), &drives, None, 3);
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
    let out = run_cmd(dir, drives, None, 9)
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
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIPPED (qcow2 part): qemu-img is not installed");
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
    if !tools_available() {
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
    let mut vm = Vmm::start(dir.path(), &drives, None, 1);
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
