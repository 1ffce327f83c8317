//! `vmsnap run` with its disk on an NBD store (`qemu-nbd -f raw` serving a qcow2 file): two
//! hosts sharing the store, each in its own network namespace with the store in a third
//! (`nbd_support::netns`): savevm on host A and `--loadvm` on host B, offline snapshot
//! commands over the network agreeing with qemu-img on the file, live migration A→B over tcp
//! with the disk staying on the store (no disk copy); and, on one host, the server going away
//! in the middle of a savevm (the savevm fails, the VM runs on, and every committed snapshot
//! still loads) or of a migration. The counter guest's ticks prove where each run continues.

mod common;
mod nbd_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::run_vm::{assert_check, command, kvm_and_qemu_img, RunVm};
use common::ticks::{assert_continues, ticks_of};
use common::{qemu_img, s};
use nbd_support::netns::{Host, Hosts};
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

/// Run `run` of the counter guest with its disk at `drive` (NBD requests time out after 3 s),
/// on `host` if given.
fn vm(dir: &Path, run: u32, drive: &str, extra: &[&str], host: On<'_>) -> RunVm {
    let mut cmd = command(dir, &[format!("file={drive}")], 1, None, run);
    cmd.args(extra).env("VMSNAP_NBD_TIMEOUT", "3");
    match host {
        Some((hosts, at)) => RunVm::spawn(hosts.on(at, &cmd), dir, run),
        None => RunVm::spawn(cmd, dir, run),
    }
}

/// Where a process runs: one of the namespaced hosts, or here.
type On<'a> = Option<(&'a Hosts, Host)>;

/// `vmsnap ARGS` (or the inspector) run on `host`.
fn tool_on(hosts: &Hosts, host: Host, program: &str, args: &[&str]) -> common::Run {
    let mut c = Command::new(program);
    c.args(args).env("TZ", "UTC");
    common::run_command(&mut hosts.on(host, &c))
}

/// Loads `tag` on a fresh "host" reaching the store at `uri`; the guest's first tick is
/// the one after `last` (or the one after that, if the stop landed inside a print).
fn loads_and_continues(dir: &Path, run: u32, uri: &str, tag: &str, last: u64, host: On<'_>) {
    let vm = vm(dir, run, uri, &["--loadvm", tag], host);
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
    let name = "savevm_on_host_a_and_loadvm_on_host_b_over_the_store";
    if !tools(name) {
        return;
    }
    let Some(hosts) = Hosts::new(name) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = store(dir.path());
    let (mut srv, uri) = hosts.serve_nbd(&img);
    let on_a = Some((&hosts, Host::A));
    let on_b = Some((&hosts, Host::B));
    let mut a = vm(dir.path(), 1, &uri, &[], on_a);
    a.wait_past(10);
    let last = a.stop();
    a.ok("savevm s1");
    a.ok("cont");
    a.wait_past(last + 10);
    a.quit();
    loads_and_continues(dir.path(), 2, &uri, "s1", last, on_b);
    // The inspector and `vmstate export` on host B read the snapshot's state off the store.
    let inspect = env!("CARGO_BIN_EXE_vmsnap-inspect");
    let out = tool_on(&hosts, Host::B, inspect, &[&uri, "--snapshot", "s1"]).ok();
    assert!(out.stdout.contains("ram"), "{out:#?}");
    let state = dir.path().join("s1.mig");
    let vmsnap = common::vmsnap_bin();
    tool_on(
        &hosts,
        Host::B,
        vmsnap,
        &["vmstate", "export", "-o", s(&state), &uri, "s1"],
    )
    .ok();
    assert!(std::fs::read(&state).unwrap().starts_with(b"QEVM"));
    // Offline snapshot commands from host B over the network ...
    tool_on(&hosts, Host::B, vmsnap, &["snapshot", "-c", "off1", &uri]).ok();
    tool_on(&hosts, Host::B, vmsnap, &["snapshot", "-c", "off2", &uri]).ok();
    tool_on(&hosts, Host::B, vmsnap, &["snapshot", "-d", "off1", &uri]).ok();
    let ours = tool_on(&hosts, Host::B, vmsnap, &["snapshot", "-l", &uri]).ok();
    tool_on(&hosts, Host::B, vmsnap, &["check", &uri]).ok();
    // ... agree with qemu-img on the file once the server has stopped.
    srv.stop();
    assert_check(&img);
    let theirs = qemu_img(&["snapshot", "-l", s(&img)]).ok();
    let tags = |list: &str| -> Vec<String> {
        list.lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect()
    };
    assert_eq!(tags(&ours.stdout), ["s1", "off2"], "{}", ours.stdout);
    assert_eq!(
        tags(&ours.stdout),
        tags(&theirs.stdout),
        "{}",
        theirs.stdout
    );
}

#[test]
fn live_migration_between_two_hosts_sharing_the_store() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let name = "live_migration_between_two_hosts_sharing_the_store";
    if !tools(name) {
        return;
    }
    let Some(hosts) = Hosts::new(name) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = store(dir.path());
    // Both hosts have the export open during the handover: the server allows it.
    let (mut srv, uri) = hosts.serve_nbd(&img);
    let mut a = vm(dir.path(), 1, &uri, &[], Some((&hosts, Host::A)));
    a.wait_past(20);
    // The stream goes from host A's address to host B's, over the veth pairs.
    let mig = format!("tcp:{}:4444", hosts.addr(Host::B));
    let mut b = vm(
        dir.path(),
        2,
        &uri,
        &["--incoming", &mig],
        Some((&hosts, Host::B)),
    );
    let (r, st) = a.cmd(&format!("migrate {mig}"));
    assert_eq!(r, "", "migrate failed");
    assert_eq!(st, "paused (postmigrate)");
    let a_text = a.serial_text();
    b.wait_past(*ticks_of(&a_text).last().unwrap() + 30);
    let b_text = b.wait_check();
    assert!(!b_text.contains("CHECK FAIL"), "{b_text}");
    assert_continues(&a_text, &b_text);
    // B writes to the store and saves there; the disk never moved.
    b.ok("savevm after");
    a.quit();
    b.quit();
    srv.stop();
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
    let mut a = vm(dir.path(), 1, &proxy.uri(), &[], None);
    a.wait_past(10);
    a.ok("stop");
    let last = *ticks_of(&a.serial_text()).last().unwrap();
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
    loads_and_continues(dir.path(), 2, back.uri(), "good", last, None);
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
    let mut a = vm(dir.path(), 1, &proxy.uri(), &[], None);
    a.wait_past(10);
    a.ok("stop");
    a.ok("savevm before");
    a.ok("cont");
    let mig = format!("tcp:127.0.0.1:{}", free_port());
    let _b = vm(dir.path(), 2, &direct, &["--incoming", &mig], None);
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
    let n = *ticks_of(&a.serial_text()).last().unwrap();
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
