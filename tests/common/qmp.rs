//! QEMU's own QMP client (the `qemu.qmp` Python package, in a virtualenv made by
//! tools/qmp/venv.sh) driving a QMP server through tools/qmp/sequence.py, and the fixtures
//! the same script recorded against QEMU 7.2 (tools/qmp/record.sh, testdata/qmp/).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The virtualenv's python with qemu.qmp; panics (loudly, never skips) when it cannot be
/// installed.
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new(root().join("tools/qmp/venv.sh"))
            .output()
            .expect("running tools/qmp/venv.sh");
        assert!(
            out.status.success(),
            "the qemu.qmp client could not be installed (tools/qmp/venv.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Runs sequence.py against `sock` with `args`; its JSON output.
pub fn sequence(sock: &Path, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(root().join("tools/qmp/sequence.py"))
        .arg(sock)
        .args(args)
        .output()
        .expect("running sequence.py");
    assert!(
        out.status.success(),
        "sequence.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("sequence.py printed no JSON")
}

/// QEMU 7.2's recording of scenario `name`.
pub fn fixture(name: &str) -> Value {
    let p = root().join(format!("testdata/qmp/qemu-{name}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// The greeting has QEMU's shape, QEMU 7.2's version and says it is vmsnap.
pub fn assert_greeting(v: &Value) {
    let g = &v["greeting"]["QMP"];
    assert_eq!(g["version"]["qemu"]["major"], 7, "{v}");
    assert_eq!(g["version"]["qemu"]["minor"], 2, "{v}");
    assert!(g["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("vmsnap"));
    assert_eq!(g["capabilities"], serde_json::json!([]));
}

/// Every step (command, return or error, events, query-jobs entries) is QEMU's.
pub fn assert_steps_match(ours: &Value, qemu: &Value) {
    let (a, b) = (
        ours["steps"].as_array().unwrap(),
        qemu["steps"].as_array().unwrap(),
    );
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            x, y,
            "vmsnap differs from QEMU 7.2:\nvmsnap: {x:#}\nQEMU:   {y:#}"
        );
    }
    assert_eq!(a.len(), b.len(), "number of steps");
}

/// A temp dir with a fresh qcow2 `d.qcow2`; None (said loudly) without KVM or qemu-img.
pub fn image_dir(what: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    if !super::run_vm::kvm_and_qemu_img(what) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    super::run_vm::create_qcow2(&img);
    Some((dir, img))
}

/// The QMP socket of run number `run` in `dir`.
pub fn socket(dir: &Path, run: u32) -> PathBuf {
    dir.join(format!("qmp{run}.sock"))
}

/// [`super::run_vm::RunVm::start_with`] (1 vCPU) with QMP on [`socket`] and `extra` arguments.
pub fn start_with_qmp(
    dir: &Path,
    drives: &[String],
    run: u32,
    extra: &[&str],
) -> super::run_vm::RunVm {
    let qmp = format!("unix:{},server=on,wait=off", socket(dir, run).display());
    let mut args = vec!["--qmp", &qmp];
    args.extend_from_slice(extra);
    super::run_vm::RunVm::start_with(dir, drives, 1, None, run, &args)
}
