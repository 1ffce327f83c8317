//! Replays the fuzz corpus (`fuzz/corpus/TARGET/`) and every regression input the fuzzers
//! found (`testdata/fuzz/TARGET/`) through the fuzz targets themselves, so `cargo test` holds
//! each target's assertions on each input without libFuzzer (issue 11, item 5; the targets and
//! the engine are described in `fuzz/README.md` and `formats/fuzzing.md`).

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/targets/mod.rs"]
#[allow(dead_code)]
mod targets;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.retain(|p| p.is_file() && p.extension().map_or(true, |e| e != "md"));
    v.sort();
    v
}

fn replay(target: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = targets::ALL
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .expect("target listed in targets::ALL");
    let mut n = 0;
    for dir in [
        root.join("fuzz/corpus").join(target),
        root.join("testdata/fuzz").join(target),
    ] {
        for p in inputs(&dir) {
            let data = std::fs::read(&p).unwrap();
            eprintln!("{target}: {}", p.display());
            run(&data);
            n += 1;
        }
    }
    n
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let n = replay(stringify!($name));
            assert!(n > 0, "no corpus for {}", stringify!($name));
        }
    )*};
}

replay_tests!(
    qcow2_read,
    qcow2_write,
    stream,
    vmdesc,
    nbd_uri,
    monitor_args,
    snapshot_extra,
    checkpoint,
    qmp,
    nbd_reply
);

#[test]
fn every_target_is_replayed() {
    let listed: Vec<&str> = targets::ALL.iter().map(|(n, _)| *n).collect();
    let here = [
        "qcow2_read",
        "qcow2_write",
        "stream",
        "vmdesc",
        "nbd_uri",
        "monitor_args",
        "snapshot_extra",
        "checkpoint",
        "qmp",
        "nbd_reply",
    ];
    assert_eq!(listed, here);
}

/// `qcow2_write` findings on images already corrupt that were fixed
/// (testdata/fuzz/strict-fixed/): the rules hold on them in strict mode.
#[test]
fn fixed_strict_findings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fuzz/strict-fixed/qcow2_write");
    let found = inputs(&dir);
    assert!(!found.is_empty(), "no inputs in {}", dir.display());
    for p in found {
        let data = std::fs::read(&p).unwrap();
        targets::qcow2_write::run_strict(&data);
    }
}

/// The open `qcow2_write` findings on images already corrupt (testdata/fuzz/strict/): each
/// must still break "refused ⇒ unchanged" or "accepted ⇒ no more corruptions" in strict
/// mode, so that the list in formats/fuzzing.md stays true: when a fix makes one pass, this
/// fails until the input moves to strict-fixed/ (replayed by `fixed_strict_findings`). An
/// empty directory passes.
#[test]
fn open_strict_findings_still_break_a_rule() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fuzz/strict/qcow2_write");
    let mut fixed = Vec::new();
    for p in inputs(&dir) {
        let data = std::fs::read(&p).unwrap();
        if std::panic::catch_unwind(|| targets::qcow2_write::run_strict(&data)).is_ok() {
            fixed.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        fixed.is_empty(),
        "fixed, move to testdata/fuzz/strict-fixed/qcow2_write/: {fixed:?}"
    );
}
