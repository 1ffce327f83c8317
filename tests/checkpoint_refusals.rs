//! `vmsnap restore` refuses bad checkpoints and unusable drives with a clear message, before a
//! vCPU runs (no tick printed) and without changing any image (hashes before and after):
//! truncated, bit-flipped, wrong magic, newer version, a missing drive, a drive of another
//! size, a drive another process holds, more RAM than the host has.
mod common;
use common::run_vm::{create_qcow2, kvm_and_qemu_img, RunVm};
use common::sha256_file;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmsnap::interop::checkpoint::{Checkpoint, CheckpointWriter};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `vmsnap restore FILE extra…` expecting a refusal: returns its stderr. Asserts that
/// no tick was printed and that the images did not change.
fn refused(dir: &Path, file: &Path, extra: &[&str], images: &[&Path]) -> String {
    let before: Vec<String> = images.iter().map(|p| sha256_file(p)).collect();
    let serial = dir.join("refused.txt");
    let _ = std::fs::remove_file(&serial);
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("restore")
        .arg(file)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "restore {extra:?} was not refused: {err}"
    );
    let printed = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(!printed.contains("tick"), "a vCPU ran: {printed}");
    let after: Vec<String> = images.iter().map(|p| sha256_file(p)).collect();
    assert_eq!(before, after, "an image changed: {err}");
    err
}

/// A copy of `src` changed by `f`.
fn variant(src: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    let p = src.with_file_name(name);
    std::fs::write(&p, b).unwrap();
    p
}

/// A copy of checkpoint `src` with a changed configuration (a well-formed file: the
/// integrity record is remade).
fn with_config(
    src: &Path,
    name: &str,
    f: impl FnOnce(&mut vmsnap::interop::checkpoint::CheckpointConfig),
) -> PathBuf {
    let cp = Checkpoint::open(src).unwrap();
    let mut config = cp.config.clone();
    f(&mut config);
    let p = src.with_file_name(name);
    let mut w = CheckpointWriter::create(&p, &config, cp.header.flags).unwrap();
    let mut stream = Vec::new();
    cp.stream().unwrap().read_to_end(&mut stream).unwrap();
    w.stream().write_all(&stream).unwrap();
    w.finish().unwrap();
    p
}

#[test]
fn bad_checkpoints_and_drives_are_refused_before_anything_changes() {
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let d0 = d.join("d0.qcow2");
    let raw = d.join("vars.raw");
    create_qcow2(&d0);
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let drives = [
        format!("file={}", d0.display()),
        format!("file={},format=raw,capture=on", raw.display()),
    ];
    let good = d.join("good.ckpt");
    let vm = RunVm::start(d, &drives, 2, None, 1);
    vm.wait_past(3);
    let (reply, status) = vm.finish_with(&format!("save {}", good.display()));
    assert!(
        status.success() && reply.contains("saved"),
        "{reply} {status}"
    );
    let images = [d0.as_path(), raw.as_path()];
    let cp = Checkpoint::open(&good).unwrap();
    let stream_at = usize::try_from(cp.header.stream_offset()).unwrap();
    drop(cp);

    let f = variant(&good, "truncated.ckpt", |b| b.truncate(b.len() - 1000));
    let e = refused(d, &f, &[], &images);
    assert!(e.contains("is truncated or damaged"), "{e}");

    let f = variant(&good, "flipped.ckpt", |b| b[stream_at + 5000] ^= 0x04);
    let e = refused(d, &f, &[], &images);
    assert!(e.contains("is damaged: CRC32 is"), "{e}");

    let f = variant(&good, "magic.ckpt", |b| b[0..4].copy_from_slice(b"QEVM"));
    let e = refused(d, &f, &[], &images);
    assert!(
        e.contains("is not a vmsnap checkpoint (wrong magic)"),
        "{e}"
    );

    let f = variant(&good, "newer.ckpt", |b| b[11] = 2);
    let e = refused(d, &f, &[], &images);
    assert!(
        e.contains("has format version 2; this vmsnap reads versions 1 to 1"),
        "{e}"
    );

    let old = std::fs::canonicalize(&d0).unwrap();
    let gone = d.join("gone.qcow2");
    let e = refused(
        d,
        &good,
        &[
            "--drive-path",
            &format!("{}={}", old.display(), gone.display()),
        ],
        &images,
    );
    assert!(
        e.contains("of the checkpoint is missing") && e.contains("gone.qcow2"),
        "{e}"
    );

    let bigger = d.join("bigger.qcow2");
    std::fs::copy(&d0, &bigger).unwrap();
    let r = Command::new("qemu-img")
        .args(["resize", s(&bigger), "32M"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");
    let e = refused(
        d,
        &good,
        &[
            "--drive-path",
            &format!("{}={}", old.display(), bigger.display()),
        ],
        &[&d0, &raw, &bigger],
    );
    assert!(
        e.contains("has 33554432 bytes, the checkpoint's drive had 16777216"),
        "{e}"
    );

    let f = with_config(&good, "huge.ckpt", |c| c.memory = 1 << 50);
    let e = refused(d, &f, &[], &images);
    assert!(
        e.contains("more than this host's") && e.contains("MemTotal"),
        "{e}"
    );

    // A -c checkpoint whose disk snapshot is gone from the image.
    let f = with_config(&good, "nosnap.ckpt", |c| {
        c.disk_snapshot = Some("checkpoint-gone".into());
        c.drives[0].snapshot = true;
    });
    let e = refused(d, &f, &[], &images);
    assert!(
        e.contains("has no snapshot 'checkpoint-gone'") && e.contains("--keep-disks"),
        "{e}"
    );

    // qemu-io holds the image (QEMU's write lock) while its stdin stays open.
    let mut holder = Command::new("qemu-io")
        .arg(&d0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let e = refused(d, &good, &[], &images);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        e.contains("d0.qcow2") && e.to_lowercase().contains("lock"),
        "{e}"
    );

    // The good checkpoint itself restores (the refusals above were about the damage).
    let vm = RunVm::restore(d, &good, 2, &[]);
    vm.wait_past(4);
    vm.quit();
}
