//! Block migration (`migrate -b`): the counter guest moves to a "host" whose drive folder
//! holds no image, and its qcow2 image arrives with the stream — active layer and both
//! internal snapshots (one disk-only, made by qemu-img; one with VM state, made by savevm).
//! Checked with QEMU's tools: the same snapshot table, every snapshot layer byte-identical
//! (`qemu-img convert -l snapshot.name=TAG`), the active layer identical outside the sector
//! the guest keeps rewriting, `qemu-img check` clean; `loadvm` of the saved snapshot on the
//! destination resumes the count where it was saved. A cancelled `migrate -b` leaves the
//! source running and nothing in the destination folder.
mod common;
mod nbd_support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::run_vm::{assert_check, command, kvm_and_qemu_img, RunVm};
use common::ticks::{assert_continues, ticks_of};
use common::{info_field, qemu_img, qemu_io, s};
use nbd_support::netns::{Host, Hosts};

/// The guests' timing matters and the machine is small: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Where a process runs: one of the namespaced hosts, or here.
type On<'a> = Option<(&'a Hosts, Host)>;

/// `vmsnap run` number `run` of the counter guest on `drive`, with `extra` arguments.
fn vm(dir: &Path, run: u32, drive: &str, extra: &[&str], host: On<'_>) -> RunVm {
    let mut cmd = command(dir, &[drive.to_string()], 1, None, run);
    cmd.args(extra);
    match host {
        Some((hosts, at)) => RunVm::spawn(hosts.on(at, &cmd), dir, run),
        None => RunVm::spawn(cmd, dir, run),
    }
}

/// The source image: 16 MiB with data in its active layer, a disk-only snapshot `disk1`
/// taken by qemu-img, and more data written after it (so that the active layer shares
/// some clusters with the snapshot and not others).
fn source_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x5a 1M 3M".into()]).ok();
    qemu_img(&["snapshot", "-c", "disk1", s(&img)]).ok();
    qemu_io("qcow2", &img, &["write -P 0xa5 3M 4M".into()]).ok();
    img
}

/// The drive folders of one test: `a/` holding the source image, an empty `b/` for the
/// destination's, and a unix-socket URI for the stream.
struct Folders {
    dir: tempfile::TempDir,
    b: PathBuf,
    src_img: PathBuf,
    dst_img: PathBuf,
    uri: String,
}

fn folders() -> Folders {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let src_img = source_image(&a);
    let dst_img = b.join("disk.qcow2");
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    Folders {
        dir,
        b,
        src_img,
        dst_img,
        uri,
    }
}

/// `--drive` for a qcow2 image, with more options (`,overwrite=on`).
fn drive(img: &Path, extra: &str) -> String {
    format!("file={},format=qcow2{extra}", img.display())
}

/// KVM, qemu-img and qemu-io are there (said loudly otherwise).
fn tools(name: &str) -> bool {
    kvm_and_qemu_img(name) && common::require(name, &["qemu-io"])
}

/// `qemu-img snapshot -l` of an image that may be open in a running VM (`-U`).
fn snapshot_list(img: &Path) -> String {
    qemu_img(&["snapshot", "-U", "-l", s(img)]).ok().stdout
}

/// One layer (`tag`, or the active layer) of `img` as raw bytes, exported by qemu-img.
fn layer(img: &Path, tag: Option<&str>, out: &Path) -> Vec<u8> {
    let l = tag.map(|t| format!("snapshot.name={t}"));
    let mut args = vec!["convert", "-U"];
    if let Some(l) = &l {
        args.extend(["-l", l.as_str()]);
    }
    args.extend(["-O", "raw", s(img), s(out)]);
    qemu_img(&args).ok();
    std::fs::read(out).unwrap()
}

/// Waits until the destination prints a tick past `n`, then for its `CHECK` line.
fn settle(dst: &RunVm, n: u64) -> String {
    dst.wait_past(n);
    let text = dst.wait_check();
    assert!(!text.contains("CHECK FAIL"), "{text}");
    text
}

/// Waits until the guest printed a tick after the serial text grew past `from` bytes;
/// returns that first tick.
fn first_tick_after(vm: &RunVm, from: usize) -> u64 {
    let start = Instant::now();
    loop {
        let t = vm.serial_text();
        let rest = t.get(from..).unwrap_or("");
        // A tick line only counts once it is complete.
        if let Some(end) = rest.rfind('\n') {
            if let Some(&first) = ticks_of(&rest[..=end]).first() {
                return first;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no tick after byte {from}:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the source is told to migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// HMP `migrate -b URI`.
    Hmp,
    /// QMP `migrate` with `blk: true`, sent by QEMU's own client.
    Qmp,
}

/// Moves a running guest with `migrate -b uri` from `a/` (on `src_host`) to an empty
/// `b/` (on `dst_host`) and checks everything the destination image must be.
fn block_round_trip(uri: &str, src_host: On<'_>, dst_host: On<'_>, via: Via) {
    let f = folders();
    let (dir, b, src_img, dst_img) = (&f.dir, &f.b, &f.src_img, &f.dst_img);
    let qmp_sock = common::qmp::socket(dir.path(), 1);
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let src_extra: &[&str] = match via {
        Via::Hmp => &[],
        Via::Qmp => &["--qmp", &qmp_arg],
    };
    let mut src = vm(dir.path(), 1, &drive(src_img, ""), src_extra, src_host);
    src.wait_past(20);
    let saved = src.stop();
    src.ok("savevm vm1");
    src.ok("cont");
    src.wait_past(saved + 20);
    let src_list = snapshot_list(src_img);
    assert!(
        src_list.contains("disk1") && src_list.contains("vm1"),
        "{src_list}"
    );

    let mut dst = vm(
        dir.path(),
        2,
        &drive(dst_img, ""),
        &["--incoming", uri],
        dst_host,
    );
    let (_, st) = dst.cmd("");
    assert_eq!(st, "paused (inmigrate)");
    let info = match via {
        Via::Hmp => {
            let (r, st) = src.cmd(&format!("migrate -b {uri}"));
            assert_eq!(r, "", "migrate -b failed");
            assert_eq!(st, "paused (postmigrate)");
            src.ok("info migrate")
        }
        Via::Qmp => {
            let args = serde_json::json!({"uri": uri, "blk": true}).to_string();
            let out = common::qmp::sequence(&qmp_sock, &["cmd", "migrate", &args]);
            assert_eq!(out["steps"][0]["return"], serde_json::json!({}), "{out}");
            let info = wait_info(&mut src, "QMP migrate blk", |i| {
                i.contains("Migration status: completed")
            });
            // query-migrate carries QEMU's disk figures.
            let q = common::qmp::sequence(&qmp_sock, &["cmd", "query-migrate", "{}"]);
            let disk = &q["steps"][0]["return"]["disk"];
            assert_eq!(disk["remaining"], 0, "{q}");
            assert!(disk["total"].as_u64().unwrap_or(0) >= 16 << 20, "{q}");
            assert!(
                disk["transferred"].as_u64() >= disk["total"].as_u64(),
                "{q}"
            );
            info
        }
    };
    assert!(info.contains("Migration status: completed"), "{info}");
    assert_eq!(info_field(&info, "remaining disk:"), 0, "{info}");
    let total = info_field(&info, "total disk:");
    assert!(total >= 16 << 10, "the disk's 16 MiB at least: {info}");
    assert!(info_field(&info, "transferred disk:") >= total, "{info}");

    // The destination continues the count, and its own check of RAM and disk passes.
    let src_text = src.serial_text();
    let dst_text = settle(&dst, ticks_of(&src_text).last().unwrap() + 8);
    assert_continues(&src_text, &dst_text);
    assert!(dst_img.exists(), "no image at {}", dst_img.display());
    // The destination has taken over: its image is locked, the source's is free (QEMU's
    // source inactivates its images on completion), while both processes are alive.
    assert_locked(dst_img, "the destination's image");
    let free = qemu_img(&["info", s(src_img)]);
    assert_eq!(
        free.code,
        Some(0),
        "the source's image stays locked: {}",
        free.stderr
    );
    let leftovers: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // The snapshot table travelled whole: ids, names, VM sizes, dates, clocks.
    assert_eq!(snapshot_list(dst_img), src_list);
    for tag in ["disk1", "vm1"] {
        let ours = layer(dst_img, Some(tag), &dir.path().join("dst.raw"));
        let theirs = layer(src_img, Some(tag), &dir.path().join("src.raw"));
        assert!(ours == theirs, "snapshot {tag} differs after the migration");
    }
    // The active layer as it was when the source stopped; the guest rewrites its record in
    // sector 1 every 4 ticks (checked by the guest itself), so the first cluster is left out.
    // The running destination's layer is read through a snapshot of it (savevm flushes).
    dst.stop();
    dst.ok("savevm now");
    let ours = layer(dst_img, Some("now"), &dir.path().join("dst.raw"));
    let theirs = layer(src_img, None, &dir.path().join("src.raw"));
    assert_eq!(ours.len(), theirs.len());
    assert!(ours[65536..] == theirs[65536..], "the active layer differs");
    assert!(theirs[(3 << 20)..(7 << 20)].iter().all(|&x| x == 0xa5));

    // loadvm of the saved snapshot works on the destination: the count resumes there.
    let before = dst.serial_text().len();
    dst.ok("loadvm vm1");
    dst.ok("cont");
    let first = first_tick_after(&dst, before);
    assert!(
        first == saved + 1 || first == saved + 2,
        "loadvm vm1: saved at tick {saved}, resumed at {first}"
    );
    dst.quit();
    src.quit();
    assert_check(dst_img);
    assert_check(src_img);
    assert_eq!(snapshot_list(src_img), src_list, "the source image changed");
}

#[test]
fn block_migration_between_two_hosts_carries_the_snapshots() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let name = "block_migration_between_two_hosts_carries_the_snapshots";
    if !tools(name) {
        return;
    }
    let Some(hosts) = Hosts::new(name) else {
        return;
    };
    let uri = format!("tcp:{}:4446", hosts.addr(Host::B));
    block_round_trip(
        &uri,
        Some((&hosts, Host::A)),
        Some((&hosts, Host::B)),
        Via::Hmp,
    );
}

#[test]
fn block_migration_over_a_unix_socket() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("block_migration_over_a_unix_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    block_round_trip(&uri, None, None, Via::Hmp);
}

#[test]
fn qmp_migrate_with_blk_carries_the_image_too() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("qmp_migrate_with_blk_carries_the_image_too") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    block_round_trip(&uri, None, None, Via::Qmp);
}

/// `qemu-img info` (which takes QEMU's locks, no `-U`) is refused on `img`: a process holds
/// its write lock.
fn assert_locked(img: &Path, what: &str) {
    let r = qemu_img(&["info", s(img)]);
    assert!(
        r.code != Some(0) && r.stderr.contains("Failed to get shared \"write\" lock"),
        "{what} is not locked: {} {}",
        r.stdout,
        r.stderr
    );
}

/// Polls `info migrate` until `pred` holds for it.
fn wait_info(vm: &mut RunVm, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let r = vm.ok("info migrate");
        if pred(&r) {
            return r;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{what}: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cancelled_block_migration_leaves_the_source_running_and_no_destination_file() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("a_cancelled_block_migration_leaves_the_source_running_and_no_destination_file") {
        return;
    }
    let f = folders();
    let (dir, b, src_img, dst_img, uri) = (&f.dir, &f.b, &f.src_img, &f.dst_img, &f.uri);
    let mut src = vm(dir.path(), 1, &drive(src_img, ""), &[], None);
    src.wait_past(10);
    let dst = vm(
        dir.path(),
        2,
        &drive(dst_img, ""),
        &["--incoming", uri],
        None,
    );
    // 1 MiB/s: the 16 MiB disk takes long enough to cancel in the middle.
    src.ok("migrate_set_parameter max-bandwidth 1M");
    src.ok(&format!("migrate -b -d {uri}"));
    let incoming = b.join("disk.qcow2.vmsnap-incoming");
    wait_info(&mut src, "disk being sent", |r| {
        r.contains("Migration status: active") && info_field(r, "transferred disk:") > 1024
    });
    assert!(incoming.exists(), "the destination builds its image aside");
    assert!(!dst_img.exists());
    assert_locked(src_img, "the source's image while its disk is being sent");
    src.ok("migrate_cancel");
    wait_info(&mut src, "cancelled", |r| {
        r.contains("Migration status: cancelled")
    });
    // The source runs on, on its own disk.
    let last = src.last_tick().unwrap();
    src.wait_past(last + 5);
    assert_eq!(src.cmd("").1, "running");
    // The destination gives up and removes what it had built.
    let start = Instant::now();
    while incoming.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} left behind",
            incoming.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dst_img.exists());
    assert_eq!(std::fs::read_dir(b).unwrap().count(), 0);
    drop(dst);
    src.quit();
    assert_check(src_img);
}

#[test]
fn an_existing_image_is_replaced_only_with_overwrite_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("an_existing_image_is_replaced_only_with_overwrite_on") {
        return;
    }
    let f = folders();
    let (dir, src_img, dst_img, uri) = (&f.dir, &f.src_img, &f.dst_img, &f.uri);
    qemu_img(&["create", "-f", "qcow2", s(dst_img), "16M"]).ok();
    let old = std::fs::read(dst_img).unwrap();
    let mut src = vm(dir.path(), 1, &drive(src_img, ""), &[], None);
    src.wait_past(10);
    // Without overwrite=on the destination refuses the stream, says why, exits with status
    // 1 and keeps its image.
    let err = dir.path().join("dst2.err");
    let mut dst = command(dir.path(), &[drive(dst_img, "")], 1, None, 2)
        .args(["--incoming", uri])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.path().join("mig.sock").exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no listener");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (r, st) = src.cmd(&format!("migrate -b {uri}"));
    assert!(r.starts_with("Error"), "{r}");
    assert_eq!(st, "running");
    assert_eq!(dst.wait().unwrap().code(), Some(1));
    let why = std::fs::read_to_string(&err).unwrap();
    assert!(
        why.contains("exists and is not empty: refusing to replace it")
            && why.contains("overwrite=on"),
        "{why}"
    );
    let info = src.ok("info migrate");
    assert!(info.contains("Migration status: failed"), "{info}");
    assert_eq!(std::fs::read(dst_img).unwrap(), old);
    // With overwrite=on it is replaced.
    let dst = vm(
        dir.path(),
        3,
        &drive(dst_img, ",overwrite=on"),
        &["--incoming", uri],
        None,
    );
    let (r, _) = src.cmd(&format!("migrate -b {uri}"));
    assert_eq!(r, "", "migrate -b failed");
    let src_text = src.serial_text();
    settle(&dst, ticks_of(&src_text).last().unwrap() + 8);
    assert!(snapshot_list(dst_img).contains("disk1"));
    dst.quit();
    src.quit();
    assert_check(dst_img);
}

#[test]
fn a_raw_drive_travels_as_data() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("a_raw_drive_travels_as_data") {
        return;
    }
    let f = folders();
    let (dir, src_img, dst_img) = (&f.dir, f.src_img.with_extension("raw"), &f.b.join("d.raw"));
    qemu_img(&["create", "-f", "raw", s(&src_img), "16M"]).ok();
    qemu_io("raw", &src_img, &["write -P 0x33 2M 5M".into()]).ok();
    let raw = |img: &Path| format!("file={},format=raw", img.display());
    let mut src = vm(dir.path(), 1, &raw(&src_img), &[], None);
    src.wait_past(10);
    let mut dst = vm(dir.path(), 2, &raw(dst_img), &["--incoming", &f.uri], None);
    let (r, st) = src.cmd(&format!("migrate -b {}", f.uri));
    assert_eq!(r, "", "migrate -b failed");
    assert_eq!(st, "paused (postmigrate)");
    let src_text = src.serial_text();
    let dst_text = settle(&dst, ticks_of(&src_text).last().unwrap() + 8);
    assert_continues(&src_text, &dst_text);
    dst.stop();
    // A raw image is read in place: stopped, the guest writes nothing more.
    let (ours, theirs) = (
        std::fs::read(dst_img).unwrap(),
        std::fs::read(&src_img).unwrap(),
    );
    assert_eq!(ours.len(), theirs.len());
    assert!(ours[65536..] == theirs[65536..], "the raw drive differs");
    assert!(theirs[(2 << 20)..(7 << 20)].iter().all(|&x| x == 0x33));
    dst.quit();
    src.quit();
}
