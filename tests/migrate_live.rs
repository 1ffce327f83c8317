//! Live migration of the counter guest between two `vmsnap run` processes: over tcp and unix
//! on loopback, through exec: and file:, across two network namespaces, and the failure
//! paths (destination killed, cancel, partial stream). The guest's own tick counter and
//! checks prove that the destination continues exactly where the source stopped.
mod common;
use common::monitor::Monitor;
use common::run_vm::{assert_check, create_qcow2, kvm_and_qemu_img};
use common::ticks::ticks_of;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The guests' timing matters and the machine is small: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `vmsnap run` with a Unix-socket monitor; killed on drop.
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

struct Opts<'a> {
    name: &'a str,
    memory: &'a str,
    incoming: Option<&'a str>,
    /// Runs the VMM through this prefix (e.g. `ip netns exec NS`).
    prefix: &'a [&'a str],
}

impl Vmm {
    fn start(dir: &Path, image: &Path, o: Opts<'_>) -> Vmm {
        let sock = dir.join(format!("{}.sock", o.name));
        let serial = dir.join(format!("{}.txt", o.name));
        let mut cmd = if let Some((first, rest)) = o.prefix.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg(common::vmsnap_bin());
            c
        } else {
            Command::new(common::vmsnap_bin())
        };
        cmd.arg("run")
            .args(["--drive", &format!("file={},format=qcow2", image.display())])
            .args(["--guest", "counter", "--memory", o.memory])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--monitor")
            .arg(format!("unix:{}", sock.display()));
        if let Some(uri) = o.incoming {
            cmd.args(["--incoming", uri]);
        }
        let err = std::fs::File::create(dir.join(format!("{}.err", o.name))).unwrap();
        let mut child = cmd.stdout(Stdio::null()).stderr(err).spawn().unwrap();
        let err_path = dir.join(format!("{}.err", o.name));
        let mon = Monitor::connect(&sock, || {
            let st = child.try_wait().ok()??;
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            Some(format!("{} exited with {st}: {err}", o.name))
        });
        Vmm {
            child: Some(child),
            err: err_path,
            mon,
            serial,
        }
    }

    /// Sends a command; returns its reply and the `info status` that follows it.
    fn cmd(&mut self, line: &str) -> (String, String) {
        self.mon.cmd(line)
    }

    fn ok(&mut self, line: &str) -> String {
        self.mon.ok(line)
    }

    fn status(&mut self) -> String {
        self.cmd("").1
    }

    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits for the guest's `CHECK OK` and then for a complete tick line after it (the
    /// periodic check of the tick the source printed last can come first on a destination).
    fn wait_checked(&self, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let t = self.serial_text();
            if let Some(at) = t.find("CHECK OK") {
                if !ticks_of(&t[at..]).is_empty() {
                    return t;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "no 'CHECK OK' followed by a tick in:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ticks(&self, n: u64) {
        let start = Instant::now();
        while ticks_of(&self.serial_text())
            .last()
            .map_or(true, |&t| t < n)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no tick {n}:\n{}",
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `info migrate` until its status line contains `want`.
    fn wait_migration(&mut self, want: &str, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let r = self.ok("info migrate");
            if r.contains(&format!("Migration status: {want}")) {
                return r;
            }
            assert!(start.elapsed() < Duration::from_secs(secs), "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn quit(mut self) -> String {
        self.mon.quit();
        let st = self.child.take().unwrap().wait().unwrap();
        assert!(st.success(), "{}", self.stderr());
        self.stderr()
    }
}

/// The source's ticks followed by the destination's count on by one.
fn continues(src: &str, dst: &str) -> (u64, u64) {
    common::ticks::assert_continues(src, dst)
}

use common::info_field as field;

/// Migrates a running source to a destination listening on `uri` (which the destination
/// binds), checks the ticks, the statuses and `info migrate`.
fn live_round_trip(uri: &str, prefixes: (&[&str], &[&str])) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let opts = |name, incoming, prefix| Opts {
        name,
        memory: "64M",
        incoming,
        prefix,
    };
    let mut src = Vmm::start(dir.path(), &img, opts("src", None, prefixes.0));
    src.wait_ticks(20);
    let mut dst = Vmm::start(dir.path(), &img, opts("dst", Some(uri), prefixes.1));
    assert_eq!(dst.status(), "paused (inmigrate)");
    assert!(dst.serial_text().is_empty());
    // The guest cannot be started before the stream is in.
    assert!(dst.cmd("cont").0.starts_with("Error"));
    // As QEMU's destination: no status yet, the socket it listens on.
    let waiting = dst.ok("info migrate");
    assert!(!waiting.contains("Migration status"), "{waiting}");
    let listening = waiting
        .split_once("socket address: [\n\t")
        .and_then(|(_, rest)| rest.split_once("\n]"))
        .map(|(a, _)| a.to_string())
        .unwrap_or_else(|| panic!("no socket address: {waiting}"));
    assert_eq!(listening, uri);

    let (reply, status) = src.cmd(&format!("migrate {uri}"));
    assert_eq!(reply, "", "migrate failed");
    assert_eq!(status, "paused (postmigrate)");
    let info = src.ok("info migrate");
    assert!(info.contains("Migration status: completed"), "{info}");
    let downtime = field(&info, "downtime:");
    let total = field(&info, "total time:");
    assert!(downtime <= total, "{info}");
    assert_eq!(field(&info, "remaining ram:"), 0);
    assert_eq!(field(&info, "total ram:"), 64 << 10);
    assert!(field(&info, "dirty sync count:") >= 2, "{info}");
    assert!(field(&info, "duplicate:") + field(&info, "normal:") >= 64 << 8);
    eprintln!("{uri}: total {total} ms, downtime {downtime} ms");

    let src_text = src.serial_text();
    dst.wait_ticks(ticks_of(&src_text).last().unwrap() + 70);
    let dst_text = dst.wait_checked(20);
    assert!(!dst_text.contains("CHECK FAIL"), "{dst_text}");
    assert_eq!(dst.status(), "running");
    let info = dst.ok("info migrate");
    assert!(
        info.trim_end().ends_with("Migration status: completed"),
        "{info}"
    );
    let (last, first) = continues(&src_text, &dst_text);
    eprintln!("{uri}: source's last tick {last}, destination's first {first}");
    // The source stays stopped and cannot take the disks back while the destination runs.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(src.serial_text(), src_text);
    let (r, st) = src.cmd("cont");
    assert!(r.contains("lock"), "{r}");
    assert_eq!(st, "paused (postmigrate)");
    src.quit();
    dst.quit();
    assert_check(&img);
}

#[test]
fn tcp_and_unix_on_loopback() {
    let _g = serial();
    if !kvm_and_qemu_img("tcp_and_unix_on_loopback") {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    live_round_trip(&format!("tcp:127.0.0.1:{port}"), (&[], &[]));
    let dir = tempfile::tempdir().unwrap();
    live_round_trip(
        &format!("unix:{}", dir.path().join("mig.sock").display()),
        (&[], &[]),
    );
}

#[test]
fn file_and_exec_round_trips_decode_with_the_inspector_and_qemu() {
    let _g = serial();
    if !kvm_and_qemu_img("file_and_exec_round_trips") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let stream = dir.path().join("vm.mig");
    let opts = |name, incoming: Option<&'static str>| Opts {
        name,
        memory: "32M",
        incoming,
        prefix: &[],
    };

    // file: the source writes the stream and stops; a destination started afterwards
    // continues from it.
    let mut src = Vmm::start(dir.path(), &img, opts("src", None));
    src.wait_ticks(10);
    let (r, st) = src.cmd(&format!("migrate file:{}", stream.display()));
    assert_eq!((r.as_str(), st.as_str()), ("", "paused (postmigrate)"));
    let src_text = src.serial_text();
    src.quit();
    let uri: &'static str = Box::leak(format!("file:{}", stream.display()).into_boxed_str());
    let dst = Vmm::start(dir.path(), &img, opts("dst", Some(uri)));
    let dst_text = dst.wait_checked(20);
    continues(&src_text, &dst_text);

    // The file is a migration stream both readers decode, to the same answer.
    let ours = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[common::s(&stream), "--output", "json"],
    )
    .ok();
    assert!(ours.stdout.contains("\"ram (0)\""), "{}", ours.stdout);
    assert!(ours.stdout.contains("\"cpu (1)\""), "{}", ours.stdout);
    if let Some(theirs) = common::analyze_migration(module_path!(), &["-f", common::s(&stream)]) {
        assert_eq!(ours.stdout, theirs.ok().stdout);
    }

    // exec: from the running destination through `cat` into a second file, then a third
    // VM continues from that file through exec: as well.
    let mut dst = dst;
    let copy = dir.path().join("copy.mig");
    let (r, st) = dst.cmd(&format!("migrate \"exec:cat > {}\"", copy.display()));
    assert_eq!((r.as_str(), st.as_str()), ("", "paused (postmigrate)"));
    let mid_text = dst.serial_text();
    dst.quit();
    let uri: &'static str = Box::leak(format!("exec:cat {}", copy.display()).into_boxed_str());
    let third = Vmm::start(dir.path(), &img, opts("third", Some(uri)));
    let third_text = third.wait_checked(20);
    continues(&mid_text, &third_text);
    third.quit();
    assert_check(&img);
}

#[test]
fn killing_the_destination_fails_the_migration_and_the_source_runs_on() {
    let _g = serial();
    if !kvm_and_qemu_img("killing_the_destination") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let sock = dir.path().join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let opts = |name, incoming| Opts {
        name,
        memory: "64M",
        incoming,
        prefix: &[],
    };
    let mut src = Vmm::start(dir.path(), &img, opts("src", None));
    src.wait_ticks(5);

    // A destination with another RAM size rejects the stream at its block list: it exits
    // with the reason, the source reports the migration failed and runs on.
    let mut small = Vmm::start(
        dir.path(),
        &img,
        Opts {
            memory: "32M",
            ..opts("small", Some(&uri))
        },
    );
    let (r, st) = src.cmd(&format!("migrate {uri}"));
    assert!(r.starts_with("Error: "), "{r}");
    assert_eq!(st, "running");
    assert!(src
        .ok("info migrate")
        .contains("Migration status: failed ("));
    let code = small.child.as_mut().unwrap().wait().unwrap();
    assert_eq!(code.code(), Some(1));
    assert!(
        small.stderr().contains("Length mismatch"),
        "{}",
        small.stderr()
    );
    let n = *ticks_of(&src.serial_text()).last().unwrap();
    src.wait_ticks(n + 3);

    let mut dst = Vmm::start(dir.path(), &img, opts("dst", Some(&uri)));
    src.ok("migrate_set_capability auto-converge on");
    assert!(src
        .ok("info migrate_capabilities")
        .contains("\nauto-converge: on\n"));
    src.ok("migrate_set_parameter max-bandwidth 64k");
    assert!(src
        .ok("info migrate_parameters")
        .contains("max-bandwidth: 65536 bytes/second"));
    let (r, st) = src.cmd(&format!("migrate -d {uri}"));
    assert_eq!((r.as_str(), st.as_str()), ("", "running"));
    let info = src.wait_migration("active", 10);
    assert!(info.contains("expected downtime:"), "{info}");
    assert!(info.contains("cpu throttle percentage:"), "{info}");
    std::thread::sleep(Duration::from_millis(300));
    let before = field(&src.ok("info migrate"), "transferred ram:");
    assert!(before > 0);
    let mut child = dst.child.take().unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    drop(dst);
    let info = src.wait_migration("failed", 20);
    assert!(info.contains("Migration status: failed ("), "{info}");
    assert_eq!(src.status(), "running");
    let n = *ticks_of(&src.serial_text()).last().unwrap();
    src.wait_ticks(n + 5);
    // The source keeps its image: a second writer is still refused.
    let out = common::qemu_img(&["info", common::s(&img)]);
    assert_ne!(out.code, Some(0), "the source lost its lock");

    // A cancelled migration leaves the source running as well.
    let mut dst = Vmm::start(dir.path(), &img, opts("dst2", Some(&uri)));
    src.ok(&format!("migrate -d {uri}"));
    src.wait_migration("active", 10);
    src.ok("migrate_cancel");
    src.wait_migration("cancelled", 10);
    assert_eq!(src.status(), "running");
    let n = *ticks_of(&src.serial_text()).last().unwrap();
    src.wait_ticks(n + 3);
    // The destination saw a cut stream: it exits with an error and never ran the guest.
    let st = dst.child.as_mut().unwrap().wait().unwrap();
    assert!(!st.success());
    assert!(dst.serial_text().is_empty());

    // Still at 64 KiB/s, a migration that could not end soon completes once max-bandwidth
    // is raised while it runs (as QEMU lets one do).
    let mut dst = Vmm::start(dir.path(), &img, opts("dst3", Some(&uri)));
    src.ok(&format!("migrate -d {uri}"));
    src.wait_migration("active", 10);
    src.ok("migrate_set_parameter max-bandwidth 0");
    let info = src.wait_migration("completed", 20);
    assert!(info.contains("downtime:"), "{info}");
    assert_eq!(src.status(), "paused (postmigrate)");
    let dst_text = dst.wait_checked(20);
    continues(&src.serial_text(), &dst_text);
    assert_eq!(dst.status(), "running");
    src.quit();
    dst.quit();
    assert_check(&img);
}

#[test]
fn a_partial_stream_never_starts_a_guest() {
    let _g = serial();
    if !kvm_and_qemu_img("a_partial_stream_never_starts_a_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let stream = dir.path().join("vm.mig");
    let mut src = Vmm::start(
        dir.path(),
        &img,
        Opts {
            name: "src",
            memory: "16M",
            incoming: None,
            prefix: &[],
        },
    );
    src.wait_ticks(3);
    src.ok(&format!("migrate file:{}", stream.display()));
    // The source's disks are the destination's now.
    assert!(src.cmd("savevm s1").0.contains("inactive"));
    src.quit();

    // A destination still waiting refuses to migrate or save, and quits cleanly.
    let sock = dir.path().join("never.sock");
    let mut waiting = Vmm::start(
        dir.path(),
        &img,
        Opts {
            name: "waiting",
            memory: "16M",
            incoming: Some(&format!("unix:{}", sock.display())),
            prefix: &[],
        },
    );
    assert!(waiting.cmd("migrate file:/dev/null").0.starts_with("Error"));
    assert!(waiting.cmd("savevm s1").0.contains("Error"));
    waiting.quit();
    let data = std::fs::read(&stream).unwrap();
    std::fs::write(&stream, &data[..data.len() - 200]).unwrap();
    let serial = dir.path().join("cut.txt");
    let out = Command::new(common::vmsnap_bin())
        .args(["run", "--guest", "counter", "--memory", "16M"])
        .args(["--drive", &format!("file={}", img.display())])
        .arg(format!("--serial=file:{}", serial.display()))
        .arg(format!("--incoming=file:{}", stream.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("load of migration failed"), "{err}");
    assert_eq!(std::fs::read_to_string(&serial).unwrap_or_default(), "");
    assert_check(&img);
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn create() -> Option<Netns> {
        let id = std::process::id();
        let names = [format!("vmsnap-src-{id}"), format!("vmsnap-dst-{id}")];
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let ns = Netns { names };
        let [a, b] = &ns.names;
        let (va, vb) = (format!("vs{id}"), format!("vd{id}"));
        let ok = run(&["netns", "add", a])
            && run(&["netns", "add", b])
            && run(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && run(&["link", "set", &va, "netns", a])
            && run(&["link", "set", &vb, "netns", b])
            && run(&["-n", a, "addr", "add", "10.251.0.1/24", "dev", &va])
            && run(&["-n", b, "addr", "add", "10.251.0.2/24", "dev", &vb])
            && run(&["-n", a, "link", "set", &va, "up"])
            && run(&["-n", b, "link", "set", &vb, "up"])
            && run(&["-n", a, "link", "set", "lo", "up"])
            && run(&["-n", b, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn across_two_network_namespaces() {
    let _g = serial();
    if !kvm_and_qemu_img("across_two_network_namespaces") {
        return;
    }
    // `ip netns add` needs root.
    let uid = Command::new("id").arg("-u").output().ok();
    let root = uid.is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !common::have("ip") && !Path::new("/usr/sbin/ip").exists() {
        eprintln!("SKIPPED: across_two_network_namespaces: needs root and iproute2's `ip`");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("SKIPPED: across_two_network_namespaces: could not create network namespaces");
        return;
    };
    let src: Vec<&str> = vec!["ip", "netns", "exec", &ns.names[0]];
    let dst: Vec<&str> = vec!["ip", "netns", "exec", &ns.names[1]];
    live_round_trip("tcp:10.251.0.2:4444", (&src, &dst));
}

#[test]
fn lz4_capability_compresses_ram_pages_and_the_destination_continues() {
    let _g = serial();
    if !kvm_and_qemu_img("lz4_capability") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let opts = |name, incoming: Option<&'static str>| Opts {
        name,
        memory: "32M",
        incoming,
        prefix: &[],
    };
    let plain = dir.path().join("plain.mig");
    let packed = dir.path().join("lz4.mig");

    let mut src = Vmm::start(dir.path(), &img, opts("src", None));
    src.wait_ticks(5);
    let caps = src.ok("info migrate_capabilities");
    assert!(caps.contains("x-vmsnap-lz4: off"), "{caps}");
    src.ok("migrate_set_capability x-vmsnap-lz4 on");
    assert!(src
        .ok("info migrate_capabilities")
        .contains("x-vmsnap-lz4: on"));
    let (r, st) = src.cmd(&format!("migrate file:{}", packed.display()));
    assert_eq!((r.as_str(), st.as_str()), ("", "paused (postmigrate)"));
    let src_text = src.serial_text();
    let packed_info = src.ok("info migrate");
    src.quit();

    // The stream announces the capability and carries LZ4 pages; the inspector decodes it.
    let human = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[common::s(&packed), "--output", "human"],
    )
    .ok();
    assert!(human.stdout.contains("x-vmsnap-lz4"), "{}", human.stdout);

    let uri: &'static str = Box::leak(format!("file:{}", packed.display()).into_boxed_str());
    let mut dst = Vmm::start(dir.path(), &img, opts("dst", Some(uri)));
    let dst_text = dst.wait_checked(20);
    continues(&src_text, &dst_text);

    // Without the capability (the default) the same VM's stream is plain: a page with data
    // costs at least its size, in the LZ4 stream less. (Per page, as the number of rounds,
    // and so of pages sent, depends on the host's load; a zero page's record is 9 bytes.)
    let (r, _) = dst.cmd(&format!("migrate file:{}", plain.display()));
    assert_eq!(r, "");
    let plain_info = dst.ok("info migrate");
    dst.quit();
    let per_page = |info: &str| {
        let sent = field(info, "transferred ram:") << 10;
        let zero_records = field(info, "duplicate:") * 9;
        let normal = field(info, "normal bytes:") << 10;
        assert!(normal > 0, "{info}");
        sent.saturating_sub(zero_records) as f64 / normal as f64
    };
    let (a, b) = (per_page(&packed_info), per_page(&plain_info));
    eprintln!("RAM bytes per page sent: lz4 {a:.3}, plain {b:.3}");
    assert!(
        a < 1.0 && b >= 1.0,
        "transferred per page sent: lz4 {a}, plain {b}"
    );
    let plain_human = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[common::s(&plain), "--output", "human"],
    )
    .ok();
    assert!(!plain_human.stdout.contains("x-vmsnap-lz4"));
    assert_check(&img);
}

#[test]
fn savevm_honours_the_lz4_capability_and_loadvm_reads_it() {
    let _g = serial();
    if !kvm_and_qemu_img("savevm_lz4") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let mut vm = Vmm::start(
        dir.path(),
        &img,
        Opts {
            name: "vm",
            memory: "32M",
            incoming: None,
            prefix: &[],
        },
    );
    vm.wait_ticks(5);
    vm.ok("savevm plain");
    vm.ok("migrate_set_capability x-vmsnap-lz4 on");
    vm.ok("savevm packed");
    // loadvm of the compressed state: the guest runs on and its self-check passes.
    let checks = |t: &str| t.matches("CHECK OK").count();
    let before = checks(&vm.serial_text());
    let (r, st) = vm.cmd("loadvm packed");
    assert_eq!((r.as_str(), st.as_str()), ("", "running"));
    let start = Instant::now();
    while checks(&vm.serial_text()) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            vm.serial_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.quit();

    let list = common::run(
        common::vmsnap_bin(),
        &["snapshot", "-l", common::s(&img), "--output", "json"],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let size = |name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["vm-state-size"]
            .as_u64()
            .unwrap()
    };
    assert!(size("packed") < size("plain"), "{}", list.stdout);
    let human = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[common::s(&img), "--snapshot", "packed", "--output", "human"],
    )
    .ok();
    assert!(human.stdout.contains("x-vmsnap-lz4"), "{}", human.stdout);
    assert_check(&img);
}

/// A 64 MiB source on a fresh qcow2 disk in `dir`, past its fifth tick.
fn running_source(dir: &Path) -> (PathBuf, Vmm) {
    let img = dir.join("disk.qcow2");
    create_qcow2(&img);
    let opts = Opts {
        name: "src",
        memory: "64M",
        incoming: None,
        prefix: &[],
    };
    let src = Vmm::start(dir, &img, opts);
    src.wait_ticks(5);
    (img, src)
}

#[test]
fn migrate_cancel_answers_while_the_connect_hangs() {
    let _g = serial();
    if !kvm_and_qemu_img("migrate_cancel_answers_while_the_connect_hangs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, mut src) = running_source(dir.path());
    // A port whose connects hang: a listener with a backlog of 0 whose one queue slot is
    // taken, so the kernel drops further SYNs and the connect keeps retrying.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on a socket this test owns; it only changes the backlog.
    let r = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) };
    assert_eq!(r, 0);
    let addr = listener.local_addr().unwrap();
    let _queued = std::net::TcpStream::connect(addr).unwrap();
    src.ok(&format!("migrate -d tcp:{addr}"));
    std::thread::sleep(Duration::from_millis(300));
    let info = src.ok("info migrate");
    assert!(info.contains("Migration status: setup"), "{info}");
    let asked = Instant::now();
    src.ok("migrate_cancel");
    loop {
        let info = src.ok("info migrate");
        if info.contains("Migration status: cancelled") {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "cancel not answered: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("cancelled after {:?}", asked.elapsed());
    assert_eq!(src.status(), "running");
    let n = *ticks_of(&src.serial_text()).last().unwrap();
    src.wait_ticks(n + 5);
    src.quit();
    assert_check(&img);
}

#[test]
fn a_failure_after_the_disk_handover_gives_the_disks_back_to_the_source() {
    let _g = serial();
    if !kvm_and_qemu_img("a_failure_after_the_disk_handover_gives_the_disks_back_to_the_source") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, mut src) = running_source(dir.path());
    // The command takes the whole stream, then fails: the failure is only seen once the
    // source has flushed and released its disks (the handover) and sent everything.
    let sink = dir.path().join("taken.bin");
    let (r, st) = src.cmd(&format!(
        "migrate \"exec:cat > {}; exit 3\"",
        sink.display()
    ));
    assert!(r.starts_with("Error: "), "{r}");
    assert!(r.contains("exit status: 3"), "{r}");
    assert_eq!(st, "running");
    // The command had the whole stream: it decodes to its end.
    let out = common::run(env!("CARGO_BIN_EXE_vmsnap-inspect"), &[common::s(&sink)]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let info = src.ok("info migrate");
    assert!(info.contains("Migration status: failed ("), "{info}");
    // The source took its disks back: its lock keeps a second writer out, the guest's
    // disk records go on, and a snapshot (a write to the image) works.
    let out = common::qemu_img(&["info", common::s(&img)]);
    assert_ne!(out.code, Some(0), "the source did not take its lock back");
    let n = *ticks_of(&src.serial_text()).last().unwrap();
    src.wait_ticks(n + 8);
    let text = src.serial_text();
    assert!(
        !text.contains("DISK ERROR") && !text.contains("CHECK FAIL"),
        "{text}"
    );
    src.ok("savevm after");
    assert!(src.ok("info snapshots").contains("after"));
    src.quit();
    assert_check(&img);
}
