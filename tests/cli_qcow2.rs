//! The CLI on qcow2 images, compared with QEMU's tools on the same files: `create -o` options
//! as `qemu-img info` sees them, `io` data as `qemu-io` reads it, `snapshot -c/-l/-a/-d` and
//! `check` against `qemu-img`.

mod common;

use common::{qemu_img, qemu_io, require, s, vmsnap};
use serde_json::Value;

fn info(img: &std::path::Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", s(img)]).ok().stdout).unwrap()
}

#[test]
fn create_options_as_qemu_sees_them() {
    if !require("create_options_as_qemu_sees_them", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, u64, u64, &str, u64, bool); 5] = [
        ("", "64M", 64 << 20, 65536, "1.1", 16, false),
        ("cluster_size=512", "16M", 16 << 20, 512, "1.1", 16, false),
        (
            "cluster_size=2M,refcount_bits=64",
            "1G",
            1 << 30,
            2 << 20,
            "1.1",
            64,
            false,
        ),
        ("compat=0.10", "512", 512, 65536, "0.10", 16, false),
        (
            "extended_l2=on,lazy_refcounts=on",
            "10M",
            10 << 20,
            65536,
            "1.1",
            16,
            true,
        ),
    ];
    for (i, (o, size, bytes, cluster, compat, rb, ext)) in cases.into_iter().enumerate() {
        let img = dir.path().join(format!("c{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.extend([s(&img), size]);
        let r = vmsnap(&args).ok();
        assert!(r
            .stdout
            .starts_with(&format!("Formatting '{}', fmt=qcow2", s(&img))));
        let v = info(&img);
        assert_eq!(v["virtual-size"], bytes, "{o}");
        assert_eq!(v["cluster-size"], cluster, "{o}");
        let data = &v["format-specific"]["data"];
        assert_eq!(data["compat"], compat, "{o}");
        assert_eq!(data["refcount-bits"], rb, "{o}");
        if compat == "1.1" {
            assert_eq!(data["extended-l2"], ext, "{o}");
            assert_eq!(
                data["lazy-refcounts"],
                o.contains("lazy_refcounts=on"),
                "{o}"
            );
        }
        qemu_img(&["check", s(&img)]).ok();
        // vmsnap's own info agrees with qemu-img's (apart from the host allocation).
        let mut ours: Value =
            serde_json::from_str(&vmsnap(&["info", "--output", "json", s(&img)]).ok().stdout)
                .unwrap();
        let mut theirs = v.clone();
        ours.as_object_mut().unwrap().remove("actual-size");
        theirs.as_object_mut().unwrap().remove("actual-size");
        assert_eq!(ours, theirs, "{o}");
    }
}

#[test]
fn io_and_snapshots_interoperate_with_qemu() {
    if !require(
        "io_and_snapshots_interoperate_with_qemu",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    vmsnap(&["create", "-f", "qcow2", s(&img), "64M"]).ok();
    vmsnap(&[
        "io",
        s(&img),
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -P 0x12 1M 4k",
    ])
    .ok();
    qemu_io(
        "qcow2",
        &img,
        &[
            "read -P 0x11 0 64k".into(),
            "read -P 0x12 1M 4k".into(),
            "read -P 0 64k 64k".into(),
        ],
    )
    .ok();
    vmsnap(&["snapshot", "-c", "first", s(&img)]).ok();
    qemu_img(&["check", s(&img)]).ok();
    vmsnap(&[
        "io",
        s(&img),
        "-c",
        "write -P 0x22 0 4k",
        "-c",
        "discard 1M 64k",
    ])
    .ok();
    qemu_img(&["snapshot", "-c", "by-qemu", s(&img)]).ok();

    // Listing: identical text and JSON.
    let ours = vmsnap(&["snapshot", "-l", s(&img)]).ok().stdout;
    let theirs = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert_eq!(ours, theirs);
    assert!(
        ours.contains(" first ") && ours.contains(" by-qemu "),
        "{ours}"
    );
    let ours: Value = serde_json::from_str(
        &vmsnap(&["snapshot", "-l", "--output", "json", s(&img)])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(ours, info(&img)["snapshots"]);

    // Revert with vmsnap, QEMU reads the old data.
    vmsnap(&["snapshot", "-a", "first", s(&img)]).ok();
    qemu_io(
        "qcow2",
        &img,
        &["read -P 0x11 0 64k".into(), "read -P 0x12 1M 4k".into()],
    )
    .ok();
    vmsnap(&["io", s(&img), "-c", "read -P 0x11 0 64k"]).ok();
    // Revert with QEMU to the snapshot vmsnap took after that; vmsnap reads it.
    qemu_img(&["snapshot", "-a", "by-qemu", s(&img)]).ok();
    vmsnap(&[
        "io",
        s(&img),
        "-c",
        "read -P 0x22 0 4k",
        "-c",
        "read -P 0x11 4k 60k",
        "-c",
        "read -P 0 1M 64k",
    ])
    .ok();
    // Delete by id and by name; the image stays clean.
    vmsnap(&["snapshot", "-d", "1", s(&img)]).ok();
    vmsnap(&["snapshot", "-d", "by-qemu", s(&img)]).ok();
    assert_eq!(qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout, "");
    let r = qemu_img(&["check", "--output=json", s(&img)]).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v.get("leaks").is_none(), "{v}");
    // Errors: unknown tags, duplicate names.
    vmsnap(&["snapshot", "-a", "nope", s(&img)]).fails_cleanly();
    vmsnap(&["snapshot", "-d", "nope", s(&img)]).fails_cleanly();
    vmsnap(&["snapshot", "-c", "again", s(&img)]).ok();
    vmsnap(&["snapshot", "-c", "again", s(&img)]).fails_cleanly();
}

#[test]
fn check_matches_qemu_img_and_repairs_leaks() {
    if !require("check_matches_qemu_img_and_repairs_leaks", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = common::fixture_copy("refcount-bits-1-failed-snapshot.qcow2", dir.path());
    let ours = vmsnap(&["check", s(&img)]);
    let theirs = qemu_img(&["check", s(&img)]);
    assert_eq!(ours.code, Some(3));
    assert_eq!(ours.code, theirs.code);
    assert_eq!(ours.stdout, theirs.stdout);
    assert!(ours.stderr.contains("Leaked cluster"), "{ours:?}");

    // A leak made by hand in a fresh image: the refcount of cluster 4 (the first free one
    // after header, refcount table, refcount block and L1 table) set to 1, file extended.
    let img = dir.path().join("leaky.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    let mut d = std::fs::read(&img).unwrap();
    let refblock = u64::from_be_bytes(d[0x10000..0x10008].try_into().unwrap()) as usize;
    assert_eq!(
        d[refblock + 8..refblock + 10],
        [0, 0],
        "cluster 4 must be free"
    );
    d[refblock + 8..refblock + 10].copy_from_slice(&1u16.to_be_bytes());
    d.resize(5 << 16, 0);
    std::fs::write(&img, &d).unwrap();
    let ours = vmsnap(&["check", "--output", "json", s(&img)]);
    let theirs = qemu_img(&["check", "--output=json", s(&img)]);
    assert_eq!((ours.code, theirs.code), (Some(3), Some(3)));
    let (a, b): (Value, Value) = (
        serde_json::from_str(&ours.stdout).unwrap(),
        serde_json::from_str(&theirs.stdout).unwrap(),
    );
    assert_eq!(a, b);
    let fixed = vmsnap(&["check", "-r", "leaks", s(&img)]);
    assert_eq!(fixed.code, Some(0), "{fixed:?}");
    assert!(
        fixed
            .stdout
            .contains("The following inconsistencies were found and repaired"),
        "{fixed:?}"
    );
    let after = qemu_img(&["check", s(&img)]).ok();
    assert!(after.stdout.contains("No errors were found"), "{after:?}");
    vmsnap(&["check", "-U", "-r", "all", s(&img)]).fails_cleanly();
}

#[test]
fn snapshot_dates_in_local_time_like_qemu_img() {
    if !require("snapshot_dates_in_local_time_like_qemu_img", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = common::fixture_copy("snap-basic.qcow2.gz", dir.path());
    for tz in ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"] {
        let out = |prog: &str, args: &[&str]| {
            let o = std::process::Command::new(prog)
                .args(args)
                .env("TZ", tz)
                .output()
                .unwrap();
            assert!(o.status.success(), "{prog} {args:?}: {o:?}");
            String::from_utf8(o.stdout).unwrap()
        };
        let ours = out(common::vmsnap_bin(), &["snapshot", "-l", s(&img)]);
        let theirs = out("qemu-img", &["snapshot", "-l", s(&img)]);
        assert_eq!(ours, theirs, "TZ={tz}");
    }
}

#[test]
fn failed_multi_image_snapshot_rolls_back() {
    if !require("failed_multi_image_snapshot_rolls_back", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.qcow2");
    vmsnap(&["create", "-f", "qcow2", s(&fresh), "16M"]).ok();
    vmsnap(&["io", s(&fresh), "-c", "write -P 0x5 0 128k"]).ok();
    // The second image has data and 1-bit refcounts: it cannot take a snapshot (QEMU fails
    // the same way), so the snapshot already made on the first image must be removed again.
    let rb1 = common::fixture_copy("refcount-bits-1-failed-snapshot.qcow2", dir.path());
    let rb1_before = common::file_hash(&rb1);
    let r = vmsnap(&["snapshot", "-c", "s1", s(&fresh), s(&rb1)]).fails_cleanly();
    assert!(
        r.stderr
            .contains(&format!("Error while creating snapshot on '{}'", s(&rb1))),
        "{r:?}"
    );
    assert_eq!(qemu_img(&["snapshot", "-l", s(&fresh)]).ok().stdout, "");
    let c = qemu_img(&["check", "--output=json", s(&fresh)]).ok();
    let v: Value = serde_json::from_str(&c.stdout).unwrap();
    assert!(v.get("leaks").is_none(), "rollback leaked clusters: {v}");
    assert_eq!(common::file_hash(&rb1), rb1_before);
    qemu_io("qcow2", &fresh, &["read -P 0x5 0 128k".into()]).ok();
}

/// Bytes the file system holds for `p` (QEMU's "disk size").
fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn deleting_and_applying_snapshots_give_space_back_like_qemu_img() {
    if !require(
        "deleting_and_applying_snapshots_give_space_back_like_qemu_img",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1G"]).ok();
    qemu_io("qcow2", &base, &["write -P 1 0 16M".into()]).ok();
    qemu_img(&["snapshot", "-c", "old", s(&base)]).ok();
    qemu_io("qcow2", &base, &["write -P 2 0 16M".into()]).ok();
    let full = allocated(&base);
    // delete: the snapshot's own 16 MiB go back to the file system, as with qemu-img.
    let (ours, theirs) = (
        dir.path().join("ours.qcow2"),
        dir.path().join("theirs.qcow2"),
    );
    for p in [&ours, &theirs] {
        std::fs::copy(&base, p).unwrap();
    }
    vmsnap(&["snapshot", "-d", "old", s(&ours)]).ok();
    qemu_img(&["snapshot", "-d", "old", s(&theirs)]).ok();
    let (a, b) = (allocated(&ours), allocated(&theirs));
    if b + (8 << 20) > full {
        eprintln!("SKIPPED: this file system does not punch holes (qemu-img freed nothing)");
        return;
    }
    assert!(a + (8 << 20) < full, "vmsnap freed nothing: {full} -> {a}");
    assert!(
        a.abs_diff(b) <= 1 << 20,
        "vmsnap {a} bytes, qemu-img {b} bytes"
    );
    for p in [&ours, &theirs] {
        qemu_img(&["check", s(p)]).ok();
        let io = qemu_io("qcow2", p, &["read -P 2 0 16M".into()]).ok().stdout;
        assert!(!io.contains("verification failed"), "{io}");
    }
    // apply: the active layer's own 16 MiB are dropped for the snapshot's.
    for p in [&ours, &theirs] {
        std::fs::copy(&base, p).unwrap();
    }
    vmsnap(&["snapshot", "-a", "old", s(&ours)]).ok();
    qemu_img(&["snapshot", "-a", "old", s(&theirs)]).ok();
    let (a, b) = (allocated(&ours), allocated(&theirs));
    assert!(
        a.abs_diff(b) <= 1 << 20,
        "vmsnap {a} bytes, qemu-img {b} bytes"
    );
    for p in [&ours, &theirs] {
        qemu_img(&["check", s(p)]).ok();
        let io = qemu_io("qcow2", p, &["read -P 1 0 16M".into()]).ok().stdout;
        assert!(!io.contains("verification failed"), "{io}");
    }
}
