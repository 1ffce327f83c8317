//! `vmsnap-inspect A --diff B`: two QEMU 7.2 snapshots of one VM differ in named fields and in
//! exactly the RAM pages that differ when both RAMs are extracted; a snapshot equals its own
//! export; the counter guest's snapshots before and after some ticks differ in the page of its
//! counter; exit status as cmp.

mod common;
mod inspect_util;

use common::{kvm, require, s, vmsnap};
use inspect_util::{
    counter_snapshots, differing_ranges, extract_ram, hex, inspect, section, stdout, unpack,
};
use serde_json::Value;

fn diff_json(a: &str, b: &str) -> (Option<i32>, Value) {
    let out = inspect(&[a, "--diff", b, "--output", "json"]);
    let text = stdout(&out);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

fn device<'a>(report: &'a Value, idstr: &str) -> &'a Value {
    report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["idstr"] == idstr)
        .unwrap_or_else(|| panic!("{idstr} not in {report:#}"))
}

fn field<'a>(dev: &'a Value, path: &str) -> &'a Value {
    dev["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in {dev:#}"))
}

fn ram<'a>(report: &'a Value, block: &str) -> &'a Value {
    report["ram"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["block"] == block)
        .unwrap_or_else(|| panic!("{block} not in {report:#}"))
}

fn state(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--dump", "state"]);
    serde_json::from_str(&stdout(&inspect(&all))).unwrap()
}

#[test]
fn two_qemu_snapshots_of_one_vm() {
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(dir.path(), "snap-basic.qcow2.gz");
    let (a, b) = (format!("{}@first", s(&img)), format!("{}@second", s(&img)));
    let (code, report) = diff_json(&a, &b);
    assert_eq!(code, Some(1), "{report:#}");

    // Fields: old and new values as --dump state prints them for each snapshot.
    let first = state(&[s(&img), "--snapshot", "first"]);
    let second = state(&[s(&img), "--snapshot", "second"]);
    let cpu = device(&report, "cpu");
    let eip = field(cpu, "env.eip");
    assert_eq!(eip["old"], section(&first, "cpu")["env.eip"]);
    assert_eq!(eip["new"], section(&second, "cpu")["env.eip"]);
    assert_ne!(eip["old"], eip["new"]);
    let ticks = field(device(&report, "timer"), "cpu_ticks_offset");
    assert_eq!(ticks["old"], section(&first, "timer")["cpu_ticks_offset"]);
    // A device whose state is the same is not listed.
    assert!(!report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["idstr"] == "serial"));
    assert!(report["only_old"].as_array().unwrap().is_empty());
    assert!(report["machine"].is_null());

    // RAM: exactly the pages that differ between the two extracted RAMs.
    let ra = extract_ram(dir.path(), &[s(&img), "--snapshot", "first"]);
    let rb = extract_ram(dir.path(), &[s(&img), "--snapshot", "second"]);
    let expect = differing_ranges(&ra["ram0"], &rb["ram0"]);
    assert!(!expect.is_empty());
    let r0 = ram(&report, "ram0");
    assert_eq!(r0["ranges"], serde_json::json!(expect));
    let pages: u64 = expect
        .iter()
        .map(|r| {
            let (s, e) = r.split_once('-').unwrap();
            let p = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap();
            (p(e) + 1 - p(s)) / 4096
        })
        .sum();
    assert_eq!(r0["pages_differ"], pages);
    // Pages both snapshots left as the fixture's pattern are not reported (README: unchanged
    // in every visible stream).
    for r in r0["ranges"].as_array().unwrap() {
        let start = hex(&Value::from(r.as_str().unwrap().split('-').next().unwrap()));
        assert!(!(0x10_0000..0x1f8_e000).contains(&start), "{r}");
    }
    // Blocks with no difference are not listed.
    assert!(!report["ram"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["block"] == "pc.bios"));

    // The human output names the same things.
    let out = inspect(&[&a, "--diff", &b]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let eip_line = format!(
        "  env.eip: {} -> {}",
        eip["old"].as_str().unwrap(),
        eip["new"].as_str().unwrap()
    );
    assert!(text.contains(&eip_line), "{text}");
    assert!(
        text.contains(&format!("ram0: {pages} pages differ: {}", expect[0])),
        "{text}"
    );
}

#[test]
fn snapshot_equals_its_export_and_the_qemu_extracted_state() {
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(dir.path(), "snap-basic.qcow2.gz");
    let exported = dir.path().join("first.bin");
    vmsnap(&["vmstate", "export", s(&img), "first", "-o", s(&exported)]).ok();
    let extracted = unpack(dir.path(), "vmstate-basic-first.bin.gz");
    let snap = format!("{}@first", s(&img));
    for other in [s(&exported), s(&extracted)] {
        for output in ["human", "json"] {
            let out = inspect(&[&snap, "--diff", other, "--output", output]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}{}",
                stdout(&out),
                String::from_utf8_lossy(&out.stderr)
            );
            if output == "human" {
                assert_eq!(stdout(&out), "");
            }
        }
    }
    // --snapshot keeps working for the left side.
    let out = inspect(&[s(&img), "--snapshot", "1", "--diff", s(&exported)]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn trouble_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(dir.path(), "snap-basic.qcow2.gz");
    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, b"QEVM\0\0\0\x03\x42").unwrap();
    let first = format!("{}@first", s(&img));
    for (a, b) in [
        (first.as_str(), s(&garbage)),
        (first.as_str(), "/nonexistent/stream.bin"),
        (first.as_str(), &format!("{}@nosuch", s(&img))),
        // A disk-only snapshot has no VM state.
        (first.as_str(), &format!("{}@disk-only", s(&img))),
    ] {
        let out = inspect(&[a, "--diff", b]);
        assert_eq!(out.status.code(), Some(2), "{a} {b}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("vmsnap-inspect: "), "{err}");
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn counter_guest_before_and_after_ticks() {
    if !kvm(module_path!()) || !require(module_path!(), &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = counter_snapshots(dir.path());
    let (a, b) = (format!("{}@s1", s(&img)), format!("{}@s2", s(&img)));
    let (code, report) = diff_json(&a, &b);
    assert_eq!(code, Some(1), "{report:#}");

    // The tick counter (u64 at TICKS_ADDR) went up, and its page is reported, as is every page
    // that differs in the extracted RAMs.
    let ra = extract_ram(dir.path(), &[s(&img), "--snapshot", "s1"]);
    let rb = extract_ram(dir.path(), &[s(&img), "--snapshot", "s2"]);
    let at = vmsnap::vmm::guest::counter::TICKS_ADDR as usize;
    let tick = |r: &[u8]| u64::from_le_bytes(r[at..at + 8].try_into().unwrap());
    assert!(tick(&rb["pc.ram"]) > tick(&ra["pc.ram"]));
    let expect = differing_ranges(&ra["pc.ram"], &rb["pc.ram"]);
    let r = ram(&report, "pc.ram");
    assert_eq!(r["ranges"], serde_json::json!(expect));
    let page = (at & !0xfff) as u64;
    assert!(
        expect.iter().any(|r| {
            let (s, e) = r.split_once('-').unwrap();
            let p = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap();
            (p(s)..=p(e)).contains(&page)
        }),
        "{expect:?}"
    );
    // The counter itself: the guest keeps the last tick handled in rbx (counter.S) and in
    // RAM at LAST_ADDR; the diff shows rbx going up from one to the other.
    let rbx = field(device(&report, "cpu"), "rbx");
    let last_at = vmsnap::vmm::guest::counter::LAST_ADDR as usize;
    let last = |r: &[u8]| u64::from_le_bytes(r[last_at..last_at + 8].try_into().unwrap());
    for (v, r) in [(&rbx["old"], &ra), (&rbx["new"], &rb)] {
        // Equal unless the stop fell between `inc rbx` and the store to `last`.
        let n = hex(v);
        let l = last(&r["pc.ram"]);
        assert!(n == l || n == l + 1, "rbx {n} vs last {l}");
    }
    assert!(hex(&rbx["new"]) > hex(&rbx["old"]));
}

/// A checkpoint file (`vmstate export --checkpoint`) is a side of `--diff` and `--compat` like
/// a stream or a snapshot: equal to the snapshot it came from, different from a later one, and
/// compatible with its own machine.
#[test]
fn a_checkpoint_file_diffs_and_checks_like_its_snapshot() {
    if !kvm(module_path!()) || !require(module_path!(), &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = counter_snapshots(dir.path());
    let ckpt = dir.path().join("s1.ckpt");
    vmsnap(&[
        "vmstate",
        "export",
        s(&img),
        "s1",
        "-o",
        s(&ckpt),
        "--checkpoint",
    ])
    .ok();
    let (s1, s2) = (format!("{}@s1", s(&img)), format!("{}@s2", s(&img)));
    let (code, report) = diff_json(s(&ckpt), &s1);
    assert_eq!(code, Some(0), "{report:#}");
    let (code, report) = diff_json(s(&ckpt), &s2);
    assert_eq!(code, Some(1), "{report:#}");
    // The same differences as between the two snapshots themselves.
    let (_, between) = diff_json(&s1, &s2);
    assert_eq!(ram(&report, "pc.ram"), ram(&between, "pc.ram"));
    for (a, b) in [(s(&ckpt), s1.as_str()), (s1.as_str(), s(&ckpt))] {
        let out = inspect(&[a, "--compat", b]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "--compat {a} {b}: {}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A damaged checkpoint is trouble (exit 2), not a difference.
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let bad = dir.path().join("bad.ckpt");
    std::fs::write(&bad, &bytes).unwrap();
    for args in [
        [s(&bad), "--diff", s1.as_str()],
        [s1.as_str(), "--compat", s(&bad)],
    ] {
        let out = inspect(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stdout(&out));
        assert!(err.contains("damaged"), "{args:?}: {err}");
    }
}
