//! QMP snapshot jobs on the counter guest, driven by QEMU's own client (qemu.qmp): the same
//! scenario as QEMU 7.2 (testdata/qmp/qemu-snapshot.json) gives the same events, query-jobs
//! entries and error strings, and a snapshot-load resumes the guest at the saved tick + 1.
mod common;
use common::qmp::{
    assert_greeting, assert_steps_match, fixture, image_dir, sequence, start_with_qmp,
};
use common::run_vm::{assert_check, RunVm};
use common::ticks::ticks_of;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The guest's timing matters and the machine is small: one VM at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A counter guest with one qcow2 drive named `disk0` and QMP on `qmp{run}.sock`.
fn start(dir: &Path, img: &Path, run: u32) -> RunVm {
    let drives = [format!("file={},node-name=disk0", img.display())];
    start_with_qmp(dir, &drives, run, &[])
}

fn sock(dir: &Path, run: u32) -> std::path::PathBuf {
    common::qmp::socket(dir, run)
}

#[test]
fn snapshot_jobs_events_and_errors_match_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let mut vm = start(dir.path(), &img, 1);
    vm.wait_past(3);
    let ours = sequence(&sock(dir.path(), 1), &["snapshot", "disk0"]);
    assert_greeting(&ours);
    assert_steps_match(&ours, &fixture("snapshot"));
    // The failed load left the guest stopped; it runs on after cont.
    let (_, st) = vm.cmd("info status");
    assert_eq!(st, "paused (restore-vm)");
    vm.ok("cont");
    let n = vm.last_tick().unwrap_or(0);
    vm.wait_past(n + 2);
    vm.quit();
    assert_check(&img);
}

/// The `snapshot` scenario's events of job `id` in QEMU's recording.
fn qemu_events(step: &str) -> Value {
    let f = fixture("snapshot");
    let s = f["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["arguments"]["job-id"] == step)
        .unwrap();
    s["events"].clone()
}

/// The counter guest's last handled tick in snapshot `tag`'s RAM.
fn saved_tick(image: &Path, tag: &str) -> u64 {
    let ram = common::run_vm::snapshot_ram_of(image, tag, 16 << 20, 1, 1);
    common::run_vm::guest_word(&ram, vmsnap::vmm::guest::counter::LAST_ADDR)
}

fn job(dir: &Path, cmd: &str, args: Value) -> Value {
    let out = sequence(&sock(dir, 1), &["job", cmd, &args.to_string()]);
    out["steps"][0].clone()
}

#[test]
fn snapshot_load_resumes_at_the_saved_tick_plus_one() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let vm = start(dir.path(), &img, 1);
    vm.wait_past(5);
    let dev = json!({"vmstate": "disk0", "devices": ["disk0"]});
    let mut save = json!({"job-id": "save0", "tag": "snap0"});
    save.as_object_mut()
        .unwrap()
        .extend(dev.as_object().unwrap().clone());
    let s = job(dir.path(), "snapshot-save", save.clone());
    assert_eq!(s["events"], qemu_events("save0"), "{s:#}");
    assert_eq!(s["query-jobs"][0]["status"], "concluded");
    assert!(s["query-jobs"][0].get("error").is_none(), "{s:#}");
    assert_eq!(s["job-dismiss"], json!({}));
    let n = saved_tick(&img, "snap0");
    vm.wait_past(n + 20);
    let mark = vm.serial_text().len();
    let mut load = save;
    load["job-id"] = json!("load0");
    let l = job(dir.path(), "snapshot-load", load);
    assert_eq!(l["events"], qemu_events("load0"), "{l:#}");
    assert!(l["query-jobs"][0].get("error").is_none(), "{l:#}");
    assert_resumed_at(&vm, mark, n + 1);
    let d = job(
        dir.path(),
        "snapshot-delete",
        json!({"job-id": "del0", "tag": "snap0", "devices": ["disk0"]}),
    );
    assert_eq!(d["events"], qemu_events("del0"), "{d:#}");
    vm.quit();
    assert_check(&img);
    let listed = common::qemu_img(&["snapshot", "-l", common::s(&img)]);
    assert!(!listed.stdout.contains("snap0"), "{}", listed.stdout);
}

#[test]
fn a_writable_raw_node_is_refused_as_qemu_refuses_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let drives = [
        format!("file={},node-name=disk0", img.display()),
        format!("file={},format=raw,node-name=raw0", raw.display()),
    ];
    let vm = start_with_qmp(dir.path(), &drives, 1, &[]);
    vm.wait_past(2);
    let ours = sequence(&sock(dir.path(), 1), &["rawdev", "disk0", "raw0"]);
    assert_steps_match(&ours, &fixture("rawdev"));
    vm.quit();
    assert_check(&img);
}

/// The first tick printed after the load that followed byte `mark` of the serial output is
/// `want`, and the guest's own check of its memory passes.
fn assert_resumed_at(vm: &RunVm, mark: usize, want: u64) {
    let start = Instant::now();
    let text = loop {
        let t = vm.serial_text()[mark..].to_string();
        if t.find("CHECK ").is_some_and(|i| t[i..].contains('\n')) {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no CHECK:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Ticks printed before the load stopped the guest come first; the load's are where the
    // count goes back.
    let ticks = ticks_of(&text);
    let resumed = match ticks.first() {
        Some(&t) if t <= want => Some(t),
        _ => ticks.windows(2).find(|w| w[1] <= w[0]).map(|w| w[1]),
    };
    // A save that stopped the guest inside a print resumes by finishing that line: the
    // first whole tick line after the load is then the one after (as in nbd_run).
    assert!(
        resumed == Some(want) || resumed == Some(want + 1),
        "resumed at {resumed:?}, want {want}:\n{text}"
    );
    assert!(
        text.contains("CHECK OK") && !text.contains("CHECK FAIL"),
        "{text}"
    );
}

#[test]
fn vmsnap_s_live_save_and_eager_load_run_as_jobs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let vm = start(dir.path(), &img, 1);
    vm.wait_past(5);
    let args = json!({"job-id": "live0", "tag": "l", "vmstate": "disk0", "devices": ["disk0"]});
    let s = job(dir.path(), "x-vmsnap-snapshot-save-live", args.clone());
    let statuses: Vec<&str> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str()?.strip_prefix("JOB_STATUS_CHANGE live0 "))
        .collect();
    assert_eq!(
        statuses,
        ["created", "running", "waiting", "pending", "concluded"],
        "{s:#}"
    );
    assert!(s["query-jobs"][0].get("error").is_none(), "{s:#}");
    assert_eq!(s["query-jobs"][0]["type"], "snapshot-save");
    let n = saved_tick(&img, "l");
    vm.wait_past(n + 10);
    let mark = vm.serial_text().len();
    let mut load = args;
    load["job-id"] = json!("load1");
    load["mode"] = json!("eager");
    let l = job(dir.path(), "x-vmsnap-snapshot-load", load);
    assert!(l["query-jobs"][0].get("error").is_none(), "{l:#}");
    assert_resumed_at(&vm, mark, n + 1);
    vm.quit();
    assert_check(&img);
}
