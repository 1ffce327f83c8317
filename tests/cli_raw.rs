//! CLI plumbing on raw images: create, io (qemu-io syntax), info, check, snapshot refusal,
//! and clean errors for bad arguments. Needs no QEMU.

mod common;

use common::{s, vmsnap};

#[test]
fn create_io_info_roundtrip_on_raw() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    let r = vmsnap(&["create", "-f", "raw", s(&img), "1M"]).ok();
    assert!(r.stdout.contains("fmt=raw size=1048576"), "{r:?}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);

    let r = vmsnap(&[
        "io",
        s(&img),
        "-c",
        "write -P 0xab 4k 64k",
        "-c",
        "write -z 8k 4k",
        "-c",
        "read -P 0xab 4k 4k",
        "-c",
        "read -P 0 8k 4k",
        "-c",
        "read -P 0xab 12k 56k",
    ])
    .ok();
    assert!(
        r.stdout.contains("wrote 65536/65536 bytes at offset 4096"),
        "{r:?}"
    );
    let data = std::fs::read(&img).unwrap();
    assert!(data[4096..8192].iter().all(|&b| b == 0xab));
    assert!(data[8192..12288].iter().all(|&b| b == 0));
    assert!(data[12288..4096 + 65536].iter().all(|&b| b == 0xab));
    assert!(data[..4096].iter().all(|&b| b == 0));

    let r = vmsnap(&["info", "--output", "json", s(&img)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["virtual-size"], 1 << 20);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["filename"], s(&img));
    assert_eq!(v["dirty-flag"], false);

    let r = vmsnap(&["info", s(&img)]).ok();
    assert!(r
        .stdout
        .contains("file format: raw\nvirtual size: 1 MiB (1048576 bytes)\n"));
}

#[test]
fn read_pattern_mismatch_names_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    vmsnap(&["create", "-f", "raw", s(&img), "64k"]).ok();
    vmsnap(&["io", s(&img), "-c", "write -P 0x5a 0 4k"]).ok();
    let r = vmsnap(&["io", s(&img), "-c", "read -P 0x5a 0 8k"]).fails_cleanly();
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains("Pattern verification failed at offset 4096 (0x1000)"),
        "{r:?}"
    );
}

#[test]
fn io_errors_are_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    vmsnap(&["create", "-f", "raw", s(&img), "64k"]).ok();
    let before = std::fs::read(&img).unwrap();
    for cmd in [
        "read 60k 8k",
        "write 0 128k",
        "write -P 0x1 0xffffffffffff 1",
        "frobnicate 0 1",
        "read 0",
        "write -P nope 0 1",
        "read 1Q 1",
    ] {
        let r = vmsnap(&["io", s(&img), "-c", cmd]).fails_cleanly();
        assert!(r.stderr.starts_with("vmsnap: error: "), "{cmd}: {r:?}");
    }
    // A bad command later in the list stops everything before any I/O happens.
    vmsnap(&["io", s(&img), "-c", "write 0 4k", "-c", "bogus"]).fails_cleanly();
    assert_eq!(std::fs::read(&img).unwrap(), before);
    vmsnap(&["io", s(&dir.path().join("missing")), "-c", "read 0 1"]).fails_cleanly();
}

#[test]
fn raw_images_cannot_snapshot_or_check() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    vmsnap(&["create", "-f", "raw", s(&img), "64k"]).ok();
    let r = vmsnap(&["snapshot", "-c", "s1", s(&img)]).fails_cleanly();
    assert!(
        r.stderr.contains(&format!(
            "Device '{}' is writable but does not support snapshots",
            s(&img)
        )),
        "{r:?}"
    );
    // Listing a raw image shows nothing, like qemu-img.
    let r = vmsnap(&["snapshot", "-l", s(&img)]).ok();
    assert_eq!(r.stdout, "");
    let r = vmsnap(&["snapshot", "-l", "--output", "json", s(&img)]).ok();
    assert_eq!(r.stdout.trim(), "[]");
    let r = vmsnap(&["check", s(&img)]);
    assert_eq!(r.code, Some(63), "{r:?}");
    assert!(r.stderr.contains("does not support checks"));
    vmsnap(&["snapshot", "-d", "s1", s(&img)]).fails_cleanly();
    vmsnap(&["snapshot", "-a", "s1", s(&img)]).fails_cleanly();
}

#[test]
fn bad_arguments_fail_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.img");
    for args in [
        vec!["create", "-f", "vhdx", s(&img), "1M"],
        vec!["create", "-f", "raw", s(&img), "12parsecs"],
        vec![
            "create",
            "-f",
            "raw",
            "-o",
            "cluster_size=4k",
            s(&img),
            "1M",
        ],
        vec!["create", "-o", "cluster_size=3000", s(&img), "1M"],
        vec!["create", "-o", "refcount_bits=7", s(&img), "1M"],
        vec!["create", "-o", "compat=9", s(&img), "1M"],
        vec!["create", "-o", "bogus=1", s(&img), "1M"],
        vec!["snapshot", s(&img)],
        vec!["snapshot", "-l", "-c", "x", s(&img)],
        vec!["check", "-r", "everything", s(&img)],
        vec!["info", "--output", "xml", s(&img)],
        vec!["info", s(&img)],
        vec!["io", s(&img)],
        vec!["nosuchcommand"],
    ] {
        vmsnap(&args).fails_cleanly();
    }
    assert!(
        !img.exists(),
        "no image may be created by a failing command"
    );
}

#[test]
fn raw_outputs_match_qemu_img() {
    if !common::require("raw_outputs_match_qemu_img", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let ours = vmsnap(&["create", "-f", "raw", s(&a), "1M"]).ok().stdout;
    let theirs = common::qemu_img(&["create", "-f", "raw", s(&b), "1M"])
        .ok()
        .stdout;
    assert_eq!(ours.replace(s(&a), "X"), theirs.replace(s(&b), "X"));
    vmsnap(&["io", s(&a), "-c", "write -P 0x42 64k 64k"]).ok();
    let ours = vmsnap(&["info", s(&a)]).ok().stdout;
    let theirs = common::qemu_img(&["info", s(&a)]).ok().stdout;
    assert_eq!(ours, theirs);
    let ours: serde_json::Value =
        serde_json::from_str(&vmsnap(&["info", "--output", "json", s(&a)]).ok().stdout).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(
        &common::qemu_img(&["info", "--output=json", s(&a)])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(ours, theirs);
    // Byte for byte, indentation and key order included.
    let ours = vmsnap(&["info", "--output", "json", s(&a)]).ok().stdout;
    let theirs = common::qemu_img(&["info", "--output=json", s(&a)])
        .ok()
        .stdout;
    assert_eq!(ours, theirs);
    // qemu-io reads what vmsnap wrote.
    common::qemu_io(
        "raw",
        &a,
        &["read -P 0x42 64k 64k".into(), "read -P 0 0 64k".into()],
    )
    .ok();
}
