//! Issue 5, done-means 2: a counter guest dirtying memory faster than a low `max-bandwidth`
//! only completes its live migration with auto-converge on. With it off the source keeps
//! iterating until `migrate_cancel`, and then runs on correctly (ticks continue, CHECK OK).
//!
//! Sizes are chosen so that one pass over RAM is short: 8 MiB of RAM (6 MiB of it dirtied,
//! 412 KiB per tick at 40 MiB/s), 16 MiB/s of bandwidth, a 20 ms downtime limit (320 KiB at
//! that bandwidth, less than one tick's dirtying). Unthrottled, a pass (~0.4 s, ~40 ticks)
//! leaves the whole area dirty again; only a vCPU throttled to a few ticks per second lets
//! the remainder fit.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::monitor::Monitor;
use common::ticks::assert_continues;

const MEM: &str = "8M";
const DIRTY_MIB: &str = "40";
const BANDWIDTH: &str = "16M";
const DOWNTIME_LIMIT_MS: &str = "20";

/// Kills the VM processes even when an assertion fails.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `vmsnap run` with the counter guest dirtying memory, serial to `serial`, monitor on `mon`.
fn vm(serial: &Path, mon: &Path, incoming: Option<&str>) -> Child {
    let mut c = Command::new(common::vmsnap_bin());
    c.args(["run", "-m", MEM, "--dirty-rate", DIRTY_MIB])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--monitor")
        .arg(format!("unix:{}", mon.display()));
    if let Some(uri) = incoming {
        c.arg("--incoming").arg(uri);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}: ");
    info.lines().find_map(|l| l.strip_prefix(&prefix))
}

fn status(info: &str) -> &str {
    field(info, "Migration status").unwrap_or("")
}

fn syncs(info: &str) -> u64 {
    field(info, "dirty sync count")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Tick numbers in a piece of guest output.
fn ticks_in(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// Tick numbers the guest printed so far.
fn ticks(serial: &Path) -> Vec<u64> {
    ticks_in(&std::fs::read_to_string(serial).unwrap_or_default())
}

/// Waits until the guest printed `n` more ticks and a `CHECK OK` after `after` bytes of its
/// output; returns the output.
fn wait_for_progress(serial: &Path, after: usize, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        let fresh = text.get(after..).unwrap_or("");
        let new_ticks = fresh.lines().filter(|l| l.starts_with("tick ")).count();
        if new_ticks >= n && fresh.contains("CHECK OK") {
            assert!(!text.contains("CHECK FAIL"), "{text}");
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "guest did not progress: {}",
            &text[text.len().saturating_sub(400)..]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pair {
    dir: tempfile::TempDir,
    procs: Procs,
    src: Monitor,
    uri: String,
}

impl Pair {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Source and destination VMs, the source running (and dirtying) for a moment, the
/// bandwidth capped.
fn start_pair(auto_converge: bool) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let p = |n: &str| dir.path().join(n);
    let procs = Procs(vec![
        vm(&p("dst.serial"), &p("dst.sock"), Some(&uri)),
        vm(&p("src.serial"), &p("src.sock"), None),
    ]);
    let mut src = Monitor::connect(&p("src.sock"), || None);
    wait_for_progress(&p("src.serial"), 0, 10);
    src.ok(&format!("migrate_set_parameter max-bandwidth {BANDWIDTH}"));
    src.ok(&format!(
        "migrate_set_parameter downtime-limit {DOWNTIME_LIMIT_MS}"
    ));
    if auto_converge {
        src.ok("migrate_set_capability auto-converge on");
        // Bigger steps than QEMU's 20 + 10 % (one step per second at most) keep the test short.
        src.ok("migrate_set_parameter cpu-throttle-initial 60");
        src.ok("migrate_set_parameter cpu-throttle-increment 20");
    }
    Pair {
        dir,
        procs,
        src,
        uri,
    }
}

#[test]
fn without_auto_converge_it_iterates_until_cancelled_and_the_source_runs_on() {
    if !common::kvm(module_path!()) {
        return;
    }
    let mut pair = start_pair(false);
    let uri = pair.uri.clone();
    pair.src.ok(&format!("migrate -d {uri}"));
    // Several passes over RAM, none of them completing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        std::thread::sleep(Duration::from_millis(200));
        let info = pair.src.ok("info migrate");
        assert_eq!(status(&info), "active", "{info}");
        if syncs(&info) >= 5 {
            break info;
        }
        assert!(Instant::now() < deadline, "too few rounds: {info}");
    };
    // Still far from fitting the downtime budget, and not throttled.
    let remaining: u64 = field(&info, "remaining ram")
        .and_then(|s| s.strip_suffix(" kbytes")?.parse().ok())
        .unwrap();
    assert!(remaining > 0, "{info}");
    if let Some(t) = field(&info, "cpu throttle percentage") {
        assert_eq!(t.trim(), "0", "{info}");
    }

    pair.src.ok("migrate_cancel");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (info, vm) = pair.src.cmd("info migrate");
        if status(&info) == "cancelled" {
            assert_eq!(vm, "running", "{info}");
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The source carries on: ticks continue in order and the self-check passes.
    let serial = pair.path("src.serial");
    let before = std::fs::read_to_string(&serial).unwrap().len();
    let last_before = *ticks(&serial).last().unwrap();
    let text = wait_for_progress(&serial, before, 70);
    let all = ticks(&serial);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "ticks out of order");
    assert!(*all.last().unwrap() > last_before + 60);
    assert!(!text.contains("DISK ERROR"));
    drop(pair.procs);
}

#[test]
fn with_auto_converge_it_completes_and_the_destination_runs_on() {
    if !common::kvm(module_path!()) {
        return;
    }
    let mut pair = start_pair(true);
    let uri = pair.uri.clone();
    pair.src.ok(&format!("migrate -d {uri}"));
    let start = Instant::now();
    let mut max_throttle = 0u32;
    let info = loop {
        std::thread::sleep(Duration::from_millis(100));
        let info = pair.src.ok("info migrate");
        if let Some(t) = field(&info, "cpu throttle percentage").and_then(|t| t.trim().parse().ok())
        {
            max_throttle = max_throttle.max(t);
        }
        match status(&info) {
            "completed" => break info,
            "active" | "setup" | "device" => {}
            other => panic!("migration {other}: {info}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "did not converge: {info}"
        );
    };
    eprintln!(
        "converged after {:?}, highest throttle seen {max_throttle} %, {} syncs",
        start.elapsed(),
        syncs(&info)
    );
    assert!(
        syncs(&info) >= 3,
        "auto-converge needs rounds to act: {info}"
    );
    assert!(max_throttle >= 60, "completed without throttling: {info}");
    assert!(field(&info, "downtime").is_some(), "{info}");
    // The source is stopped for good, the destination runs the guest on from where it was.
    let (_, src_state) = pair.src.cmd("");
    assert_eq!(src_state, "paused (postmigrate)");
    // The source may have stopped in the middle of printing a line; the destination then
    // finishes that line. Even a 99 % throttled vCPU prints every tick (see common::ticks).
    let src_text = std::fs::read_to_string(pair.path("src.serial")).unwrap();
    let mut dst = Monitor::connect(&pair.path("dst.sock"), || None);
    let text = wait_for_progress(&pair.path("dst.serial"), 0, 10);
    let (_, dst_state) = dst.cmd("");
    assert_eq!(dst_state, "running");
    let (last, first) = assert_continues(&src_text, &text);
    eprintln!("source's last tick {last}, destination's first {first}");
    drop(pair.procs);
}
