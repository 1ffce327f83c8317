//! `vmsnap check` and `vmsnap-inspect --snapshot` verify vmsnap's integrity record: clean
//! images read as before, a flipped bit in a stored VM state is reported with the snapshot's
//! name, and QEMU-made snapshots (no record) are unaffected.

mod common;
mod interop_util;

use std::path::{Path, PathBuf};

use common::*;
use interop_util::*;

fn inspect(args: &[&str]) -> Run {
    run(env!("CARGO_BIN_EXE_vmsnap-inspect"), args)
}

/// An image with a QEMU-made snapshot (`first`, no record) and an imported one (`ours`), and
/// the image file offset of some bytes of `ours`'s VM state.
fn image(dir: &Path) -> (PathBuf, usize) {
    let img = fixture_copy("snap-basic.qcow2.gz", dir);
    let before = std::fs::read(&img).unwrap();
    let mig = fixture_copy("mig-pc.bin.gz", dir);
    vmsnap(&["vmstate", "import", s(&img), "ours", s(&mig)]).ok();
    let state = std::fs::read(&mig).unwrap();
    let pos = find_new_state_bytes(&img, &before, &state, 0x10_0000);
    (img, pos)
}

#[test]
fn check_verifies_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (img, pos) = image(dir.path());
    let clean = vmsnap(&["check", s(&img)]).ok();
    assert!(
        clean
            .stdout
            .starts_with("No errors were found on the image.\n"),
        "{clean:?}"
    );
    assert!(!clean.stderr.contains("damaged"), "{clean:?}");
    let json = vmsnap(&["check", "--output", "json", s(&img)]).ok().stdout;
    assert!(!json.contains("vmstate"), "{json}");
    flip_bit_at(&img, pos);
    let r = vmsnap(&["check", s(&img)]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("snapshot 'ours': VM state is damaged"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("'first'"), "{}", r.stderr);
    let j = vmsnap(&["check", "--output", "json", s(&img)]);
    assert_eq!(j.code, Some(2));
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(
        v["vmstate-damaged"],
        serde_json::json!(["ours"]),
        "{}",
        j.stdout
    );
    if require("check_verifies_the_record", &["qemu-img"]) {
        // QEMU's own check knows nothing of it: the metadata is fine.
        qemu_img(&["check", s(&img)]).ok();
    }
}

#[test]
fn inspector_verifies_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (img, pos) = image(dir.path());
    let ok = inspect(&[s(&img), "--snapshot", "ours"]).ok();
    assert!(!ok.stderr.contains("damaged"), "{}", ok.stderr);
    let first = inspect(&[s(&img), "--snapshot", "first"]).ok();
    assert!(!first.stderr.contains("damaged"), "{}", first.stderr);
    flip_bit_at(&img, pos);
    let r = inspect(&[s(&img), "--snapshot", "ours"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("snapshot 'ours': VM state is damaged"),
        "{}",
        r.stderr
    );
    // The decoded state is still shown, for debugging.
    assert!(!r.stdout.is_empty());
    inspect(&[s(&img), "--snapshot", "first"]).ok();
}
