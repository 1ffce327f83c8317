//! vmsnap reads the small golden images QEMU wrote (`testdata/qcow2`, see its README): header
//! facts, snapshot list, and every layer's contents. Needs no QEMU at run time.

mod common;

use std::path::{Path, PathBuf};

use common::{s, vmsnap};
use vmsnap::block::qcow2::Qcow2;
use vmsnap::block::{BlockDriver, OpenOptions};

/// `(offset, length, byte)` regions; everything else reads as zero.
type Layout = &'static [(u64, u64, u8)];

fn golden(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/qcow2")
        .join(name);
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

fn expected(size: u64, layout: Layout) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for &(off, len, b) in layout {
        v[off as usize..(off + len) as usize].fill(b);
    }
    v
}

fn read_all(img: &Path) -> Vec<u8> {
    let ro = OpenOptions {
        read_only: true,
        format: None,
        force_share: false,
    };
    let mut q = Qcow2::open(img, ro).unwrap();
    let mut v = vec![0u8; q.size() as usize];
    q.read_at(0, &mut v).unwrap();
    v
}

fn check_layers(name: &str, size: u64, snaps: &[(&str, Layout)], active: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let img = golden(name, dir.path());
    let listed: serde_json::Value = serde_json::from_str(
        &vmsnap(&["snapshot", "-l", "--output", "json", s(&img)])
            .ok()
            .stdout,
    )
    .unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, snaps.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    assert!(
        read_all(&img) == expected(size, active),
        "{name}: active layer"
    );
    for (snap, layout) in snaps {
        let copy = dir.path().join("copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        vmsnap(&["snapshot", "-a", snap, s(&copy)]).ok();
        assert!(
            read_all(&copy) == expected(size, layout),
            "{name}: snapshot {snap}"
        );
        vmsnap(&["check", s(&copy)]).ok();
    }
    let r = vmsnap(&["check", s(&img)]).ok();
    assert!(
        r.stdout.starts_with("No errors were found on the image.\n"),
        "{r:?}"
    );
}

#[test]
fn small_v3() {
    let s1: Layout = &[(0, 16 << 10, 0x11), (512 << 10, 4 << 10, 0x12)];
    let active: Layout = &[
        (0, 4 << 10, 0x11),
        (4 << 10, 4 << 10, 0x22),
        (8 << 10, 8 << 10, 0x11),
    ];
    check_layers("small-v3.qcow2", 1 << 20, &[("s1", s1)], active);
    let dir = tempfile::tempdir().unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &vmsnap(&[
            "info",
            "--output",
            "json",
            s(&golden("small-v3.qcow2", dir.path())),
        ])
        .ok()
        .stdout,
    )
    .unwrap();
    assert_eq!(v["cluster-size"], 4096);
    assert_eq!(v["virtual-size"], 1 << 20);
    assert_eq!(v["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(v["snapshots"][0]["icount"], 0);
}

#[test]
fn small_v2() {
    let a: Layout = &[(0, 1536, 0x31)];
    let b: Layout = &[(0, 1024, 0x31), (1024, 1024, 0x32)];
    let active: Layout = &[(512, 512, 0x31), (1024, 1024, 0x32)];
    check_layers("small-v2.qcow2", 256 << 10, &[("a", a), ("b", b)], active);
}
