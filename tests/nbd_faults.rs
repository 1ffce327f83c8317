//! The server going away or hanging under offline writes: a clear error within the timeout,
//! never a panic or a hang, and afterwards (server back) the image checks clean, leaks at
//! most, with every committed snapshot intact.

mod common;
mod nbd_support;

use std::time::{Duration, Instant};

use common::{qemu_img, qemu_io, require, run, s, vmsnap, vmsnap_bin};
use nbd_support::{Cut, Proxy, QemuNbd, Transport};

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "128M"]).ok();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    img
}

#[test]
fn server_gone_or_hung_mid_write_fails_cleanly_and_the_image_checks_clean() {
    if !require(
        "server_gone_or_hung_mid_write_fails_cleanly_and_the_image_checks_clean",
        &["qemu-img", "qemu-io", "qemu-nbd"],
    ) {
        return;
    }
    // One connection (qemu-nbd's default), and four (multi-conn: `--shared=4`), where the
    // cut hits whichever connections carry the bytes past it.
    for (cut, shared) in [
        (Cut::Close, None),
        (Cut::Stall, None),
        (Cut::Close, Some(4)),
        (Cut::Stall, Some(4)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let mut srv = QemuNbd::start_shared(&img, Transport::Unix, shared);
        let direct = srv.uri().to_string();
        vmsnap(&["io", &direct, "-c", "write -P 0x11 0 4M"]).ok();
        vmsnap(&["snapshot", "-c", "committed", &direct]).ok();
        // The connection dies 8 MiB into a 48 MiB write.
        let proxy = Proxy::start(&dir.path().join("proxy.sock"), srv.socket(), 8 << 20, cut);
        let t = Instant::now();
        let out = std::process::Command::new(vmsnap_bin())
            .args(["io", &proxy.uri(), "-c", "write -P 0x22 0 48M"])
            .env("VMSNAP_NBD_TIMEOUT", "2")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(c) if c != 0 && c != 101),
            "{cut:?} {shared:?}: {out:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains("NBD write"), "{cut:?} {shared:?}: {stderr}");
        if cut == Cut::Stall {
            assert!(stderr.contains("no answer within the timeout"), "{stderr}");
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        // The store is still there: the image checks clean (leaks at most) and the
        // committed snapshot holds its data.
        let c = run(vmsnap_bin(), &["check", &direct]);
        assert!(matches!(c.code, Some(0) | Some(3)), "{c:#?}");
        vmsnap(&["snapshot", "-a", "committed", &direct]).ok();
        vmsnap(&["io", &direct, "-c", "read -P 0x11 0 4M"]).ok();
        srv.stop();
        let c = qemu_img(&["check", s(&img)]);
        assert!(matches!(c.code, Some(0) | Some(3)), "{c:#?}");
        qemu_io("qcow2", &img, &["read -P 0x11 0 4M".into()]).ok();
    }
}
