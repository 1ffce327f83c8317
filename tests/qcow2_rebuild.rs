//! `vmsnap check -r all` on images whose refcount table itself is damaged (iotests 060/108
//! style): reserved bits in an entry, an unaligned block, a block outside the image, one
//! block referenced twice, a zero entry over clusters in use. vmsnap writes a new refcount
//! structure past the end of the file and switches the header to it (QEMU's
//! `rebuild_refcount_structure`); afterwards `qemu-img check` is clean, every layer reads
//! the same through qemu-img as before the damage, and the snapshot table is the same.
//! (QEMU 7.2's own `qemu-img check -r all` fails on the first two: its rebuild writes a new
//! block over the damaged one, which its overlap check refuses, and marks the image corrupt.)
//!
//! A SIGKILL at every write and flush of the rebuild leaves an image no worse than before:
//! the same `qemu-img check` class, the same layers, and a later `check -r all` still
//! repairs it.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{qemu_img, qemu_io, qemu_layer, qemu_snapshot_ids, s, vmsnap};

/// A 64 MiB image with data in two layers: `s1`, then more writes on the active layer.
fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]).ok();
    qemu_io(
        "qcow2",
        &img,
        &["write -P 1 0 1M".into(), "write -P 2 8M 512k".into()],
    )
    .ok();
    qemu_img(&["snapshot", "-c", "s1", s(&img)]).ok();
    qemu_io(
        "qcow2",
        &img,
        &["write -P 3 0 256k".into(), "write -P 4 32M 1M".into()],
    )
    .ok();
    img
}

/// Sets refcount table entry `idx` to what `value` makes of entry 0.
fn damage(src: &Path, dst: &Path, idx: u64, value: impl Fn(u64) -> u64) {
    let mut b = std::fs::read(src).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap()) as usize;
    let e0 = u64::from_be_bytes(b[rt..rt + 8].try_into().unwrap());
    let at = rt + idx as usize * 8;
    b[at..at + 8].copy_from_slice(&value(e0).to_be_bytes());
    std::fs::write(dst, b).unwrap();
}

/// What a user sees of the image: both layers and the snapshot table.
fn seen(img: &Path, tmp: &Path) -> Layers {
    (
        qemu_layer(img, None, tmp),
        qemu_layer(img, Some("s1"), tmp),
        qemu_snapshot_ids(img),
    )
}

type Layers = (Vec<u8>, Vec<u8>, Vec<(String, String)>);

/// A scratch folder with the image made and what it shows; `None` (skipped loudly) without
/// QEMU's tools.
fn setup() -> Option<(tempfile::TempDir, PathBuf, Layers)> {
    if !common::require(module_path!(), &["qemu-img", "qemu-io"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make_image(dir.path());
    let good = seen(&base, dir.path());
    Some((dir, base, good))
}

type Damage = (&'static str, u64, fn(u64) -> u64);

const CASES: &[Damage] = &[
    ("reserved bits", 0, |e| e | 0x100),
    ("unaligned block", 0, |e| e + 0x8000),
    ("block outside the image", 0, |_| 1 << 40),
    ("block referenced twice", 1, |e| e),
    ("zero entry over clusters in use", 0, |_| 0),
];

#[test]
fn check_repair_all_rebuilds_a_damaged_refcount_table() {
    let Some((dir, base, good)) = setup() else {
        return;
    };
    for (name, idx, value) in CASES {
        let img = dir.path().join("d.qcow2");
        damage(&base, &img, *idx, value);
        let before = qemu_img(&["check", s(&img)]);
        assert!(
            matches!(before.code, Some(1 | 2)),
            "{name}: qemu-img sees no damage: {before:?}"
        );
        let r = vmsnap(&["check", "-r", "all", s(&img)]);
        assert_eq!(r.code, Some(0), "{name}: {r:#?}");
        assert!(
            r.stderr.contains("Rebuilding refcount structure"),
            "{name}: {}",
            r.stderr
        );
        let after = qemu_img(&["check", s(&img)]);
        assert_eq!(after.code, Some(0), "{name}: {after:#?}");
        assert!(seen(&img, dir.path()) == good, "{name}: the data changed");
        // The image stays usable: a snapshot and a write through vmsnap, still clean.
        vmsnap(&["snapshot", "-c", "after", s(&img)]).ok();
        qemu_img(&["check", s(&img)]).ok();
    }
}

#[test]
fn a_kill_at_any_write_of_the_rebuild_leaves_the_image_no_worse() {
    let Some((dir, base, good)) = setup() else {
        return;
    };
    let damaged = dir.path().join("damaged.qcow2");
    damage(&base, &damaged, 0, |e| e | 0x100);
    let class = qemu_img(&["check", s(&damaged)]).code;

    // Trace one whole repair to learn its kill points.
    let img = dir.path().join("k.qcow2");
    std::fs::copy(&damaged, &img).unwrap();
    let trace = dir.path().join("trace");
    let o = Command::new(common::vmsnap_bin())
        .args(["check", "-r", "all", s(&img)])
        .env("VMSNAP_TEST_KILL_TRACE", &trace)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let points: Vec<&str> = trace.lines().filter(|l| l.starts_with("qcow2:")).collect();
    assert!(
        points.iter().any(|p| p.starts_with("qcow2:write:header")),
        "no header write in the trace:\n{trace}"
    );
    for p in points {
        let (phase, n) = p.split_once(' ').unwrap();
        std::fs::copy(&damaged, &img).unwrap();
        let o = Command::new(common::vmsnap_bin())
            .args(["check", "-r", "all", s(&img)])
            .env("VMSNAP_TEST_KILL_AT", format!("{phase}:{n}"))
            .output()
            .unwrap();
        assert!(
            o.status.code().is_none(),
            "{p}: the kill did not fire: {o:?}"
        );
        let c = qemu_img(&["check", s(&img)]).code;
        // Before the header switch the old (damaged) structure is in place; after it the
        // image is consistent, leaks at most.
        assert!(
            c == class || matches!(c, Some(0 | 3)),
            "{p}: qemu-img check {c:?}, was {class:?}"
        );
        assert!(seen(&img, dir.path()) == good, "{p}: the data changed");
        let r = vmsnap(&["check", "-r", "all", s(&img)]);
        assert_eq!(r.code, Some(0), "{p}: {r:#?}");
        qemu_img(&["check", s(&img)]).ok();
    }
}
