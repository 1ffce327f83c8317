//! `calc_dirty_rate` / `info dirty_rate` (QEMU's page-sampling measurement) on the counter
//! guest dirtying at a known rate, and the same commands on QEMU 7.2 with the benchmark's
//! guest dirtying at that rate under TCG: the same replies (numbers aside) and, on both, a
//! measured rate near the nominal one — what the migration benchmark relies on to say both
//! guests do the same work. QMP's `calc-dirty-rate` / `query-dirty-rate` shapes too.
mod common;
use common::qemu::Qemu;
use common::run_vm::RunVm;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The guests' pace matters: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RATE_MIB: u64 = 50;
/// Of 256 MiB dirtied at 50 MiB/s: about three fifths of the pages change in three seconds.
const MEMORY: &str = "256M";

/// The replies with every number replaced by `N`.
fn shape(text: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// `Dirty rate: R (MB/s)` of an `info dirty_rate` reply.
fn measured_rate(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("Dirty rate: ")?.strip_suffix(" (MB/s)"))
        .and_then(|r| r.parse().ok())
}

/// Runs the command sequence through `hmp`; returns the replies in order and the measured
/// rate.
fn session(mut hmp: impl FnMut(&str) -> String) -> (Vec<String>, u64) {
    let mut replies = Vec::new();
    for line in [
        "calc_dirty_rate",
        "calc_dirty_rate x",
        "calc_dirty_rate 0",
        "calc_dirty_rate 61",
        // Three seconds, so that the next request finds it running even on a busy host
        // (under 256 MiB at 50 MiB/s that still stays below one lap of the guest's area).
        "calc_dirty_rate 3",
        "calc_dirty_rate 1",
        "info dirty_rate",
    ] {
        replies.push(hmp(line).trim_end().to_string());
        if line == "calc_dirty_rate 3" {
            // QEMU marks the measurement as running from its thread, not from the command:
            // a request right behind the first would be accepted again. Give it a moment.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let start = Instant::now();
    let info = loop {
        let info = hmp("info dirty_rate");
        if info.starts_with("Status: measured") {
            break info;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{info}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let rate = measured_rate(&info).unwrap_or_else(|| panic!("{info}"));
    replies.push(info.trim_end().to_string());
    (replies, rate)
}

/// The guests dirty per timer tick and drop the ticks they miss, so a busy host lowers the
/// rate (more so for QEMU's TCG guest); sampling 512 pages moves it a little either way. MB
/// here is QEMU's: MiB.
fn assert_near_nominal(who: &str, rate: u64, lowest_pct: u64) {
    assert!(
        (RATE_MIB * lowest_pct / 100..=RATE_MIB * 13 / 10).contains(&rate),
        "{who}: measured {rate} MB/s for a guest dirtying {RATE_MIB} MiB/s"
    );
}

fn vmsnap_session(dir: &Path) -> (Vec<String>, u64) {
    let mut vm = RunVm::start_with(
        dir,
        &[],
        1,
        None,
        0,
        &["--memory", MEMORY, "--dirty-rate", &RATE_MIB.to_string()],
    );
    vm.wait_past(50);
    let r = session(|l| vm.cmd(l).0);
    vm.quit();
    r
}

fn qemu_session(dir: &Path) -> Option<(Vec<String>, u64)> {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench/guest/dirty.elf");
    if !common::have("qemu-system-x86_64") {
        eprintln!("SKIPPED (QEMU side): qemu-system-x86_64 missing");
        return None;
    }
    let sock = dir.join("qemu.sock");
    let args: Vec<String> = [
        "-accel",
        "tcg",
        "-m",
        MEMORY,
        "-display",
        "none",
        "-serial",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        guest.display().to_string(),
        "-append".into(),
        RATE_MIB.to_string(),
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ])
    .collect();
    let mut q = Qemu::spawn(&args, &sock);
    std::thread::sleep(Duration::from_millis(500));
    let r = session(|l| q.hmp(l));
    q.quit();
    Some(r)
}

#[test]
fn calc_dirty_rate_measures_the_guest_and_answers_like_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ours, rate) = vmsnap_session(dir.path());
    assert_eq!(
        ours[0],
        "unexpected end of expression\nTry \"help calc_dirty_rate\" for more information"
    );
    assert_eq!(ours[2], "Incorrect period length specified!");
    assert_eq!(ours[3], "Error: calc-time is out of range[1, 60].");
    assert_eq!(
        ours[4],
        "Starting dirty rate measurement with period 3 seconds\n\
         [Please use 'info dirty_rate' to check results]"
    );
    assert_eq!(ours[5], "Error: the dirty rate is already being measured.");
    assert!(ours[6].starts_with("Status: measuring\n"), "{}", ours[6]);
    assert_near_nominal("vmsnap", rate, 60);
    if let Some((theirs, qemu_rate)) = qemu_session(dir.path()) {
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(shape(o), shape(t), "vmsnap:\n{o}\nQEMU:\n{t}");
        }
        eprintln!("dirty rate at {RATE_MIB} MiB/s: vmsnap {rate} MB/s, QEMU {qemu_rate} MB/s");
        assert_near_nominal("QEMU (TCG, tools/bench/guest/dirty.elf)", qemu_rate, 40);
    }
}

/// QEMU's own QMP client runs the same scenario on vmsnap as it recorded on QEMU 7.2
/// (tools/qmp/record.sh): every return and error equal, the varying numbers as their types.
#[test]
fn qmp_dirty_rate_commands_answer_as_qemu_7_2_does() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = common::qmp::start_with_qmp(
        dir.path(),
        &[],
        0,
        &["--memory", "64M", "--dirty-rate", "20"],
    );
    let ours = common::qmp::sequence(&common::qmp::socket(dir.path(), 0), &["dirtyrate"]);
    common::qmp::assert_steps_match(&ours, &common::qmp::fixture("dirtyrate"));
    vm.quit();
}
