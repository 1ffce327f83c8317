//! Writes to damaged qcow2 images never make them worse (issue 11, write side).
//!
//! Each case builds a damaged image the way QEMU's iotests 060 does (qemu-img/qemu-io, then
//! byte pokes at offsets read from the image), runs one vmsnap write (`io -c 'write …'`,
//! `snapshot -c/-d/-a`) and asserts what a user sees: a non-zero exit, a message naming the
//! structure or cluster, and a file whose bytes did not change. The same operation is then
//! run by QEMU on a copy to record what QEMU does: where QEMU refuses, it names the same
//! structure; where QEMU goes ahead, it changes the file (and `qemu-img check` still finds
//! the image damaged) while vmsnap refused.
//!
//! Layout of a fresh `qemu-img create -f qcow2 IMG 64M` (64 KiB clusters), as 060 assumes:
//! header 0x0, refcount table 0x10000, refcount block 0x20000, L1 table 0x30000, first L2
//! table 0x40000. Offsets that depend on allocation order are read from the image.

mod common;

use std::path::{Path, PathBuf};

use common::{qemu_img, qemu_io, require, s, sha256_file, vmsnap, Run};

const RT: u64 = 0x10000;
const RB: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn peek64(p: &Path, off: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]).ok();
    p
}

fn qio(p: &Path, cmd: &str) {
    qemu_io("qcow2", p, &[cmd.to_owned()]).ok();
}

/// 060 "L2 reference into L1": the first L1 entry names the L1 table itself as its L2 table.
fn l2_into_l1(dir: &Path) -> PathBuf {
    let p = fresh(dir, "l2_into_l1.qcow2");
    poke(&p, L1, &(0x8000_0000_0000_0000u64 | L1).to_be_bytes());
    p
}

/// 060 "cluster data reference into refcount block": an L2 entry (COPIED) points at the
/// refcount block.
fn data_into_refblock(dir: &Path) -> PathBuf {
    let p = fresh(dir, "data_into_refblock.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(L2 + 0x10000)
        .unwrap();
    poke(&p, L1, &(0x8000_0000_0000_0000u64 | L2).to_be_bytes());
    poke(&p, RB + 8, &[0, 1]);
    poke(&p, L2, &(0x8000_0000_0000_0000u64 | RB).to_be_bytes());
    p
}

/// 060 "cluster data reference into inactive L2 table": after a snapshot and a write, the
/// active L2 entry (COPIED) points at the snapshot's L2 table.
fn data_into_inactive_l2(dir: &Path) -> PathBuf {
    let p = fresh(dir, "data_into_inactive_l2.qcow2");
    qio(&p, "write -P 1 0 512");
    qemu_img(&["snapshot", "-c", "foo", s(&p)]).ok();
    qio(&p, "write -P 2 0 512");
    let active_l2 = peek64(&p, L1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(active_l2, L2, "the write must have copied the L2 table");
    poke(
        &p,
        active_l2,
        &(0x8000_0000_0000_0000u64 | L2).to_be_bytes(),
    );
    p
}

/// 060 "empty refcount table": refcount table entry 0 is zero.
fn empty_reftable(dir: &Path) -> PathBuf {
    let p = fresh(dir, "empty_reftable.qcow2");
    poke(&p, RT, &[0; 8]);
    p
}

/// A data cluster shared by a snapshot and the active layer with refcount 1 instead of 2.
fn shared_refcount_one(dir: &Path) -> PathBuf {
    let p = fresh(dir, "shared_refcount_one.qcow2");
    qio(&p, "write -P 0x11 0 64k");
    qemu_img(&["snapshot", "-c", "s1", s(&p)]).ok();
    let l2 = peek64(&p, L1) & 0x00ff_ffff_ffff_fe00;
    let data = peek64(&p, l2) & 0x00ff_ffff_ffff_fe00;
    // 16-bit refcounts: entry `cluster` of the first block.
    poke(&p, RB + (data >> 16) * 2, &[0, 1]);
    p
}

/// A snapshot (taken over 128 KiB of data, then 64 KiB rewritten) and its L1 table offset.
fn with_snapshot(dir: &Path, name: &str) -> (PathBuf, u64) {
    let p = fresh(dir, name);
    qio(&p, "write -P 0x11 0 128k");
    qemu_img(&["snapshot", "-c", "s1", s(&p)]).ok();
    qio(&p, "write -P 0x22 0 64k");
    let table = peek64(&p, 64);
    let sn_l1 = peek64(&p, table);
    (p, sn_l1)
}

/// The snapshot's first L1 entry points far past the end of the file.
fn snapshot_l1_entry_past_eof(dir: &Path) -> PathBuf {
    let (p, sn_l1) = with_snapshot(dir, "snapshot_l1_entry_past_eof.qcow2");
    poke(&p, sn_l1, &0x10_0000_0000u64.to_be_bytes());
    p
}

/// The snapshot's first L1 entry is not cluster aligned.
fn snapshot_l1_entry_unaligned(dir: &Path) -> PathBuf {
    let (p, sn_l1) = with_snapshot(dir, "snapshot_l1_entry_unaligned.qcow2");
    let e = peek64(&p, sn_l1);
    poke(&p, sn_l1, &(e | 0x200).to_be_bytes());
    p
}

/// 060 "dirty corrupt image": unaligned refcount block, dirty bit set.
fn dirty_unaligned_refblock(dir: &Path) -> PathBuf {
    let p = fresh(dir, "dirty_unaligned_refblock.qcow2");
    poke(&p, RT, &0xffff_2a00u64.to_be_bytes());
    poke(&p, 72, &1u64.to_be_bytes());
    p
}

/// An active L2 entry (COPIED) points far past the end of the file.
fn l2_entry_past_eof(dir: &Path) -> PathBuf {
    let (p, _) = with_snapshot(dir, "l2_entry_past_eof.qcow2");
    let l2 = peek64(&p, L1) & 0x00ff_ffff_ffff_fe00;
    poke(&p, l2 + 8, &0x8000_0010_0000_0000u64.to_be_bytes());
    p
}

/// Runs a vmsnap write on `img`; asserts a clean refusal whose message contains `says`
/// and an unchanged file.
#[track_caller]
fn refused(img: &Path, args: &[&str], says: &str) -> Run {
    let before = sha256_file(img);
    let mut full: Vec<&str> = args.to_vec();
    full.push(s(img));
    let r = vmsnap(&full).fails_cleanly();
    assert!(r.stderr.contains(says), "expected '{says}': {r:#?}");
    assert!(r.stderr.contains("vmsnap check"), "no advice: {r:#?}");
    assert_eq!(
        before,
        sha256_file(img),
        "refused {args:?} changed the file"
    );
    r
}

/// A copy of `img` for QEMU to work on.
fn copy(img: &Path, tag: &str) -> PathBuf {
    let c = img.with_extension(format!("{tag}.qcow2"));
    std::fs::copy(img, &c).unwrap();
    c
}

/// What QEMU did with the same operation on a copy: refused naming `says`, or went ahead
/// (changing the file) and left an image `qemu-img check` still reports (exit 2).
#[derive(Debug)]
enum Qemu {
    Refuses(&'static str),
    MakesItWorse,
}

#[track_caller]
fn qemu_does(img: &Path, r: Run, expect: Qemu) {
    match expect {
        Qemu::Refuses(says) => {
            assert_ne!(r.code, Some(0), "QEMU accepted: {r:#?}");
            assert!(
                r.stderr.contains(says) || r.stdout.contains(says),
                "QEMU: expected '{says}': {r:#?}"
            );
        }
        Qemu::MakesItWorse => {
            let c = qemu_img(&["check", s(img)]);
            assert_eq!(c.code, Some(2), "qemu-img check after QEMU's write: {c:#?}");
        }
    }
}

fn qemu_write(img: &Path, all: bool) -> Run {
    let c = copy(img, "qemu");
    let open = if all {
        format!("open -o overlap-check=all {}", s(&c))
    } else {
        format!("open {}", s(&c))
    };
    // qemu-io reports a failed write on stdout, the reason on stderr, and exits 1.
    common::run("qemu-io", &["-c", &open, "-c", "write -P 0x2a 0 512"])
}

fn qemu_snapshot(img: &Path, op: &str, name: &str) -> (PathBuf, Run) {
    let c = copy(img, &format!("qemu{op}"));
    let before = sha256_file(&c);
    let r = qemu_img(&["snapshot", op, name, s(&c)]);
    let after = sha256_file(&c);
    eprintln!(
        "qemu-img snapshot {op} {name}: exit {:?}, file {}",
        r.code,
        if before == after {
            "unchanged"
        } else {
            "changed"
        }
    );
    (c, r)
}

fn setup(test: &str) -> Option<tempfile::TempDir> {
    if !require(test, &["qemu-img", "qemu-io"]) {
        return None;
    }
    Some(tempfile::tempdir().unwrap())
}

#[test]
fn l2_table_on_the_l1_table_is_refused_like_qemu() {
    let Some(dir) = setup("l2_table_on_the_l1_table") else {
        return;
    };
    let img = l2_into_l1(dir.path());
    refused(
        &img,
        &["io", "-c", "write -P 0x2a 0 512"],
        "Preventing invalid write on metadata (overlaps with active L1 table)",
    );
    refused(
        &img,
        &["snapshot", "-c", "new"],
        "overlaps the active L1 table",
    );
    // The refusal did not set the corrupt bit: the image opens read-write again and still
    // refuses (QEMU sets the bit instead; see formats/qcow2.md).
    refused(
        &img,
        &["io", "-c", "write -P 0x2a 0 512"],
        "overlaps with active L1 table",
    );
    let r = qemu_write(&img, false);
    qemu_does(
        &img,
        r,
        Qemu::Refuses("Preventing invalid write on metadata (overlaps with active L1 table)"),
    );
    let (_, r) = qemu_snapshot(&img, "-c", "new");
    qemu_does(&img, r, Qemu::Refuses("active L1 table"));
}

#[test]
fn data_cluster_on_a_refcount_block_is_refused() {
    let Some(dir) = setup("data_cluster_on_a_refcount_block") else {
        return;
    };
    let img = data_into_refblock(dir.path());
    refused(
        &img,
        &["io", "-c", "write -P 0x2a 0 512"],
        "Preventing invalid write on metadata (overlaps with refcount block)",
    );
    refused(
        &img,
        &["snapshot", "-c", "new"],
        "data cluster at 0x20000 overlaps the refcount block",
    );
    let r = qemu_write(&img, false);
    qemu_does(&img, r, Qemu::Refuses("overlaps with refcount block"));
    // qemu-img snapshot -c goes ahead and counts the refcount block as shared data.
    let (c, r) = qemu_snapshot(&img, "-c", "new");
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_ne!(sha256_file(&c), sha256_file(&img));
    qemu_does(&c, r, Qemu::MakesItWorse);
}

#[test]
fn data_cluster_on_an_inactive_l2_table_is_refused() {
    let Some(dir) = setup("data_cluster_on_an_inactive_l2_table") else {
        return;
    };
    let img = data_into_inactive_l2(dir.path());
    refused(
        &img,
        &["io", "-c", "write -P 3 0 512"],
        "Preventing invalid write on metadata (overlaps with inactive L2 table)",
    );
    refused(
        &img,
        &["snapshot", "-c", "new"],
        "overlaps the inactive L2 table",
    );
    refused(
        &img,
        &["snapshot", "-a", "foo"],
        "overlaps the inactive L2 table",
    );
    refused(
        &img,
        &["snapshot", "-d", "foo"],
        "the cluster at host offset 0x40000 has refcount 1 but 2 references",
    );
    // QEMU checks inactive L2 tables only with overlap-check=all; by default it writes.
    let r = qemu_write(&img, true);
    qemu_does(&img, r, Qemu::Refuses("overlaps with inactive L2 table"));
    let c = copy(&img, "cached");
    qio(&c, "write -P 3 0 512");
    assert_ne!(sha256_file(&c), sha256_file(&img));
}

#[test]
fn empty_refcount_table_is_refused_before_any_write() {
    let Some(dir) = setup("empty_refcount_table") else {
        return;
    };
    let img = empty_reftable(dir.path());
    refused(
        &img,
        &["io", "-c", "write 0 64k"],
        "Preventing invalid write on metadata (overlaps with qcow2_header)",
    );
    refused(
        &img,
        &["snapshot", "-c", "new"],
        "overlaps with qcow2_header",
    );
    let c = copy(&img, "qemu");
    let r = qemu_io("qcow2", &c, &["write 0 64k".into()]);
    qemu_does(
        &img,
        r,
        Qemu::Refuses("Preventing invalid write on metadata"),
    );
}

#[test]
fn shared_cluster_with_refcount_one_is_never_freed() {
    let Some(dir) = setup("shared_cluster_with_refcount_one") else {
        return;
    };
    let img = shared_refcount_one(dir.path());
    let says = "refcount 1 but 2 references";
    refused(&img, &["snapshot", "-d", "s1"], says);
    refused(&img, &["snapshot", "-a", "s1"], says);
    refused(&img, &["snapshot", "-c", "s2"], says);
    // qemu-img deletes the snapshot and leaves the live data cluster at refcount 0.
    let (c, r) = qemu_snapshot(&img, "-d", "s1");
    assert_eq!(r.code, Some(0), "{r:#?}");
    let chk = qemu_img(&["check", s(&c)]);
    assert!(chk.stderr.contains("refcount=0 reference=1"), "{chk:#?}");
    qemu_does(&c, r, Qemu::MakesItWorse);
    // Repaired, the same delete goes through and leaves a clean image.
    let fixed = copy(&img, "fixed");
    vmsnap(&["check", "-r", "all", s(&fixed)]);
    vmsnap(&["snapshot", "-d", "s1", s(&fixed)]).ok();
    qemu_img(&["check", s(&fixed)]).ok();
    qemu_io("qcow2", &fixed, &["read -P 0x11 0 64k".into()]).ok();
}

#[test]
fn damaged_snapshot_l1_entry_refuses_delete_unchanged() {
    let Some(dir) = setup("damaged_snapshot_l1_entry") else {
        return;
    };
    let img = snapshot_l1_entry_past_eof(dir.path());
    refused(
        &img,
        &["snapshot", "-d", "s1"],
        "entry 0 of the snapshot's L1 table: L2 table at 0x1000000000 lies beyond the end",
    );
    let (c, r) = qemu_snapshot(&img, "-d", "s1");
    assert_ne!(r.code, Some(0), "{r:#?}");
    // QEMU refuses too, but only after it has rewritten the snapshot table.
    assert_ne!(sha256_file(&c), sha256_file(&img));

    let img = snapshot_l1_entry_unaligned(dir.path());
    refused(&img, &["snapshot", "-d", "s1"], "is not cluster aligned");
    refused(&img, &["snapshot", "-a", "s1"], "is not cluster aligned");
}

#[test]
fn dirty_image_with_unaligned_refcount_block_refuses_create_unchanged() {
    let Some(dir) = setup("dirty_unaligned_refcount_block") else {
        return;
    };
    let img = dirty_unaligned_refblock(dir.path());
    refused(
        &img,
        &["snapshot", "-c", "x"],
        "refcount block 0 offset 0xffff2a00 is not cluster aligned",
    );
    let (c, r) = qemu_snapshot(&img, "-c", "x");
    assert_ne!(r.code, Some(0), "{r:#?}");
    assert_ne!(
        sha256_file(&c),
        sha256_file(&img),
        "QEMU's failed repair writes"
    );
}

#[test]
fn l2_entry_past_the_end_of_the_file_refuses_create_unchanged() {
    let Some(dir) = setup("l2_entry_past_eof") else {
        return;
    };
    let img = l2_entry_past_eof(dir.path());
    refused(
        &img,
        &["snapshot", "-c", "x"],
        "data cluster at 0x1000000000 lies beyond the end of the file",
    );
    let (c, r) = qemu_snapshot(&img, "-c", "x");
    assert_ne!(r.code, Some(0), "{r:#?}");
    assert_ne!(
        sha256_file(&c),
        sha256_file(&img),
        "QEMU's failed create writes"
    );
}

#[test]
fn undamaged_images_still_take_every_write() {
    let Some(dir) = setup("undamaged_images") else {
        return;
    };
    let (img, _) = with_snapshot(dir.path(), "clean.qcow2");
    vmsnap(&["io", s(&img), "-c", "write -P 0x33 64k 64k"]).ok();
    vmsnap(&["snapshot", "-c", "s2", s(&img)]).ok();
    vmsnap(&["io", s(&img), "-c", "write -P 0x44 0 1M"]).ok();
    vmsnap(&["snapshot", "-a", "s1", s(&img)]).ok();
    vmsnap(&["snapshot", "-d", "s2", s(&img)]).ok();
    vmsnap(&["snapshot", "-d", "s1", s(&img)]).ok();
    qemu_img(&["check", s(&img)]).ok();
    qemu_io("qcow2", &img, &["read -P 0x11 0 128k".into()]).ok();
}
