//! The offline tools on a qcow2 image kept on an NBD export (`qemu-nbd -f raw` serving the
//! qcow2 file as bytes, so vmsnap interprets the qcow2): `create`, `io`, `snapshot -c/-l/-d`,
//! `check` and `info` over `nbd+unix://` and `nbd://` agree with `qemu-img`/`qemu-io` on the
//! same file once the server has stopped; the export's fixed size is respected ("export
//! full" before anything is written, room left in `info` and `check`).

mod common;
mod nbd_support;

use common::{qemu_img, qemu_io, require, s, vmsnap};
use nbd_support::{QemuNbd, Transport};
use serde_json::Value;

fn tools(test: &str) -> bool {
    require(test, &["qemu-img", "qemu-io", "qemu-nbd"])
}

/// A qcow2 image of `virtual_size` inside a file (the export) of `export` bytes.
fn image_in_export(dir: &std::path::Path, virtual_size: &str, export: u64) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), virtual_size]).ok();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(export)
        .unwrap();
    img
}

fn tags(list: &str) -> Vec<String> {
    list.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

#[test]
fn offline_snapshots_over_nbd_agree_with_qemu_img() {
    if !tools("offline_snapshots_over_nbd_agree_with_qemu_img") {
        return;
    }
    for transport in [Transport::Unix, Transport::Tcp] {
        let dir = tempfile::tempdir().unwrap();
        let img = image_in_export(dir.path(), "64M", 32 << 20);
        let mut srv = QemuNbd::start(&img, transport);
        let uri = srv.uri().to_string();
        vmsnap(&["io", &uri, "-c", "write -P 0xab 0 1M"]).ok();
        vmsnap(&["snapshot", "-c", "first", &uri]).ok();
        vmsnap(&["io", &uri, "-c", "write -P 0xcd 0 512k"]).ok();
        vmsnap(&["snapshot", "-c", "second", &uri]).ok();
        vmsnap(&["snapshot", "-c", "third", &uri]).ok();
        vmsnap(&["snapshot", "-d", "second", &uri]).ok();
        let ours = vmsnap(&["snapshot", "-l", &uri]).ok().stdout;
        assert_eq!(tags(&ours), ["first", "third"], "{transport:?}: {ours}");
        let r = vmsnap(&["check", &uri]).ok();
        assert!(r.stdout.contains("No errors were found"), "{r:#?}");
        assert!(r.stdout.contains("Room left on the export:"), "{r:#?}");
        let info: Value =
            serde_json::from_str(&vmsnap(&["info", "--output", "json", &uri]).ok().stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 64u64 << 20);
        assert_eq!(info["export-size"], 32u64 << 20);
        let room = info["room-left"].as_u64().unwrap();
        assert!(room > 28 << 20 && room < 32 << 20, "room {room}");
        // The first snapshot's data is back after applying it, over the export.
        vmsnap(&["snapshot", "-a", "first", &uri]).ok();
        vmsnap(&["io", &uri, "-c", "read -P 0xab 0 1M"]).ok();
        srv.stop();

        let theirs = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
        assert_eq!(tags(&theirs), ["first", "third"], "{theirs}");
        let c = qemu_img(&["check", s(&img)]).ok();
        assert!(c.stdout.contains("No errors were found"), "{c:#?}");
        qemu_io("qcow2", &img, &["read -P 0xab 0 1M".into()]).ok();
        qemu_img(&["snapshot", "-a", "third", s(&img)]).ok();
        qemu_io(
            "qcow2",
            &img,
            &[
                "read -P 0xcd 0 512k".into(),
                "read -P 0xab 512k 512k".into(),
            ],
        )
        .ok();
    }
}

#[test]
fn create_formats_an_existing_export_within_its_size() {
    if !tools("create_formats_an_existing_export_within_its_size") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.raw");
    std::fs::write(&file, vec![0x5a; 8 << 20]).unwrap();
    let mut srv = QemuNbd::start(&file, Transport::Unix);
    let uri = srv.uri().to_string();
    let r = vmsnap(&["create", "-f", "qcow2", &uri, "1G"]).ok();
    assert!(r.stdout.starts_with("Formatting '"), "{r:#?}");
    vmsnap(&["io", &uri, "-c", "write -P 0x11 4096 64k"]).ok();
    // Stale bytes of the export never show through: unwritten guest data reads as zero.
    vmsnap(&[
        "io",
        &uri,
        "-c",
        "read -P 0 0 4096",
        "-c",
        "read -P 0 1M 1M",
    ])
    .ok();
    srv.stop();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 8 << 20);
    let v: Value = serde_json::from_str(
        &qemu_img(&["info", "--output=json", "-f", "qcow2", s(&file)])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(v["virtual-size"], 1u64 << 30);
    qemu_img(&["check", "-f", "qcow2", s(&file)]).ok();
    qemu_io(
        "qcow2",
        &file,
        &["read -P 0x11 4096 64k".into(), "read -P 0 1M 1M".into()],
    )
    .ok();
}

#[test]
fn export_full_fails_before_anything_is_written() {
    if !tools("export_full_fails_before_anything_is_written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Header, refcount table, refcount block and L1 take 4 of the 16 clusters.
    let img = image_in_export(dir.path(), "64M", 1 << 20);
    let mut srv = QemuNbd::start(&img, Transport::Unix);
    let uri = srv.uri().to_string();
    vmsnap(&["io", &uri, "-c", "write -P 0x22 0 256k"]).ok();
    vmsnap(&["snapshot", "-c", "fits", &uri]).ok();
    // 2 MiB of new data cannot fit in what is left: refused before any of it is written
    // (the L2 table the snapshot shares may have been copied first; that is consistent).
    let r = vmsnap(&["io", &uri, "-c", "write -P 0x33 8M 2M"]).fails_cleanly();
    assert!(r.stderr.contains("export full"), "{r:#?}");
    vmsnap(&["io", &uri, "-c", "read -P 0 8M 2M"]).ok();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    let info: Value =
        serde_json::from_str(&vmsnap(&["info", "--output", "json", &uri]).ok().stdout).unwrap();
    assert_eq!(info["export-size"], 1u64 << 20);
    assert!(info["room-left"].as_u64().unwrap() < 2 << 20);
    // Snapshots still work in the room that is left, and the data is intact.
    vmsnap(&["snapshot", "-c", "still", &uri]).ok();
    vmsnap(&["io", &uri, "-c", "read -P 0x22 0 256k"]).ok();
    srv.stop();
    let c = qemu_img(&["check", s(&img)]);
    assert!(
        c.code == Some(0) || c.code == Some(3),
        "corruption after export full: {c:#?}"
    );
    qemu_io(
        "qcow2",
        &img,
        &["read -P 0x22 0 256k".into(), "read -P 0 8M 2M".into()],
    )
    .ok();
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert_eq!(tags(&l), ["fits", "still"]);
}

#[test]
fn read_only_and_missing_exports_are_refused() {
    if !tools("read_only_and_missing_exports_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_in_export(dir.path(), "16M", 4 << 20);
    let sock = dir.path().join("ro.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-t",
            "-r",
            "-x",
            "disk",
            "-k",
            s(&sock),
            s(&img),
        ])
        .spawn()
        .unwrap();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    // Reading is fine on a read-only export.
    let l = vmsnap(&["snapshot", "-l", &uri]).ok();
    assert!(l.stdout.is_empty() || !l.stdout.contains("ID"), "{l:#?}");
    vmsnap(&["check", &uri]).ok();
    let r = vmsnap(&["snapshot", "-c", "x", &uri]).fails_cleanly();
    assert!(r.stderr.contains("is read-only"), "{r:#?}");
    let wrong = format!("nbd+unix:///nosuch?socket={}", s(&sock));
    let r = vmsnap(&["info", &wrong]).fails_cleanly();
    assert!(r.stderr.contains("NBD handshake"), "{r:#?}");
    let r = vmsnap(&["info", "nbd+unix:///disk"]).fails_cleanly();
    assert!(r.stderr.contains("invalid NBD URI"), "{r:#?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_second_client_is_held_off_while_the_first_holds_the_export() {
    if !tools("a_second_client_is_held_off_while_the_first_holds_the_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_in_export(dir.path(), "16M", 4 << 20);
    let srv = QemuNbd::start(&img, Transport::Unix);
    // Another client (a VMM on some host) holds the export.
    let mut holder = std::os::unix::net::UnixStream::connect(srv.socket()).unwrap();
    nbd::client::handshake(&mut holder, b"").unwrap();
    let r = std::process::Command::new(common::vmsnap_bin())
        .args(["snapshot", "-c", "x", srv.uri()])
        .env("VMSNAP_NBD_TIMEOUT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is another client using the export"),
        "{stderr}"
    );
    drop(holder);
    vmsnap(&["snapshot", "-c", "x", srv.uri()]).ok();
}
