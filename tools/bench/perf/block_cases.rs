//! Benchmark cases: block (issue 7 items 3 and 4). `vmsnap snapshot -c/-l/-d` against
//! `qemu-img snapshot -c/-l/-d`, and `vmsnap check` against `qemu-img check`, on a 100 GiB
//! qcow2 (64 KiB clusters) holding 4 GiB of data in 4096 scattered 1 MiB writes, with 1 and
//! with 20 snapshots present. Cases that modify the image run on a fresh synced copy each
//! time (copying is untimed).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{copy_synced, run_measured, vmsnap_bin, Harness};

/// Virtual size of the image.
const VIRTUAL_SIZE: u64 = 100 << 30;
/// Number of 1 MiB writes.
const WRITES: u64 = 4096;
/// Snapshot counts measured.
const SNAPSHOT_COUNTS: [usize; 2] = [1, 20];

/// Runs the block cases.
pub fn run(h: &mut Harness) {
    for tool in ["qemu-img", "qemu-io"] {
        if !crate::harness::have(tool) {
            h.info(&format!("SKIPPED: {tool} is not installed"));
            return;
        }
    }
    let base = h.path("block-base.qcow2");
    if let Err(e) = make_base(&base) {
        h.info(&format!("block: cannot make the base image: {e}"));
        return;
    }
    // One image per snapshot count, made from the previous one with qemu-img.
    let mut images = Vec::new();
    let mut have = 0usize;
    let mut prev = base.clone();
    for n in SNAPSHOT_COUNTS {
        let img = h.path(&format!("block-{n}snap.qcow2"));
        let made = copy_synced(&prev, &img).and_then(|_| {
            (have..n).try_for_each(|i| {
                run_measured(
                    Command::new("qemu-img")
                        .args(["snapshot", "-c", &format!("s{i}")])
                        .arg(&img),
                )
                .map(drop)
            })
        });
        if let Err(e) = made {
            h.info(&format!("block: cannot add snapshots: {e}"));
            return;
        }
        have = n;
        prev = img.clone();
        images.push((n, img));
    }
    let _ = std::fs::remove_file(&base);
    h.info(&format!(
        "image: {} GiB virtual, 64 KiB clusters, {WRITES} x 1 MiB scattered writes",
        VIRTUAL_SIZE >> 30
    ));
    for (n, img) in &images {
        let work = h.path("block-work.qcow2");
        modifying_case(
            h,
            &format!("snapshot -c ({n} snap)"),
            img,
            &work,
            &["-c", "new"],
        );
        modifying_case(
            h,
            &format!("snapshot -d ({n} snap)"),
            img,
            &work,
            &["-d", "s0"],
        );
        let _ = std::fs::remove_file(&work);
        readonly_case(
            h,
            &format!("snapshot -l ({n} snap)"),
            img,
            &["snapshot", "-l"],
        );
        readonly_case(h, &format!("check ({n} snap)"), img, &["check"]);
    }
    for (_, img) in &images {
        let _ = std::fs::remove_file(img);
    }
}

/// Writes the base image with a single qemu-io process, unless it exists already.
pub(crate) fn make_base(path: &Path) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    run_measured(
        Command::new("qemu-img")
            .args(["create", "-f", "qcow2"])
            .arg(path)
            .arg(VIRTUAL_SIZE.to_string()),
    )?;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for (i, off) in write_offsets().enumerate() {
        cmd.arg("-c")
            .arg(format!("write -P {} {off} 1M", i % 255 + 1));
    }
    cmd.arg(path);
    run_measured(&mut cmd)?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("sync {}: {e}", path.display()))
}

/// 1 MiB aligned offsets, one in each of `WRITES` equal slots of the disk, at a
/// pseudo-random place within the slot (so the writes neither overlap nor line up).
pub(crate) fn write_offsets() -> impl Iterator<Item = u64> {
    let slot_mib = (VIRTUAL_SIZE >> 20) / WRITES;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..WRITES).map(move |i| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (i * slot_mib + (x >> 40) % (slot_mib - 1)) << 20
    })
}

/// A case that changes the image: each run works on a fresh synced copy of `img`.
fn modifying_case(h: &mut Harness, name: &str, img: &Path, work: &Path, args: &[&str]) {
    let work: PathBuf = work.to_path_buf();
    let src = img.to_path_buf();
    let (w1, w2) = (work.clone(), work.clone());
    let mut setup = move || copy_synced(&src, &work);
    let mut vm = move || {
        run_measured(
            Command::new(vmsnap_bin())
                .arg("snapshot")
                .args(args)
                .arg(&w1),
        )
    };
    let mut qm = move || run_measured(Command::new("qemu-img").arg("snapshot").args(args).arg(&w2));
    h.compare(name, &mut setup, &mut vm, &mut qm, "");
}

/// A read-only case: both tools run on `img` itself.
fn readonly_case(h: &mut Harness, name: &str, img: &Path, args: &[&str]) {
    let (i1, i2) = (img.to_path_buf(), img.to_path_buf());
    let mut vm = move || run_measured(Command::new(vmsnap_bin()).args(args).arg(&i1));
    let mut qm = move || run_measured(Command::new("qemu-img").args(args).arg(&i2));
    h.compare(name, &mut || Ok(()), &mut vm, &mut qm, "");
}
