//! `vmsnap run --mem-path FILE`: guest RAM filled from a file (the benchmark's random-RAM
//! guests), saved whole by savevm and loaded back in place by loadvm.
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn vmsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs the counter guest with `extra` options and feeds `commands` to its stdio monitor.
fn run(disk: &Path, extra: &[&str], commands: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("run")
        .arg("--drive")
        .arg(format!("file={}", disk.display()))
        .args(["--serial", "none", "--monitor", "stdio"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn state_sizes(disk: &Path) -> Vec<(String, u64)> {
    let out = vmsnap(&["snapshot", "-l", disk.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["vm-state-size"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn random_ram_from_a_file_is_saved_whole_and_loaded_in_place() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    let out = vmsnap(&["create", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    assert!(out.status.success(), "{out:?}");
    let ram = dir.path().join("ram");
    std::fs::write(&ram, random_bytes(16 << 20, 7)).unwrap();
    let ram = ram.to_str().unwrap();

    // Random RAM: (almost) every page is a full PAGE record.
    let out = run(
        &disk,
        &["-m", "16M", "--mem-path", ram],
        "savevm full\nquit\n",
    );
    assert!(out.status.success(), "{out:?}");
    // The same guest without the file: RAM is mostly zero pages.
    let out = run(&disk, &["-m", "16M"], "savevm plain\nquit\n");
    assert!(out.status.success(), "{out:?}");
    let sizes = state_sizes(&disk);
    let size = |n: &str| sizes.iter().find(|(s, _)| s == n).unwrap().1;
    assert!(size("full") > 16 << 20, "{sizes:?}");
    assert!(size("plain") < 2 << 20, "{sizes:?}");

    // loadvm in place over RAM holding other random bytes, then save again: every page of
    // the old contents was replaced (the state is as large as the loaded one, and the two
    // streams' RAM is identical, so the sizes match exactly).
    let other = dir.path().join("other");
    std::fs::write(&other, random_bytes(16 << 20, 99)).unwrap();
    let out = run(
        &disk,
        &["-m", "16M", "--mem-path", other.to_str().unwrap()],
        "loadvm plain\nsavevm again\nquit\n",
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Error"), "{stdout}");
    let sizes = state_sizes(&disk);
    let again = sizes.iter().find(|(s, _)| s == "again").unwrap().1;
    assert!(
        again < 2 << 20,
        "old random RAM survived the loadvm: {sizes:?}"
    );

    // A file of another size is refused, naming both sizes.
    let out = run(&disk, &["-m", "32M", "--mem-path", ram], "quit\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0x1000000") && err.contains("0x2000000"),
        "{err}"
    );
}
