//! Image locking both ways against a real `qemu-system-x86_64` (no KVM needed: `-machine
//! none`): while QEMU holds an image writable, vmsnap's writable and read-only opens fail with
//! a lock error (only `-U` works); while vmsnap holds it writable, `qemu-img info`, `qemu-io`
//! and QEMU itself refuse with their "Failed to get ... lock" messages.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_img, require, s, vmsnap};
use vmsnap::block::{open_image, Error, OpenOptions};

/// A background QEMU, killed (by its own pid) when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_cmd(img: &Path, fmt: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-nodefaults", "-display", "none", "-monitor", "none", "-S"]);
    c.arg("-drive")
        .arg(format!("file={},if=none,id=d0,format={fmt}", s(img)));
    if fmt == "raw" {
        // A raw node takes permissions only for a user: attach a device (CPUs stay stopped).
        c.args(["-machine", "pc", "-device", "virtio-blk-pci,drive=d0"]);
    } else {
        // qcow2 takes write permission on its file itself; no machine needed.
        c.args(["-machine", "none"]);
    }
    c.stdin(Stdio::null());
    c
}

/// Starts QEMU on `img` and waits until it holds its locks (a writable `qemu-io` starts
/// failing; read-only opens of raw images by QEMU's tools share write, so they would not).
fn start_qemu(img: &Path, fmt: &str) -> Qemu {
    let child = qemu_cmd(img, fmt)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let q = Qemu(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = common::run("qemu-io", &["-f", fmt, "-c", "read 0 1", s(img)]);
        if r.code != Some(0) && r.stderr.contains("lock") {
            return q;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU did not lock the image: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_holds_image(fmt: &str, img: &Path) {
    let before = common::file_hash(img);
    let _qemu = start_qemu(img, fmt);
    // Writable opens: the CLI and the library.
    let r = vmsnap(&["io", s(img), "-c", "write -P 0x1 0 4k"]).fails_cleanly();
    assert!(r.stderr.contains("Failed to get"), "{r:?}");
    assert!(r.stderr.contains("lock"), "{r:?}");
    let rw = OpenOptions {
        read_only: false,
        format: None,
        force_share: false,
    };
    assert!(matches!(open_image(img, rw), Err(Error::Locked { .. })));
    // Read-only opens without -U are refused too (QEMU does not share "write").
    let r = vmsnap(&["info", s(img)]).fails_cleanly();
    assert!(r.stderr.contains("Failed to get"), "{r:?}");
    let ro = OpenOptions {
        read_only: true,
        ..rw
    };
    assert!(matches!(open_image(img, ro), Err(Error::Locked { .. })));
    vmsnap(&["io", s(img), "-c", "read 0 4k"]).fails_cleanly();
    // -U (force share) reads anyway.
    let r = vmsnap(&["info", "-U", "--output", "json", s(img)]).ok();
    assert!(
        r.stdout.contains(&format!("\"format\": \"{fmt}\"")),
        "{r:?}"
    );
    assert_eq!(common::file_hash(img), before);
}

fn vmsnap_holds_image(fmt: &str, img: &Path) {
    let rw = OpenOptions {
        read_only: false,
        format: None,
        force_share: false,
    };
    let mut held = open_image(img, rw).unwrap();
    if fmt == "qcow2" {
        // qemu-img info opens raw images without I/O permissions, so only qcow2 conflicts.
        let r = qemu_img(&["info", s(img)]);
        assert_ne!(r.code, Some(0), "{r:?}");
        assert!(
            r.stderr.contains("Failed to get shared \"write\" lock"),
            "{r:?}"
        );
        let r = common::run("qemu-io", &["-r", "-f", fmt, "-c", "read 0 1", s(img)]);
        assert!(
            r.stderr.contains("Failed to get shared \"write\" lock"),
            "{r:?}"
        );
    }
    let r = common::qemu_io(fmt, img, &["read 0 4k".to_owned()]);
    assert!(r.stderr.contains("Failed to get \"write\" lock"), "{r:?}");
    let out = qemu_cmd(img, fmt)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut q = Qemu(out);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = q.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU started despite vmsnap's lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    use std::io::Read;
    q.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    held.flush().unwrap();
    drop(held);
    // Released: QEMU's tools open it again.
    qemu_img(&["info", s(img)]).ok();
}

#[test]
fn raw_locking_both_ways() {
    if !require(
        "raw_locking_both_ways",
        &["qemu-img", "qemu-io", "qemu-system-x86_64"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    qemu_img(&["create", "-f", "raw", s(&img), "1M"]).ok();
    qemu_holds_image("raw", &img);
    vmsnap_holds_image("raw", &img);
}

#[test]
fn qcow2_locking_both_ways() {
    if !require(
        "qcow2_locking_both_ways",
        &["qemu-img", "qemu-io", "qemu-system-x86_64"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_holds_image("qcow2", &img);
    vmsnap_holds_image("qcow2", &img);
    // And the snapshot subcommand respects QEMU's lock.
    let _qemu = start_qemu(&img, "qcow2");
    let r = vmsnap(&["snapshot", "-c", "s1", s(&img)]).fails_cleanly();
    assert!(r.stderr.contains("lock"), "{r:?}");
    let r = vmsnap(&["snapshot", "-l", "-U", s(&img)]).ok();
    assert_eq!(r.stdout, "");
}
