//! Real QEMU 7.2 round trips through `vmsnap vmstate` (TCG, 32 MiB pattern RAM, SeaBIOS with
//! nothing to boot, a qcow2 disk, virtio-blk + e1000 + isa-serial, HMP over a unix socket):
//!
//! 1. QEMU → `migrate exec:cat > FILE` → `vmstate import` → QEMU `-loadvm TAG` (pc with one
//!    disk, q35 with two: the state on the first, the snapshot on both).
//! 2. QEMU `savevm` → `vmstate export` → QEMU `-incoming "exec:cat FILE"`.
//! 3. QEMU keeps our integrity record through `qemu-img snapshot -c/-d` and `savevm`/`delvm`
//!    of other snapshots; a flipped bit is then reported.
//!
//! Guest RAM is compared with `pmemsave` before and after, and against the pattern file.

mod common;
mod interop_util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::qemu::*;
use common::*;
use interop_util::*;

fn have_qemu(test: &str) -> bool {
    require(test, &["qemu-system-x86_64", "qemu-img"])
}

struct Setup {
    dir: tempfile::TempDir,
    pat: PathBuf,
    pattern: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pattern = pattern();
    let pat = dir.path().join("pattern.bin");
    std::fs::write(&pat, &pattern).unwrap();
    Setup { dir, pat, pattern }
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn disk(&self, name: &str) -> PathBuf {
        let img = self.path(name);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
        qemu_io("qcow2", &img, &["write -P 0x11 0 64k".into()]).ok();
        img
    }
}

/// Boots SeaBIOS for a moment, stops, saves RAM with pmemsave and migrates to a file.
fn run_and_migrate(st: &Setup, machine: &str, img: &Path, extra: &[&str], mig: &Path) -> Vec<u8> {
    let sock = st.path("src.sock");
    let mut q = Qemu::start(machine, img, &st.pat, &sock, extra);
    std::thread::sleep(Duration::from_millis(700));
    q.hmp("stop");
    let mem = q.pmemsave(&st.path("src.mem"));
    q.migrate_to(mig);
    q.quit();
    mem
}

/// `-drive`/`-device` arguments of a second virtio-blk disk.
fn second_disk(img: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("if=none,id=drive1,file={},format=qcow2", img.display()),
        "-device".into(),
        "virtio-blk-pci,drive=drive1".into(),
    ]
}

/// QEMU → migration file → `vmstate import` on `disks` images → QEMU `-loadvm`.
fn import_then_loadvm(machine: &str, disks: usize) {
    let st = setup();
    let img = st.disk("disk.qcow2");
    let img2 = st.disk("disk2.qcow2");
    let extra_owned = if disks == 2 {
        second_disk(&img2)
    } else {
        Vec::new()
    };
    let extra: Vec<&str> = extra_owned.iter().map(String::as_str).collect();
    let mig = st.path("mig.bin");
    let mem1 = run_and_migrate(&st, machine, &img, &extra, &mig);
    assert_pattern(&mem1, &st.pattern, "source");
    let mut args = vec!["vmstate", "import", s(&img)];
    if disks == 2 {
        args.push(s(&img2));
    }
    args.extend(["imported", s(&mig)]);
    vmsnap(&args).ok();
    qemu_img(&["check", s(&img)]).ok();
    if disks == 2 {
        qemu_img(&["check", s(&img2)]).ok();
        let l = qemu_img(&["snapshot", "-l", s(&img2)]).ok().stdout;
        assert!(l.contains("imported") && l.contains(" 0 B "), "{l}");
    }
    // Paused after loading (-S): RAM as saved.
    let sock = st.path("dst.sock");
    let mut paused = extra.clone();
    paused.extend(["-loadvm", "imported", "-S"]);
    let mut q = Qemu::start(machine, &img, &st.pat, &sock, &paused);
    let status = q.status();
    assert!(status.contains("paused"), "{machine}: {status}");
    let mem2 = q.pmemsave(&st.path("dst.mem"));
    assert!(
        mem1 == mem2,
        "{machine}: RAM after -loadvm differs from the source"
    );
    q.hmp("cont");
    assert_eq!(q.status(), "VM status: running", "{machine}");
    q.quit();
    // And without -S it simply runs.
    let mut running = extra.clone();
    running.extend(["-loadvm", "imported"]);
    let mut q = Qemu::start(machine, &img, &st.pat, &sock, &running);
    assert_eq!(q.status(), "VM status: running", "{machine}");
    let info = q.hmp("info snapshots");
    assert!(info.contains("imported"), "{info}");
    q.quit();
    qemu_img(&["check", s(&img)]).ok();
}

#[test]
fn qemu_migration_file_imports_and_loadvm_resumes_pc() {
    if have_qemu("qemu_migration_file_imports_and_loadvm_resumes_pc") {
        import_then_loadvm("pc-i440fx-7.2", 1);
    }
}

#[test]
fn qemu_migration_file_imports_and_loadvm_resumes_q35_two_disks() {
    if have_qemu("qemu_migration_file_imports_and_loadvm_resumes_q35_two_disks") {
        import_then_loadvm("pc-q35-7.2", 2);
    }
}

#[test]
fn qemu_savevm_exports_and_incoming_resumes_pc() {
    if have_qemu("qemu_savevm_exports_and_incoming_resumes_pc") {
        savevm_then_incoming("pc-i440fx-7.2");
    }
}

#[test]
fn qemu_savevm_exports_and_incoming_resumes_q35() {
    if have_qemu("qemu_savevm_exports_and_incoming_resumes_q35") {
        savevm_then_incoming("pc-q35-7.2");
    }
}

fn savevm_then_incoming(machine: &str) {
    let st = setup();
    let img = st.disk("disk.qcow2");
    let sock = st.path("src.sock");
    let mut q = Qemu::start(machine, &img, &st.pat, &sock, &[]);
    std::thread::sleep(Duration::from_millis(700));
    q.hmp("stop");
    let mem1 = q.pmemsave(&st.path("src.mem"));
    let out = q.hmp("savevm saved");
    assert!(out.trim().is_empty(), "savevm: {out}");
    q.hmp("qemu-io drive0 \"write -P 0x77 0 4k\"");
    q.quit();
    assert_pattern(&mem1, &st.pattern, "source");
    let mig = st.path("exported.bin");
    vmsnap(&["vmstate", "export", s(&img), "saved", "-o", s(&mig)]).ok();
    // The disk goes back to the snapshot, as loadvm would do.
    vmsnap(&["snapshot", "-a", "saved", s(&img)]).ok();
    let incoming = format!("exec:cat {}", mig.display());
    let mut q = Qemu::start(
        machine,
        &img,
        &st.pat,
        &st.path("dst.sock"),
        &["-incoming", &incoming],
    );
    // The source was stopped, so the destination stays paused after loading.
    let status = q.wait_incoming();
    assert_eq!(status, "VM status: paused", "{machine}: {status}");
    let mem2 = q.pmemsave(&st.path("dst.mem"));
    assert!(
        mem1 == mem2,
        "{machine}: RAM after -incoming differs from the source"
    );
    q.hmp("cont");
    assert_eq!(q.status(), "VM status: running", "{machine}");
    q.quit();
    qemu_img(&["check", s(&img)]).ok();
    // The disk is the snapshot's: the write made after savevm is gone.
    let r = qemu_io("qcow2", &img, &["read -P 0x11 0 64k".into()]).ok();
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
}

#[test]
fn qemu_keeps_our_integrity_record() {
    if !have_qemu("qemu_keeps_our_integrity_record") {
        return;
    }
    let st = setup();
    let img = st.disk("disk.qcow2");
    let mig = fixture_copy("mig-pc.bin.gz", st.dir.path());
    let state = std::fs::read(&mig).unwrap();
    vmsnap(&["vmstate", "import", s(&img), "ours", s(&mig)]).ok();
    let rec = record_of(&img, "ours").expect("record after import");
    let victim = find_state_bytes(&img, &state, 0x10_0000);
    // qemu-img rewrites the snapshot table twice.
    qemu_img(&["snapshot", "-c", "other", s(&img)]).ok();
    qemu_img(&["snapshot", "-d", "other", s(&img)]).ok();
    // QEMU savevm/delvm of other snapshots rewrites it again.
    let mut q = Qemu::start("pc-i440fx-7.2", &img, &st.pat, &st.path("q.sock"), &[]);
    std::thread::sleep(Duration::from_millis(300));
    q.hmp("stop");
    assert!(q.hmp("savevm q1").trim().is_empty());
    assert!(q.hmp("savevm q2").trim().is_empty());
    assert!(q.hmp("delvm q1").trim().is_empty());
    q.quit();
    qemu_img(&["check", s(&img)]).ok();
    let names: Vec<String> = qemu_snapshot_ids(&img)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(names, ["ours", "q2"]);
    assert_eq!(
        record_of(&img, "ours"),
        Some(rec),
        "QEMU changed our record"
    );
    assert!(matches!(
        verify(&img, "ours").unwrap(),
        vmsnap::interop::integrity::Verification::Verified(_)
    ));
    assert!(record_of(&img, "q2").is_none());
    let out = st.path("out.bin");
    vmsnap(&["vmstate", "export", s(&img), "ours", "-o", s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == state);
    // A flipped bit in the stored state is reported by name.
    flip_bit_at(&img, victim);
    std::fs::remove_file(&out).unwrap();
    let r = vmsnap(&["vmstate", "export", s(&img), "ours", "-o", s(&out)]).fails_cleanly();
    assert!(
        r.stderr.contains("snapshot 'ours': VM state is damaged"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    let want = "snapshot 'ours': VM state is damaged";
    let r = vmsnap(&["check", s(&img)]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains(want), "check: {}", r.stderr);
    let r = run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[s(&img), "--snapshot", "ours", "--dump", "desc"],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains(want), "inspect: {}", r.stderr);
    // vmsnap's loadvm refuses it before touching anything (needs KVM to start the VM).
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        let drive = format!("file={}", s(&img));
        let r = vmsnap(&[
            "run", "--drive", &drive, "--memory", "32M", "--serial", "none", "--loadvm", "ours",
        ]);
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(r.stderr.contains(want), "loadvm: {}", r.stderr);
    } else {
        eprintln!("SKIPPED: vmsnap loadvm part: /dev/kvm is missing or not accessible");
    }
    // QEMU's own snapshot is unaffected.
    vmsnap(&["vmstate", "export", s(&img), "q2", "-o", s(&out)]).ok();
}
