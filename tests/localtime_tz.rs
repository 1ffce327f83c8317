//! Snapshot dates in local time, byte for byte as `qemu-img snapshot -l` prints them, for time
//! zones whose daylight-saving changes come from a POSIX rule: TZ strings with rules, and a
//! "slim" TZif file (made by `zic -b slim`) that lists few transitions and leaves the rest to
//! its footer rule.

mod common;

use std::path::Path;
use std::process::Command;

use common::{require, s};

fn snapshot_list(prog: &str, args: &[&str], tz: &str) -> String {
    let o = Command::new(prog)
        .args(args)
        .env("TZ", tz)
        .output()
        .unwrap();
    assert!(o.status.success(), "{prog} {args:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

fn same_as_qemu_img(img: &Path, tz: &str) -> String {
    let ours = snapshot_list(common::vmsnap_bin(), &["snapshot", "-l", s(img)], tz);
    let theirs = snapshot_list("qemu-img", &["snapshot", "-l", s(img)], tz);
    assert_eq!(ours, theirs, "TZ={tz}");
    ours
}

#[test]
fn posix_tz_rules_like_qemu_img() {
    if !require(module_path!(), &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = common::fixture_copy("snap-basic.qcow2.gz", dir.path());
    // The fixture's snapshots are from 2026-11-22 04:28:50 UTC: daylight-saving time in the
    // southern rule, standard time in the northern one.
    let south = same_as_qemu_img(&img, "AEST-10AEDT,M10.1.0,M4.1.0/3");
    assert!(south.contains("2026-11-22 15:28:50"), "{south}");
    let north = same_as_qemu_img(&img, "EST5EDT,M3.2.0,M11.1.0");
    assert!(north.contains("2026-11-21 23:28:50"), "{north}");
    same_as_qemu_img(&img, "<+0530>-5:30");
}

#[test]
fn slim_tzif_footer_rule_like_qemu_img() {
    if !require(module_path!(), &["qemu-img", "zic"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = common::fixture_copy("snap-basic.qcow2.gz", dir.path());
    // Central European rules since 2000, forever: a slim file stores the rule, not the
    // transitions up to 2037. (The TZif reader this replaced kept the offset of the last
    // listed transition, summer time here, and printed 06:28:50.)
    let src = dir.path().join("zone.txt");
    std::fs::write(
        &src,
        "Rule\tT\t2000\tmax\t-\tMar\tlastSun\t2:00s\t1:00\tD\n\
         Rule\tT\t2000\tmax\t-\tOct\tlastSun\t2:00s\t0\tS\n\
         Zone\tTest/Slim\t1:00\tT\tCE%sT\n",
    )
    .unwrap();
    let zones = dir.path().join("zoneinfo");
    let o = Command::new("zic")
        .args(["-b", "slim", "-d", s(&zones), s(&src)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let file = zones.join("Test/Slim");
    assert!(
        std::fs::metadata(&file).unwrap().len() < 400,
        "not a slim file"
    );
    let out = same_as_qemu_img(&img, &format!(":{}", file.display()));
    // CET: UTC+1 on 2026-11-22.
    assert!(out.contains("2026-11-22 05:28:50"), "{out}");
}
