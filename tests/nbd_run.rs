//! `vmsnap run` with its disk on an NBD store (`qemu-nbd -f raw` serving a qcow2 file), as two
//! hosts sharing the store would: savevm on host A and `--loadvm` on host B (A over the Unix
//! socket, B over tcp), live migration A→B over tcp with the disk staying on the store (no
//! disk copy), and the server going away in the middle of a savevm (the savevm fails, the VM
//! runs on, and every committed snapshot still loads). The counter guest's ticks prove where
//! each run continues.

mod common;
mod nbd_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::monitor::Monitor;
use common::run_vm::{assert_check, kvm_and_qemu_img};
use common::ticks::{assert_continues, ticks_of};
use common::{qemu_img, s};
use nbd_support::{free_port, Cut, Proxy, QemuNbd, Transport};

/// The guests' timing matters and the machine is small: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tools(what: &str) -> bool {
    kvm_and_qemu_img(what) && common::require(what, &["qemu-nbd"])
}

/// A 16 MiB qcow2 image in a 96 MiB file: the export.
fn store(dir: &Path) -> PathBuf {
    let img = dir.join("store.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    img
}

/// A `vmsnap run` of the counter guest; killed on drop.
struct Vmm {
    child: Option<Child>,
    err: PathBuf,
    mon: Monitor,
    serial: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Vmm {
    fn start(dir: &Path, name: &str, drive: &str, extra: &[&str]) -> Vmm {
        let sock = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.txt"));
        let err = dir.join(format!("{name}.err"));
        let mut child = Command::new(common::vmsnap_bin())
            .arg("run")
            .args(["--drive", &format!("file={drive}")])
            .args(["--guest", "counter", "--memory", "16M"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--monitor")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .env("VMSNAP_NBD_TIMEOUT", "3")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let err2 = err.clone();
        let mon = Monitor::connect(&sock, || {
            let st = child.try_wait().ok()??;
            Some(format!(
                "{name} exited with {st}: {}",
                std::fs::read_to_string(&err2).unwrap_or_default()
            ))
        });
        Vmm {
            child: Some(child),
            err,
            mon,
            serial,
        }
    }

    fn ok(&mut self, line: &str) -> String {
        self.mon.ok(line)
    }

    fn cmd(&mut self, line: &str) -> (String, String) {
        self.mon.cmd(line)
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_past(&self, n: u64) {
        let start = Instant::now();
        while !ticks_of(&self.text()).last().is_some_and(|&t| t > n) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no tick past {n}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_check(&self) -> String {
        let start = Instant::now();
        loop {
            let t = self.text();
            // The whole line: a half-printed "CHECK O" must not be judged.
            if t.find("CHECK ").is_some_and(|i| t[i..].contains('\n')) {
                return t;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no CHECK:\n{t}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn quit(mut self) {
        self.mon.quit();
        let st = self.child.take().unwrap().wait().unwrap();
        assert!(
            st.success(),
            "{}",
            std::fs::read_to_string(&self.err).unwrap_or_default()
        );
    }
}

/// Loads `tag` on a fresh "host" reaching the store at `uri`; the guest's first tick is
/// the one after `last` (or the one after that, if the stop landed inside a print).
fn loads_and_continues(dir: &Path, name: &str, uri: &str, tag: &str, last: u64) {
    let vm = Vmm::start(dir, name, uri, &["--loadvm", tag]);
    vm.wait_past(last + 5);
    let text = vm.wait_check();
    let first = ticks_of(&text)[0];
    assert!(
        first == last + 1 || first == last + 2,
        "{tag}: last {last}, first {first}:\n{text}"
    );
    assert!(
        text.contains("CHECK OK") && !text.contains("CHECK FAIL"),
        "{text}"
    );
    vm.quit();
}

#[test]
fn savevm_on_host_a_and_loadvm_on_host_b_over_the_store() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("savevm_on_host_a_and_loadvm_on_host_b_over_the_store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = store(dir.path());
    let mut srv = QemuNbd::start(&img, Transport::Unix);
    let mut a = Vmm::start(dir.path(), "a", srv.uri(), &[]);
    a.wait_past(10);
    let (r, st) = a.cmd("stop");
    assert_eq!((r.as_str(), st.as_str()), ("", "paused"));
    let last = *ticks_of(&a.text()).last().unwrap();
    a.ok("savevm s1");
    a.ok("cont");
    a.wait_past(last + 10);
    a.quit();
    // Host B reaches the same store over tcp.
    srv.stop();
    let mut tcp = QemuNbd::start(&img, Transport::Tcp);
    loads_and_continues(dir.path(), "b", tcp.uri(), "s1", last);
    // The inspector and `vmstate export` read the snapshot's state straight off the store.
    let inspect = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[tcp.uri(), "--snapshot", "s1"],
    )
    .ok();
    assert!(inspect.stdout.contains("ram"), "{inspect:#?}");
    let out = dir.path().join("s1.mig");
    common::vmsnap(&["vmstate", "export", "-o", s(&out), tcp.uri(), "s1"]).ok();
    assert!(std::fs::read(&out).unwrap().starts_with(b"QEVM"));
    tcp.stop();
    assert_check(&img);
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert!(l.contains("s1"), "{l}");
}

#[test]
fn live_migration_between_two_hosts_sharing_the_store() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("live_migration_between_two_hosts_sharing_the_store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = store(dir.path());
    // Both hosts have the export open during the handover: the server allows it.
    let sock = dir.path().join("shared.sock");
    let mut srv = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "--shared=4", "-k", s(&sock), s(&img)])
        .spawn()
        .unwrap();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let mut a = Vmm::start(dir.path(), "a", &uri, &[]);
    a.wait_past(20);
    let mig = format!("tcp:127.0.0.1:{}", free_port());
    let mut b = Vmm::start(dir.path(), "b", &uri, &["--incoming", &mig]);
    let (r, st) = a.cmd(&format!("migrate {mig}"));
    assert_eq!(r, "", "migrate failed");
    assert_eq!(st, "paused (postmigrate)");
    let a_text = a.text();
    b.wait_past(*ticks_of(&a_text).last().unwrap() + 30);
    let b_text = b.wait_check();
    assert!(!b_text.contains("CHECK FAIL"), "{b_text}");
    assert_continues(&a_text, &b_text);
    // B writes to the store and saves there; the disk never moved.
    b.ok("savevm after");
    a.quit();
    b.quit();
    let _ = srv.kill();
    let _ = srv.wait();
    assert_check(&img);
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert!(l.contains("after"), "{l}");
}

#[test]
fn server_gone_mid_savevm_fails_it_and_committed_snapshots_still_load() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("server_gone_mid_savevm_fails_it_and_committed_snapshots_still_load") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = store(dir.path());
    let mut srv = QemuNbd::start(&img, Transport::Unix);
    // The VM reaches the store through a proxy that dies 48 KiB into the second savevm
    // (the counter guest's VM state is a few hundred KiB: mostly zero pages).
    let proxy = Proxy::start(
        &dir.path().join("p.sock"),
        srv.socket(),
        u64::MAX,
        Cut::Close,
    );
    let mut a = Vmm::start(dir.path(), "a", &proxy.uri(), &[]);
    a.wait_past(10);
    a.ok("stop");
    let last = *ticks_of(&a.text()).last().unwrap();
    a.ok("savevm good");
    a.ok("cont");
    a.wait_past(last + 5);
    proxy.cut_after(48 << 10);
    let t = Instant::now();
    let (r, st) = a.cmd("savevm bad");
    assert!(r.starts_with("Error"), "savevm did not fail: {r}");
    assert!(r.contains("NBD"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // The VM runs on (its disk now fails I/O), and says so again on the next try.
    assert_eq!(st, "running", "{r}");
    let (r, _) = a.cmd("savevm again");
    assert!(r.starts_with("Error") && r.contains("lost"), "{r}");
    drop(a);
    // After the failure the image checks clean (leaks at most) ...
    srv.stop();
    let c = qemu_img(&["check", s(&img)]);
    assert!(matches!(c.code, Some(0) | Some(3)), "{c:#?}");
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert!(l.contains("good") && !l.contains("bad"), "{l}");
    // ... and the committed snapshot loads on a new host once the server is back.
    let mut back = QemuNbd::start(&img, Transport::Unix);
    loads_and_continues(dir.path(), "b", back.uri(), "good", last);
    back.stop();
}

#[test]
fn server_gone_mid_migration_fails_it_and_the_source_runs_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("server_gone_mid_migration_fails_it_and_the_source_runs_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = store(dir.path());
    let sock = dir.path().join("shared.sock");
    let mut srv = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "--shared=4", "-k", s(&sock), s(&img)])
        .spawn()
        .unwrap();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let direct = format!("nbd+unix:///?socket={}", s(&sock));
    // The source reaches the store through a proxy; the destination directly.
    let proxy = Proxy::start(&dir.path().join("p.sock"), &sock, u64::MAX, Cut::Close);
    let mut a = Vmm::start(dir.path(), "a", &proxy.uri(), &[]);
    a.wait_past(10);
    a.ok("stop");
    a.ok("savevm before");
    a.ok("cont");
    let mig = format!("tcp:127.0.0.1:{}", free_port());
    let _b = Vmm::start(dir.path(), "b", &direct, &["--incoming", &mig]);
    // The source's store goes away as the migration starts: its disks cannot be flushed
    // for the handover, so the migration fails and the source runs on.
    proxy.cut_after(0);
    let t = Instant::now();
    let (r, st) = a.cmd(&format!("migrate {mig}"));
    eprintln!("migrate: {r}");
    assert!(r.starts_with("Error: ") && r.contains("NBD"), "{r}");
    assert_eq!(st, "running");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let info = a.ok("info migrate");
    assert!(info.contains("Migration status: failed ("), "{info}");
    let n = *ticks_of(&a.text()).last().unwrap();
    a.wait_past(n + 3);
    drop(a);
    drop(_b);
    let _ = srv.kill();
    let _ = srv.wait();
    let c = qemu_img(&["check", s(&img)]);
    assert!(matches!(c.code, Some(0) | Some(3)), "{c:#?}");
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert!(l.contains("before"), "{l}");
}
