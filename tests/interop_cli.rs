//! `vmsnap vmstate import/export` on QEMU 7.2's own migration streams and snapshots, checked
//! with `qemu-img check`/`snapshot -l` and with our reader; no QEMU run needed.

mod common;
mod interop_util;

use std::path::Path;

use common::*;
use interop_util::*;

fn new_image(dir: &Path, name: &str, size: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    vmsnap(&["create", "-f", "qcow2", s(&img), size]).ok();
    img
}

#[test]
fn import_then_export_gives_the_same_bytes_and_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-pc.bin.gz", dir.path());
    let img = new_image(dir.path(), "d.qcow2", "64M");
    vmsnap(&["io", s(&img), "-c", "write -P 0x5a 0 64k"]).ok();
    vmsnap(&[
        "vmstate",
        "import",
        s(&img),
        "imp",
        s(&mig),
        "--date",
        "2026-01-02 03:04:05",
        "--vm-clock",
        "1500000000",
    ])
    .ok();
    let state = std::fs::read(&mig).unwrap();
    let rec = record_of(&img, "imp").expect("integrity record");
    assert_eq!(rec.state_len, state.len() as u64);
    assert_eq!(rec.checksum, crc32fast::hash(&state));
    assert!(matches!(
        verify(&img, "imp").unwrap(),
        vmsnap::interop::integrity::Verification::Verified(_)
    ));
    if require("import_then_export", &["qemu-img"]) {
        qemu_img(&["check", s(&img)]).ok();
        let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
        assert!(
            l.contains("imp ") && l.contains("28.5 MiB 2026-01-02 03:04:05 00:00:01.500"),
            "{l}"
        );
        // The snapshot's disk is the disk at import time.
        let layer = qemu_layer(&img, Some("imp"), dir.path());
        assert!(layer[..65536].iter().all(|&b| b == 0x5a));
    }
    let out = dir.path().join("out.bin");
    vmsnap(&["vmstate", "export", s(&img), "imp", "-o", s(&out)]).ok();
    assert!(
        std::fs::read(&out).unwrap() == state,
        "export differs from the import"
    );
}

#[test]
fn import_goes_to_every_disk_with_the_state_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-q35.bin.gz", dir.path());
    let a = new_image(dir.path(), "a.qcow2", "16M");
    let b = new_image(dir.path(), "b.qcow2", "16M");
    vmsnap(&[
        "vmstate",
        "import",
        s(&a),
        s(&b),
        "s1",
        s(&mig),
        "--vmstate-device",
        s(&b),
    ])
    .ok();
    let j = |img: &Path| {
        let out = vmsnap(&["snapshot", "-l", "--output", "json", s(img)])
            .ok()
            .stdout;
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    assert_eq!(j(&a)[0]["name"], "s1");
    assert_eq!(j(&a)[0]["vm-state-size"], 0);
    assert_eq!(
        j(&b)[0]["vm-state-size"],
        std::fs::metadata(&mig).unwrap().len()
    );
    // The vmstate disk's entry verifies; the other disk's entry has no state to verify.
    assert!(matches!(
        verify(&b, "s1").unwrap(),
        vmsnap::interop::integrity::Verification::Verified(_)
    ));
    assert_eq!(
        verify(&a, "s1").unwrap(),
        vmsnap::interop::integrity::Verification::NoRecord
    );
    if require("import_goes_to_every_disk", &["qemu-img"]) {
        qemu_img(&["check", s(&a)]).ok();
        qemu_img(&["check", s(&b)]).ok();
    }
    // Exporting from the disk without state is refused by name.
    let r = vmsnap(&[
        "vmstate",
        "export",
        s(&a),
        "s1",
        "-o",
        s(&dir.path().join("x")),
    ]);
    assert!(r
        .fails_cleanly()
        .stderr
        .contains("'s1' is a disk-only snapshot"));
}

#[test]
fn bad_streams_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-pc.bin.gz", dir.path());
    let state = std::fs::read(&mig).unwrap();
    let img = new_image(dir.path(), "d.qcow2", "16M");
    let before = file_hash(&img);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"this is not a migration stream".to_vec(),
            "bad magic",
        ),
        ("v2", b"QEVM\0\0\0\x02rest".to_vec(), "obsolete"),
        (
            "truncated",
            state[..state.len() / 2].to_vec(),
            "unexpected end",
        ),
        ("no-vmdesc-end", state[..state.len() - 10].to_vec(), "end"),
        ("trailing", [state.as_slice(), b"XX"].concat(), "after"),
        ("empty", Vec::new(), "end"),
    ];
    for (name, bytes, msg) in cases {
        let f = dir.path().join(name);
        std::fs::write(&f, bytes).unwrap();
        let r = vmsnap(&["vmstate", "import", s(&img), "t", s(&f)]).fails_cleanly();
        assert!(
            r.stderr.contains("refusing to import"),
            "{name}: {}",
            r.stderr
        );
        assert!(
            r.stderr.to_lowercase().contains(msg),
            "{name}: {}",
            r.stderr
        );
    }
    assert_eq!(
        file_hash(&img),
        before,
        "a refused import changed the image"
    );
    // An existing tag is refused too.
    vmsnap(&["snapshot", "-c", "t", s(&img)]).ok();
    let r = vmsnap(&["vmstate", "import", s(&img), "t", s(&mig)]).fails_cleanly();
    assert!(
        r.stderr.contains("already has a snapshot named 't'"),
        "{}",
        r.stderr
    );
}

#[test]
fn damaged_state_is_reported_by_export_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-pc.bin.gz", dir.path());
    let state = std::fs::read(&mig).unwrap();
    let img = new_image(dir.path(), "d.qcow2", "16M");
    vmsnap(&["vmstate", "import", s(&img), "good", s(&mig)]).ok();
    flip_state_bit(&img, &state, 0x10_0000);
    let out = dir.path().join("out.bin");
    let r = vmsnap(&["vmstate", "export", s(&img), "good", "-o", s(&out)]).fails_cleanly();
    assert!(
        r.stderr.contains("snapshot 'good': VM state is damaged"),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "damaged export left an output file");
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("vmsnap-tmp")));
    let e = verify(&img, "good").unwrap_err();
    assert!(e.to_string().contains("'good'"), "{e}");
}

#[test]
fn qemu_made_snapshot_exports_as_its_stream() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture_copy("snap-basic.qcow2.gz", dir.path());
    let want = fixture_copy("vmstate-basic-first.bin.gz", dir.path());
    assert!(record_of(&img, "first").is_none(), "QEMU writes no record");
    assert_eq!(
        verify(&img, "first").unwrap(),
        vmsnap::interop::integrity::Verification::NoRecord
    );
    let out = dir.path().join("first.bin");
    vmsnap(&["vmstate", "export", s(&img), "first", "-o", s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap());
    let r = vmsnap(&["vmstate", "export", s(&img), "nope", "-o", s(&out)]).fails_cleanly();
    assert!(
        r.stderr.contains("Can't find snapshot 'nope'"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_writable_raw_disk_refuses_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-pc.bin.gz", dir.path());
    let q = new_image(dir.path(), "a.qcow2", "16M");
    let raw = dir.path().join("b.raw");
    vmsnap(&["create", "-f", "raw", s(&raw), "1M"]).ok();
    let before = file_hash(&q);
    let r = vmsnap(&["vmstate", "import", s(&q), s(&raw), "t", s(&mig)]).fails_cleanly();
    assert!(
        r.stderr.contains(&format!(
            "Device '{}' is writable but does not support snapshots",
            s(&raw)
        )),
        "{}",
        r.stderr
    );
    assert_eq!(file_hash(&q), before);
}

#[test]
fn import_round_trips_on_every_image_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-pc.bin.gz", dir.path());
    let state = std::fs::read(&mig).unwrap();
    for (i, o) in [
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=64,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("l{i}.qcow2"));
        vmsnap(&["create", "-f", "qcow2", "-o", o, s(&img), "64M"]).ok();
        vmsnap(&["vmstate", "import", s(&img), "t", s(&mig)]).ok();
        if have("qemu-img") {
            qemu_img(&["check", s(&img)]).ok();
        }
        let out = dir.path().join(format!("l{i}.bin"));
        vmsnap(&["vmstate", "export", s(&img), "t", "-o", s(&out)]).ok();
        assert!(std::fs::read(&out).unwrap() == state, "{o}: export differs");
    }
}

#[test]
fn our_reader_sees_the_same_stream_in_the_file_and_in_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mig = fixture_copy("mig-q35.bin.gz", dir.path());
    let img = new_image(dir.path(), "d.qcow2", "16M");
    vmsnap(&["vmstate", "import", s(&img), "t", s(&mig)]).ok();
    let inspect = env!("CARGO_BIN_EXE_vmsnap-inspect");
    let from_file = run(inspect, &[s(&mig), "--output", "json"]).ok().stdout;
    let from_snap = run(inspect, &[s(&img), "--snapshot", "t", "--output", "json"])
        .ok()
        .stdout;
    assert!(from_file.len() > 1000 && from_file.contains("\"ram (2)\""));
    assert!(
        from_file == from_snap,
        "state differs between file and snapshot"
    );
}
