//! Benchmark cases: convert (issue 14 item 1). `vmsnap convert -O qcow2 --active-only`
//! against `qemu-img convert -O qcow2` (the work qemu-img can do: the active layer), on the
//! block cases' 100 GiB image (64 KiB clusters, 4 GiB in 4096 scattered 1 MiB writes), with no
//! snapshot and with two snapshots whose layers differ; and the time `vmsnap convert` takes
//! to copy the whole tree (qemu-img has no equivalent). The output is removed and the page
//! cache written back before every run (untimed). Two rows per image, each the same work on
//! both sides: "synced" (vmsnap's default against `qemu-img convert -t writeback`, which
//! flushes the output when it closes it) and "unsynced" (`vmsnap convert -t unsafe` against
//! qemu-img's default, `-t unsafe`, whose output may still be in the page cache at exit).

use std::path::Path;
use std::process::Command;

use crate::block_cases::make_base;
use crate::harness::{copy_synced, run_measured, vmsnap_bin, Harness};

/// Runs the convert cases.
pub fn run(h: &mut Harness) {
    for tool in ["qemu-img", "qemu-io"] {
        if !crate::harness::have(tool) {
            h.info(&format!("SKIPPED: {tool} is not installed"));
            return;
        }
    }
    let base = h.path("convert-base.qcow2");
    let snaps = h.path("convert-2snap.qcow2");
    if let Err(e) = make_base(&base).and_then(|_| make_snapshots(&base, &snaps)) {
        h.info(&format!("convert: cannot make the images: {e}"));
        return;
    }
    h.info("image: 100 GiB virtual, 64 KiB clusters, 4 GiB of data; 2 snapshots, 512 MiB rewritten after each");
    let out = h.path("convert-out.qcow2");
    for (label, img) in [("0 snap", &base), ("2 snap", &snaps)] {
        for (mode, qemu_cache) in [("synced", "writeback"), ("unsynced", "unsafe")] {
            let (o1, o2, o3) = (out.clone(), out.clone(), out.clone());
            let (i1, i2) = (img.clone(), img.clone());
            let mut setup = move || remove(&o1).and_then(|_| write_back());
            let mut vm = move || {
                run_measured(
                    Command::new(vmsnap_bin())
                        .args(["convert", "-O", "qcow2", "--active-only", "-t", qemu_cache])
                        .arg(&i1)
                        .arg(&o2),
                )
            };
            let mut qm = move || {
                run_measured(
                    Command::new("qemu-img")
                        .args(["convert", "-O", "qcow2", "-t", qemu_cache])
                        .arg(&i2)
                        .arg(&o3),
                )
            };
            h.compare(
                &format!("convert active layer ({label}, {mode})"),
                &mut setup,
                &mut vm,
                &mut qm,
                "",
            );
        }
    }
    let (o1, o2) = (out.clone(), out.clone());
    let i1 = snaps.clone();
    h.measure(
        "convert all snapshots (2 snap)",
        &mut move || remove(&o1),
        &mut move || {
            run_measured(
                Command::new(vmsnap_bin())
                    .args(["convert", "-O", "qcow2"])
                    .arg(&i1)
                    .arg(&o2),
            )
        },
        "qemu-img cannot: it copies one layer",
    );
    for p in [&out, &base, &snaps] {
        let _ = std::fs::remove_file(p);
    }
}

/// Writes the page cache back (the previous run's unsynced output must not be written
/// during the next timed run).
fn write_back() -> Result<(), String> {
    run_measured(&mut Command::new("sync")).map(|_| ())
}

fn remove(p: &Path) -> Result<(), String> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", p.display())),
        _ => Ok(()),
    }
}

/// A copy of `base` with snapshot s1, 512 MiB rewritten, snapshot s2, 512 MiB rewritten.
fn make_snapshots(base: &Path, img: &Path) -> Result<(), String> {
    if img.exists() {
        return Ok(());
    }
    copy_synced(base, img)?;
    for round in 1..=2u64 {
        run_measured(
            Command::new("qemu-img")
                .args(["snapshot", "-c", &format!("s{round}")])
                .arg(img),
        )?;
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for (i, off) in crate::block_cases::write_offsets().enumerate() {
            if i as u64 % 8 == round {
                cmd.arg("-c")
                    .arg(format!("write -P {} {off} 1M", 0x80 + round));
            }
        }
        cmd.arg(img);
        run_measured(&mut cmd)?;
    }
    Ok(())
}
