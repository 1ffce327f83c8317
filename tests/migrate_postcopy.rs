//! Postcopy live migration (issue 15) of the counter guest between two `vmsnap run`
//! processes: the guest dirties RAM faster than the capped pre-copy can send it, so pre-copy
//! alone would never finish; `migrate_start_postcopy` moves the guest to the destination
//! with pages still on the source, which the destination asks for as the guest touches them.
//! The guest's ticks must continue by one and its own RAM check pass on the destination. A
//! connection cut during postcopy pauses both sides (`postcopy-paused`), and
//! `migrate_recover` / `migrate -r` over a new channel complete the migration. A source
//! killed during postcopy leaves the destination paused (never running on with pages it did
//! not get); quitting it then reports the VM lost, and the image stays sound.
mod common;
use common::info_field as field;
use common::run_vm::{assert_check, command_with_memory, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::{assert_continues, ticks_of};

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guests' timing matters and the machine is small: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MEMORY: &str = "64M";

/// Source (run 0, dirtying 200 MiB/s) and destination (run 1, `--incoming uri`), both with
/// postcopy-ram on; pre-copy capped at QEMU's default 128 MiB/s, so it cannot converge.
/// A fresh qcow2 image in `dir` and its `--drive` argument.
fn disk(dir: &Path) -> (PathBuf, String) {
    let img = dir.join("disk.qcow2");
    create_qcow2(&img);
    let drive = format!("file={},format=qcow2", img.display());
    (img, drive)
}

fn pair(dir: &Path, drive: &str, uri: &str) -> (RunVm, RunVm) {
    let mut src = RunVm::start_with(
        dir,
        &[drive.to_string()],
        1,
        None,
        0,
        &["--memory", MEMORY, "--dirty-rate", "200"],
    );
    let mut cmd = command_with_memory(dir, &[drive.to_string()], 1, None, 1, MEMORY);
    cmd.args(["--incoming", uri]);
    let mut dst = RunVm::spawn(cmd, dir, 1);
    assert_eq!(dst.cmd("").1, "paused (inmigrate)");
    dst.ok("migrate_set_capability postcopy-ram on");
    src.ok("migrate_set_capability postcopy-ram on");
    src.ok("migrate_set_parameter max-bandwidth 128M");
    src.wait_past(10);
    (src, dst)
}

/// Polls `info migrate` on `vm` until `done` says so; fails on a failed migration.
fn wait_info(vm: &mut RunVm, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let info = vm.ok("info migrate");
        if done(&info) {
            return info;
        }
        assert!(!info.contains("status: failed"), "{what}: {info}");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what}: timed out:\n{info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the migration and switches to postcopy once `precopy_kib` of RAM went out.
fn migrate_then_switch(src: &mut RunVm, uri: &str, precopy_kib: u64) {
    assert_eq!(src.ok(&format!("migrate -d {uri}")), "");
    wait_info(src, "pre-copy", |i| {
        i.contains("Migration status: active")
            && i.contains("transferred ram:")
            && field(i, "transferred ram:") >= precopy_kib
    });
    assert_eq!(src.ok("migrate_start_postcopy"), "");
}

/// Waits until the destination's guest runs and has printed a complete `CHECK` line and a
/// complete tick line after it; returns the serial text.
fn wait_check_and_tick(dst: &mut RunVm) -> String {
    let start = Instant::now();
    loop {
        let t = dst.serial_text();
        if let Some(i) = t.find("CHECK ") {
            if t[i..].contains('\n') && !ticks_of(&t[i..]).is_empty() {
                return t;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no CHECK line and tick after it on the destination:\n{t}\n{}",
            dst.ok("info migrate")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn postcopy_round_trip(uri: &str) {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_, drive) = disk(dir.path());
    let uri = uri.replace("DIR", &dir.path().display().to_string());
    let (mut src, mut dst) = pair(dir.path(), &drive, &uri);

    // The background pages at 16 MiB/s: the guest, walking RAM at 200 MiB/s, runs into
    // pages not sent yet and must ask for them.
    src.ok("migrate_set_parameter max-postcopy-bandwidth 16M");
    // The switch before pre-copy has been round once: many pages are still on the source.
    migrate_then_switch(&mut src, &uri, 8 << 10);
    let info = wait_info(&mut src, "postcopy", |i| {
        i.contains("Migration status: completed")
    });
    eprintln!("source:\n{info}");
    // QEMU 7.2's postcopy lines: the pages the destination asked for, the bytes after the
    // switch.
    assert!(field(&info, "postcopy request count:") > 0, "{info}");
    assert!(field(&info, "postcopy ram:") > 0, "{info}");
    assert_eq!(field(&info, "remaining ram:"), 0, "{info}");
    assert_eq!(src.cmd("").1, "paused (postmigrate)");

    let dinfo = wait_info(&mut dst, "destination", |i| {
        i.contains("Migration status: completed")
    });
    assert_eq!(dst.cmd("").1, "running", "{dinfo}");
    let dst_text = wait_check_and_tick(&mut dst);
    assert!(dst_text.contains("CHECK OK"), "{dst_text}");
    assert!(!dst_text.contains("CHECK FAIL"), "{dst_text}");
    assert_continues(&src.serial_text(), &dst_text);
    src.quit();
    dst.quit();
    assert_check(&dir.path().join("disk.qcow2"));
}

#[test]
fn counter_guest_postcopy_over_unix() {
    if !kvm_and_qemu_img("counter_guest_postcopy_over_unix") {
        return;
    }
    postcopy_round_trip("unix:DIR/mig.sock");
}

#[test]
fn counter_guest_postcopy_over_tcp() {
    if !kvm_and_qemu_img("counter_guest_postcopy_over_tcp") {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    postcopy_round_trip(&format!("tcp:127.0.0.1:{port}"));
}

#[test]
fn postcopy_capability_without_the_switch_completes_as_precopy() {
    if !kvm_and_qemu_img("postcopy_capability_without_the_switch_completes_as_precopy") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (img, drive) = disk(dir.path());
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let (mut src, mut dst) = pair(dir.path(), &drive, &uri);
    // Uncapped, pre-copy converges before anyone asks for postcopy: the postcopy header
    // goes out with no page missing.
    src.ok("migrate_set_parameter max-bandwidth 0");
    assert_eq!(src.ok(&format!("migrate {uri}")), "");
    let info = src.ok("info migrate");
    assert!(info.contains("Migration status: completed"), "{info}");
    assert!(!info.contains("postcopy request count"), "{info}");
    wait_info(&mut dst, "destination", |i| {
        i.contains("Migration status: completed")
    });
    let dst_text = wait_check_and_tick(&mut dst);
    assert!(dst_text.contains("CHECK OK"), "{dst_text}");
    assert_continues(&src.serial_text(), &dst_text);
    src.quit();
    dst.quit();
    assert_check(&img);
}

#[test]
fn postcopy_is_refused_without_the_capability_or_a_migration() {
    if !kvm_and_qemu_img("postcopy_is_refused_without_the_capability_or_a_migration") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_, drive) = disk(dir.path());
    let mut vm = RunVm::start(dir.path(), &[drive], 1, None, 0);
    let (r, _) = vm.cmd("migrate_start_postcopy");
    assert_eq!(
        r.trim(),
        "Error: Enable postcopy with migrate_set_capability before the start of migration"
    );
    vm.ok("migrate_set_capability postcopy-ram on");
    let (r, _) = vm.cmd("migrate_start_postcopy");
    assert_eq!(
        r.trim(),
        "Error: Postcopy must be started after migration has been started"
    );
    // A destination without postcopy-ram: the source finds out before anything is lost.
    let mut cmd = command_with_memory(dir.path(), &[], 1, None, 1, "16M");
    let sock = dir.path().join("mig.sock");
    cmd.args(["--incoming", &format!("unix:{}", sock.display())]);
    let _dst = RunVm::spawn(cmd, dir.path(), 1);
    let (r, st) = vm.cmd(&format!("migrate unix:{}", sock.display()));
    assert!(r.contains("did not agree to postcopy"), "{r}");
    assert_eq!(st, "running");
    vm.quit();
}

/// A migration of a fresh counter guest (image `disk.qcow2` in `dir`) switched to postcopy
/// with the background pages trickling (256 KiB/s), so that the postcopy phase lasts long
/// enough to cut it: the source shows `postcopy-active`.
fn trickling_postcopy(dir: &Path) -> (RunVm, RunVm) {
    let (_, drive) = disk(dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (mut src, dst) = pair(dir, &drive, &uri);
    src.ok("migrate_set_parameter max-postcopy-bandwidth 256k");
    migrate_then_switch(&mut src, &uri, 4 << 10);
    wait_info(&mut src, "postcopy", |i| {
        i.contains("Migration status: postcopy-active")
    });
    (src, dst)
}

/// Waits until the destination's guest has printed a tick (it runs there).
fn wait_tick_on(dst: &mut RunVm) {
    let start = Instant::now();
    while ticks_of(&dst.serial_text()).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            dst.ok("info migrate")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_source_during_postcopy_pauses_the_destination() {
    if !kvm_and_qemu_img("killed_source_during_postcopy_pauses_the_destination") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (src, mut dst) = trickling_postcopy(dir.path());
    // The guest runs on the destination (a tick printed there) before the source dies.
    wait_tick_on(&mut dst);
    drop(src); // SIGKILL
               // The destination keeps its pages and its monitor; the vCPUs wait for the rest.
    let info = wait_info(&mut dst, "broken postcopy", |i| {
        i.contains("Migration status: postcopy-paused")
    });
    assert!(info.contains("source is gone"), "{info}");
    let ticks = dst.ticks().len();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dst.ticks().len() <= ticks + 1,
        "the guest runs on without its pages"
    );
    // No recovery comes: quitting reports the VM lost, and what it wrote to its disk stays.
    let (_, status) = dst.finish_with("quit");
    assert!(!status.success(), "{status}");
    let text = std::fs::read_to_string(dir.path().join("serial1.txt")).unwrap();
    assert!(!text.contains("CHECK FAIL"), "{text}");
    assert_check(&dir.path().join("disk.qcow2"));
}

#[test]
fn killed_destination_during_postcopy_leaves_the_source_paused() {
    if !kvm_and_qemu_img("killed_destination_during_postcopy_leaves_the_source_paused") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (mut src, dst) = trickling_postcopy(dir.path());
    // migrate_cancel cannot take back a guest that runs on the destination.
    assert_eq!(src.ok("migrate_cancel"), "");
    drop(dst); // SIGKILL
    let info = wait_info(&mut src, "broken postcopy", |i| {
        i.contains("Migration status: postcopy-paused")
    });
    eprintln!("source:\n{info}");
    // The guest stays paused with its pages; cont would run a stale copy.
    let (r, st) = src.cmd("cont");
    assert!(r.contains("ran on the destination"), "{r}");
    assert_eq!(st, "paused (postmigrate)");
    src.quit();
    assert_check(&dir.path().join("disk.qcow2"));
}

/// A forwarding proxy for one connection: accepts on `listen` and copies both ways to the
/// Unix socket `to`; [`Proxy::cut`] drops both sides, as a broken network would.
struct Proxy {
    socks: Arc<Mutex<Vec<UnixStream>>>,
}

impl Proxy {
    fn start(listen: &Path, to: &Path) -> Proxy {
        let l = UnixListener::bind(listen).unwrap();
        let to = to.to_path_buf();
        let socks = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&socks);
        std::thread::spawn(move || {
            let (a, _) = l.accept().unwrap();
            let b = UnixStream::connect(&to).unwrap();
            s.lock()
                .unwrap()
                .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if into.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Proxy { socks }
    }

    fn cut(&self) {
        for s in self.socks.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn cut_postcopy_connection_is_recovered() {
    if !kvm_and_qemu_img("cut_postcopy_connection_is_recovered") {
        return;
    }
    cut_and_recover("unix:DIR/rec.sock");
}

#[test]
fn cut_postcopy_connection_is_recovered_over_tcp() {
    if !kvm_and_qemu_img("cut_postcopy_connection_is_recovered_over_tcp") {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cut_and_recover(&format!("tcp:127.0.0.1:{port}"));
}

/// Postcopy through a [`Proxy`], cut while postcopy runs, recovered over `recover_uri`
/// (`DIR` = the test's directory).
fn cut_and_recover(recover_uri: &str) {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (img, drive) = disk(dir.path());
    let d = dir.path().display().to_string();
    let rec = recover_uri.replace("DIR", &d);
    let (mut src, mut dst) = pair(dir.path(), &drive, &format!("unix:{d}/mig.sock"));
    let proxy = Proxy::start(&dir.path().join("proxy.sock"), &dir.path().join("mig.sock"));
    src.ok("migrate_set_parameter max-postcopy-bandwidth 256k");
    migrate_then_switch(&mut src, &format!("unix:{d}/proxy.sock"), 4 << 10);
    wait_info(&mut src, "postcopy", |i| {
        i.contains("Migration status: postcopy-active")
    });
    wait_tick_on(&mut dst);
    // Nothing to recover while the channel is up.
    let (r, _) = src.cmd(&format!("migrate -r {rec}"));
    assert_eq!(
        r.trim(),
        "Error: Cannot resume if there is no paused migration"
    );
    let (r, _) = dst.cmd(&format!("migrate_recover {rec}"));
    assert_eq!(
        r.trim(),
        "Error: Migrate recover can only be run when postcopy is paused."
    );

    proxy.cut();
    let info = wait_info(&mut src, "cut (source)", |i| {
        i.contains("Migration status: postcopy-paused")
    });
    eprintln!("source paused:\n{info}");
    let info = wait_info(&mut dst, "cut (destination)", |i| {
        i.contains("Migration status: postcopy-paused")
    });
    eprintln!("destination paused:\n{info}");
    let (r, st) = src.cmd("cont");
    assert!(r.contains("ran on the destination"), "{r}");
    assert_eq!(st, "paused (postmigrate)");
    // Only a resume carries a paused postcopy on.
    let (r, _) = src.cmd(&format!("migrate -d unix:{d}/other.sock"));
    assert_eq!(r.trim(), "Error: There's a migration process in progress");

    // Recovery over a new channel, the rest of the pages at full speed.
    src.ok("migrate_set_parameter max-postcopy-bandwidth 0");
    // A failed attempt on either side leaves both paused, ready for another.
    let (r, st) = src.cmd(&format!("migrate -r unix:{d}/nobody.sock"));
    assert!(r.starts_with("Error: Failed to connect"), "{r}");
    assert_eq!(st, "paused (postmigrate)");
    assert!(src
        .ok("info migrate")
        .contains("Migration status: postcopy-paused"));
    assert_eq!(dst.ok(&format!("migrate_recover {rec}")), "");
    send_junk(&rec);
    wait_info(&mut dst, "a bad recovery", |i| {
        i.contains("Migration status: postcopy-paused (postcopy recovery failed")
    });
    assert_eq!(dst.ok(&format!("migrate_recover {rec}")), "");
    let (r, _) = dst.cmd(&format!("migrate_recover unix:{d}/rec2.sock"));
    assert_eq!(r.trim(), "Error: Migrate recovery is triggered already");
    assert_eq!(src.ok(&format!("migrate -d -r {rec}")), "");
    let info = wait_info(&mut src, "recovery (source)", |i| {
        i.contains("Migration status: completed")
    });
    eprintln!("source:\n{info}");
    assert_eq!(field(&info, "remaining ram:"), 0, "{info}");
    assert_eq!(src.cmd("").1, "paused (postmigrate)");
    let dinfo = wait_info(&mut dst, "recovery (destination)", |i| {
        i.contains("Migration status: completed")
    });
    assert_eq!(dst.cmd("").1, "running", "{dinfo}");
    let dst_text = wait_check_and_tick(&mut dst);
    assert!(dst_text.contains("CHECK OK"), "{dst_text}");
    assert!(!dst_text.contains("CHECK FAIL"), "{dst_text}");
    assert_continues(&src.serial_text(), &dst_text);
    src.quit();
    dst.quit();
    assert_check(&img);
}

#[test]
fn recovery_is_refused_without_a_paused_postcopy() {
    if !kvm_and_qemu_img("recovery_is_refused_without_a_paused_postcopy") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_, drive) = disk(dir.path());
    let qmp_sock = dir.path().join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp_sock.display());
    let mut vm = RunVm::start_with(dir.path(), &[drive], 1, None, 0, &["--qmp", &qmp_arg]);
    let uri = format!("unix:{}", dir.path().join("rec.sock").display());
    let (r, st) = vm.cmd(&format!("migrate -r {uri}"));
    assert_eq!(
        r.trim(),
        "Error: Cannot resume if there is no paused migration"
    );
    assert_eq!(st, "running");
    let (r, st) = vm.cmd(&format!("migrate_recover {uri}"));
    assert_eq!(
        r.trim(),
        "Error: Migrate recover can only be run when postcopy is paused."
    );
    assert_eq!(st, "running");
    // QMP: `migrate` with `resume`, `migrate-recover`, the same words.
    let mut qmp = Qmp::connect(&qmp_sock);
    let e = qmp.error(serde_json::json!({"execute": "migrate",
        "arguments": {"uri": uri, "resume": true}}));
    assert_eq!(e, "Cannot resume if there is no paused migration");
    let e = qmp.error(serde_json::json!({"execute": "migrate-recover",
        "arguments": {"uri": uri}}));
    assert_eq!(
        e,
        "Migrate recover can only be run when postcopy is paused."
    );
    // Nothing was started: no migration status, no socket left behind.
    assert!(!vm.ok("info migrate").contains("Migration status"));
    assert!(!dir.path().join("rec.sock").exists());
    drop(qmp);
    vm.quit();
}

/// Connects to `uri` (unix: or tcp:) as something other than a resuming source would.
fn send_junk(uri: &str) {
    let junk = b"QEVM\0\0\0\x03junk";
    if let Some(path) = uri.strip_prefix("unix:") {
        UnixStream::connect(path).unwrap().write_all(junk).unwrap();
    } else {
        let addr = uri.strip_prefix("tcp:").unwrap();
        std::net::TcpStream::connect(addr)
            .unwrap()
            .write_all(junk)
            .unwrap();
    }
}

/// A bare QMP client: one JSON object a line, events skipped.
struct Qmp(std::io::BufReader<UnixStream>);

impl Qmp {
    fn connect(sock: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut q = Qmp(std::io::BufReader::new(s));
        assert!(q.reply().get("QMP").is_some());
        q.send(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn reply(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            assert!(self.0.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn send(&mut self, cmd: serde_json::Value) -> serde_json::Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.0.get_mut().write_all(line.as_bytes()).unwrap();
        self.reply()
    }

    /// Sends `cmd`, which must fail; its error's description.
    fn error(&mut self, cmd: serde_json::Value) -> String {
        let r = self.send(cmd);
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        r["error"]["desc"].as_str().unwrap().to_string()
    }
}
