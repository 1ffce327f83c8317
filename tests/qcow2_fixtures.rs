//! Every qcow2 image QEMU 7.2 wrote in `../shared/fixtures/qemu-7.2/` (and `two-disks/`):
//! - `vmsnap snapshot -l` (JSON and text) agrees with `qemu-img info`/`snapshot -l`;
//! - `vmsnap check` agrees with `qemu-img check` (JSON, text and exit status);
//! - every snapshot's and the active layer's content, read by vmsnap, matches `*.layers.json`;
//! - deleting every snapshot with vmsnap leaves `qemu-img check` clean, without leaks;
//! - a snapshot vmsnap then creates is listed and read correctly by `qemu-img`.
//!
//! Images with `refcount_bits=1` cannot share clusters: there vmsnap may refuse to change
//! the image, and then the refusal must be clean and leave the file's bytes unchanged.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture_copy, fixtures, qemu_img, qemu_layer, require, s, sha256, vmsnap, Run};
use serde_json::Value;
use vmsnap::block::qcow2::Qcow2;
use vmsnap::block::raw::Raw;
use vmsnap::block::{BlockDriver, BlockSet, OpenOptions};

const RO: OpenOptions = OpenOptions {
    read_only: true,
    format: None,
    force_share: false,
};
const RW: OpenOptions = OpenOptions {
    read_only: false,
    format: None,
    force_share: false,
};

/// `(layer name, sha256)` from `*.layers.json`; `(active)` is the active layer.
fn layers(stem: &str) -> Vec<(String, String)> {
    let p = fixtures().join(format!("{stem}.layers.json"));
    let Ok(text) = std::fs::read_to_string(p) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&text).unwrap();
    v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["layer"].as_str().unwrap().to_owned(),
                l["sha256_qemu_img_convert"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn json(r: &Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {r:#?}"))
}

/// sha256 of the active layer, read through vmsnap's library.
fn vmsnap_active_sha(img: &Path) -> String {
    let mut q = Qcow2::open(img, RO).unwrap();
    let size = q.size();
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        q.read_at(i as u64 * (1 << 20), chunk).unwrap();
    }
    sha256(&data)
}

fn refcount_bits(img: &Path) -> u32 {
    Qcow2::open(img, RO).unwrap().info().refcount_bits
}

fn compare_listing(img: &Path, stem: &str) {
    let ours = json(&vmsnap(&["snapshot", "-l", "--output", "json", s(img)]).ok());
    let info = json(&qemu_img(&["info", "--output=json", s(img)]).ok());
    let theirs = info
        .get("snapshots")
        .cloned()
        .unwrap_or(Value::Array(vec![]));
    assert_eq!(ours, theirs, "{stem}: snapshot list JSON differs");

    let ours = vmsnap(&["snapshot", "-l", s(img)]).ok().stdout;
    let theirs = qemu_img(&["snapshot", "-l", s(img)]).ok().stdout;
    assert_eq!(ours, theirs, "{stem}: snapshot -l text differs");
    let shipped = fixtures().join(format!("{stem}.snapshot-l.txt"));
    assert_eq!(
        ours,
        std::fs::read_to_string(shipped).unwrap(),
        "{stem}: differs from the shipped snapshot-l.txt (dates are UTC)"
    );

    // info: the JSON keys qemu-img has, with the same values (actual-size is the copy's).
    let mut ours = json(&vmsnap(&["info", "--output", "json", s(img)]).ok());
    let mut theirs = info;
    for v in [&mut ours, &mut theirs] {
        v.as_object_mut().unwrap().remove("actual-size");
    }
    assert_eq!(ours, theirs, "{stem}: info JSON differs");
    // Byte for byte, key order and indentation included (same file, same actual size).
    let ours = vmsnap(&["info", "--output", "json", s(img)]).ok().stdout;
    let theirs = qemu_img(&["info", "--output=json", s(img)]).ok().stdout;
    assert_eq!(ours, theirs, "{stem}: info JSON text differs");
    // The text is the same too (same file, so the same "disk size").
    let ours = vmsnap(&["info", s(img)]).ok().stdout;
    let theirs = qemu_img(&["info", s(img)]).ok().stdout;
    assert_eq!(ours, theirs, "{stem}: info text differs");
}

/// Compares check JSON, text and exit status; returns the exit status.
fn compare_check(img: &Path, stem: &str) -> Option<i32> {
    let ours = vmsnap(&["check", "--output", "json", s(img)]);
    let theirs = qemu_img(&["check", "--output=json", s(img)]);
    assert_eq!(
        ours.code, theirs.code,
        "{stem}: check exit status: {ours:#?} {theirs:#?}"
    );
    assert_eq!(json(&ours), json(&theirs), "{stem}: check JSON differs");
    assert_eq!(
        ours.stdout, theirs.stdout,
        "{stem}: check JSON text differs"
    );
    let ours = vmsnap(&["check", s(img)]);
    let theirs = qemu_img(&["check", s(img)]);
    assert_eq!(ours.stdout, theirs.stdout, "{stem}: check text differs");
    theirs.code
}

fn compare_layers(img: &Path, stem: &str, dir: &Path) {
    let rb1 = refcount_bits(img) == 1;
    for (layer, sha) in layers(stem) {
        if layer == "(active)" {
            assert_eq!(vmsnap_active_sha(img), sha, "{stem}: active layer");
            continue;
        }
        let copy = dir.join("goto.qcow2");
        std::fs::copy(img, &copy).unwrap();
        let r = vmsnap(&["snapshot", "-a", &layer, s(&copy)]);
        if rb1 && r.code != Some(0) {
            r.fails_cleanly();
            eprintln!(
                "{stem}: vmsnap refuses goto on a refcount_bits=1 image; layer {layer} unread"
            );
            continue;
        }
        r.ok();
        assert_eq!(vmsnap_active_sha(&copy), sha, "{stem}: snapshot {layer}");
        // QEMU agrees that the reverted image is consistent and holds the snapshot's data.
        qemu_img(&["check", s(&copy)]).ok();
        assert_eq!(
            sha256(&qemu_layer(&copy, None, dir)),
            sha,
            "{stem}: {layer} via qemu"
        );
    }
}

fn delete_all_then_create(img: &Path, stem: &str, dir: &Path, check_status: Option<i32>) {
    let rb1 = refcount_bits(img) == 1;
    let active = sha256(&qemu_layer(img, None, dir));
    let listed = json(&vmsnap(&["snapshot", "-l", "--output", "json", s(img)]).ok());
    for snap in listed.as_array().unwrap() {
        let id = snap["id"].as_str().unwrap();
        let before = common::file_hash(img);
        let r = vmsnap(&["snapshot", "-d", id, s(img)]);
        if rb1 && r.code != Some(0) {
            r.fails_cleanly();
            assert_eq!(
                common::file_hash(img),
                before,
                "{stem}: refused delete changed bytes"
            );
            continue;
        }
        r.ok();
    }
    let after = qemu_img(&["check", "--output=json", s(img)]);
    if check_status == Some(0) {
        assert_eq!(
            after.code,
            Some(0),
            "{stem}: check after deletes: {after:#?}"
        );
        let v = json(&after);
        assert!(
            v.get("leaks").is_none() && v.get("corruptions").is_none(),
            "{v}"
        );
    } else {
        assert_eq!(
            after.code, check_status,
            "{stem}: check status changed: {after:#?}"
        );
    }
    assert_eq!(
        sha256(&qemu_layer(img, None, dir)),
        active,
        "{stem}: active layer changed"
    );

    let before = common::file_hash(img);
    let r = vmsnap(&["snapshot", "-c", "made-by-vmsnap", s(img)]);
    if rb1 {
        // With data in the image, a 1-bit refcount cannot count a second reference.
        r.fails_cleanly();
        assert_eq!(
            common::file_hash(img),
            before,
            "{stem}: refused create changed bytes"
        );
        return;
    }
    r.ok();
    let ids = common::qemu_snapshot_ids(img);
    assert!(
        ids.iter().any(|(_, n)| n == "made-by-vmsnap"),
        "{stem}: qemu-img does not list the new snapshot: {ids:?}"
    );
    let c = qemu_img(&["check", s(img)]);
    assert_eq!(c.code, check_status, "{stem}: check after create: {c:#?}");
    let snap = qemu_layer(img, Some("made-by-vmsnap"), dir);
    assert_eq!(
        sha256(&snap),
        active,
        "{stem}: qemu-img reads the new snapshot wrongly"
    );
    // Writing after the snapshot must not change it (copy-on-write).
    vmsnap(&["io", s(img), "-c", "write -P 0xee 0 4k"]).ok();
    let snap = qemu_layer(img, Some("made-by-vmsnap"), dir);
    assert_eq!(
        sha256(&snap),
        active,
        "{stem}: snapshot changed by a later write"
    );
    qemu_img(&["check", s(img)]);
}

fn fixture(rel: &str) {
    let test = format!("qcow2_fixtures::{rel}");
    if !require(&test, &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = fixture_copy(rel, dir.path());
    let stem = rel
        .trim_end_matches(".gz")
        .trim_end_matches(".qcow2")
        .to_owned();
    compare_listing(&img, &stem);
    let status = compare_check(&img, &stem);
    compare_layers(&img, &stem, dir.path());
    delete_all_then_create(&img, &stem, dir.path(), status);
}

macro_rules! fixture_tests {
    ($($name:ident => $rel:expr,)*) => {$(
        #[test]
        fn $name() {
            fixture($rel);
        }
    )*};
}

fixture_tests! {
    cluster_2m => "cluster-2M.qcow2.gz",
    cluster_512 => "cluster-512.qcow2",
    compat_0_10 => "compat-0.10.qcow2.gz",
    compressed => "compressed.qcow2.gz",
    refcount_bits_1 => "refcount-bits-1.qcow2.gz",
    refcount_bits_1_failed_snapshot => "refcount-bits-1-failed-snapshot.qcow2",
    refcount_bits_64 => "refcount-bits-64.qcow2.gz",
    snap_basic => "snap-basic.qcow2.gz",
    qq_disk0 => "two-disks/qq-disk0.qcow2.gz",
    qq_disk1 => "two-disks/qq-disk1.qcow2",
    qr_disk0 => "two-disks/qr-disk0.qcow2",
    qro_disk0 => "two-disks/qro-disk0.qcow2.gz",
}

fn two(dir: &Path, a: &str, b: &str) -> (PathBuf, PathBuf) {
    (fixture_copy(a, dir), fixture_copy(b, dir))
}

#[test]
fn two_qcow2_disks_act_as_one_vm() {
    if !require("two_qcow2_disks_act_as_one_vm", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = two(
        dir.path(),
        "two-disks/qq-disk0.qcow2.gz",
        "two-disks/qq-disk1.qcow2",
    );
    // Listing both: per image, like qemu-img on each.
    let r = vmsnap(&["snapshot", "-l", "--output", "json", s(&d0), s(&d1)]).ok();
    let v = json(&r);
    assert_eq!(v[0]["filename"], s(&d0));
    assert_eq!(v[0]["snapshots"][0]["name"], "s1");
    assert!(v[0]["snapshots"][0]["vm-state-size"].as_u64().unwrap() > 0);
    assert_eq!(v[1]["snapshots"][0]["vm-state-size"], 0);

    // A BlockSet puts the VM state on the first drive, as QEMU did.
    let mut set = BlockSet::new();
    set.add("drive0", Box::new(Qcow2::open(&d0, RW).unwrap()))
        .unwrap();
    set.add("drive1", Box::new(Qcow2::open(&d1, RW).unwrap()))
        .unwrap();
    assert!(set.has_snapshot("s1"));
    assert_eq!(set.vmstate_device(None).unwrap().name, "drive0");
    let mut p = vmsnap::block::SnapshotParams {
        name: "s2".into(),
        vm_state_size: 0,
        ..Default::default()
    };
    p.date_sec = 1_800_000_000;
    set.create(&p, "drive0").unwrap();
    assert!(set.has_snapshot("s2"));
    set.flush().unwrap();
    drop(set);
    for d in [&d0, &d1] {
        qemu_img(&["check", s(d)]).ok();
        let ids = common::qemu_snapshot_ids(d);
        assert_eq!(
            ids.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
            ["s1", "s2"]
        );
    }

    // Change both, revert both through the CLI.
    vmsnap(&["io", s(&d0), "-c", "write -P 0x77 0 64k"]).ok();
    vmsnap(&["io", s(&d1), "-c", "write -P 0x77 64k 64k"]).ok();
    vmsnap(&["snapshot", "-a", "s1", s(&d0), s(&d1)]).ok();
    assert_eq!(vmsnap_active_sha(&d0), layers("two-disks/qq-disk0")[0].1);
    assert_eq!(vmsnap_active_sha(&d1), layers("two-disks/qq-disk1")[0].1);
    // A tag only one image has is refused before anything changes.
    vmsnap(&["snapshot", "-c", "only0", s(&d0)]).ok();
    let before = (common::file_hash(&d0), common::file_hash(&d1));
    let r = vmsnap(&["snapshot", "-a", "only0", s(&d0), s(&d1)]).fails_cleanly();
    assert!(r.stderr.contains(s(&d1)), "{r:?}");
    assert_eq!((common::file_hash(&d0), common::file_hash(&d1)), before);
    vmsnap(&["snapshot", "-d", "s2", s(&d0), s(&d1)]).ok();
    for d in [&d0, &d1] {
        qemu_img(&["check", s(d)]).ok();
    }
}

#[test]
fn writable_raw_disk_blocks_the_snapshot() {
    if !require("writable_raw_disk_blocks_the_snapshot", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, r) = two(
        dir.path(),
        "two-disks/qr-disk0.qcow2",
        "two-disks/qr-disk1.raw.gz",
    );
    let before = common::file_hash(&q);
    let out = vmsnap(&["snapshot", "-c", "s1", s(&q), s(&r)]).fails_cleanly();
    // QEMU's text (savevm-with-raw-disk.error.txt), with our device name (the path).
    assert!(
        out.stderr.contains(&format!(
            "Device '{}' is writable but does not support snapshots",
            s(&r)
        )),
        "{out:?}"
    );
    assert_eq!(common::file_hash(&q), before);
    assert_eq!(qemu_img(&["snapshot", "-l", s(&q)]).ok().stdout, "");

    // The same raw disk attached read-only is skipped (qcow2-plus-readonly-raw).
    let mut set = BlockSet::new();
    set.add("drive0", Box::new(Qcow2::open(&q, RW).unwrap()))
        .unwrap();
    set.add("drive1", Box::new(Raw::open(&r, RO).unwrap()))
        .unwrap();
    set.can_snapshot().unwrap();
    let p = vmsnap::block::SnapshotParams {
        name: "s1".into(),
        ..Default::default()
    };
    let made = set.create(&p, "drive0").unwrap();
    assert_eq!(made.len(), 1);
    set.flush().unwrap();
    drop(set);
    qemu_img(&["check", s(&q)]).ok();
    assert_eq!(
        common::qemu_snapshot_ids(&q),
        [("1".to_owned(), "s1".to_owned())]
    );
}
