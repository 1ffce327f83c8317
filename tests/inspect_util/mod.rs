//! Helpers of the inspect_diff / inspect_core / inspect_compat tests: running the inspector,
//! unpacking fixtures, RAM as `--extract` writes it (the analyzer's own path, independent of
//! the page index that --diff and --dump-guest-memory use), and counter-guest snapshots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::gunzip;
use crate::common::run_vm::{assert_check, create_qcow2, RunVm};

pub fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .args(args)
        .output()
        .unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Decompresses a fixture into `dir` and returns its path.
pub fn unpack(dir: &Path, gz: &str) -> PathBuf {
    let path = dir.join(gz.trim_end_matches(".gz"));
    std::fs::write(&path, gunzip(gz)).unwrap();
    path
}

/// The RAM blocks of a stream or snapshot (`args` as for vmsnap-inspect), via `--extract`.
pub fn extract_ram(dir: &Path, args: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let x = tempfile::tempdir_in(dir).unwrap();
    let mut all = args.to_vec();
    all.extend(["-x", x.path().to_str().unwrap()]);
    let out = inspect(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
        .lines()
        .filter(|l| *l != "desc.json" && *l != "state.json")
        .map(|b| {
            let data = std::fs::read(x.path().join(b.trim_start_matches('/'))).unwrap();
            (b.to_string(), data)
        })
        .collect()
}

/// Inclusive `0xSTART-0xEND` ranges of the 4 KiB pages where `a` and `b` differ.
pub fn differing_ranges(a: &[u8], b: &[u8]) -> Vec<String> {
    const PS: usize = 4096;
    let pages = a.len().max(b.len()).div_ceil(PS);
    let page = |v: &[u8], n: usize| {
        v.get(n * PS..((n + 1) * PS).min(v.len()))
            .map(<[u8]>::to_vec)
    };
    let mut out: Vec<(usize, usize)> = Vec::new();
    for n in 0..pages {
        if page(a, n) != page(b, n) {
            match out.last_mut() {
                Some((_, end)) if *end + 1 == n => *end = n,
                _ => out.push((n, n)),
            }
        }
    }
    out.iter()
        .map(|(s, e)| format!("{:#x}-{:#x}", s * PS, (e + 1) * PS - 1))
        .collect()
}

/// A counter-guest image with snapshot `s1`, then (after some ticks) `s2`.
pub fn counter_snapshots(dir: &Path) -> PathBuf {
    let img = dir.join("counter.qcow2");
    create_qcow2(&img);
    let mut vm = RunVm::start(dir, &[format!("file={}", img.display())], 1, None, 1);
    vm.wait_past(2);
    let t = vm.stop();
    vm.ok("savevm s1");
    vm.ok("cont");
    vm.wait_past(t + 5);
    vm.stop();
    vm.ok("savevm s2");
    vm.quit();
    assert_check(&img);
    img
}

/// The first value of a device section in `--dump state` JSON whose key starts with `idstr (`.
pub fn section<'a>(state: &'a serde_json::Value, idstr: &str) -> &'a serde_json::Value {
    let prefix = format!("{idstr} (");
    state
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no section {idstr}"))
}

/// `"0x…"` (optionally followed by ` (-n)`) as a number.
pub fn hex(v: &serde_json::Value) -> u64 {
    let s = v.as_str().unwrap();
    let s = s.split(' ').next().unwrap();
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}
