//! Crafted broken qcow2 images: each gives a clear error and a non-zero exit, never a panic,
//! never an allocation the file size does not justify (the CLI runs under `ulimit -v`), and
//! leaves the file's bytes unchanged.
//!
//! Every case starts from the same valid image, made by QEMU:
//! `qemu-img create -f qcow2 base 16M` (64 KiB clusters, version 3, 16-bit refcounts), then
//! `qemu-io -c 'write -P 0x11 0 128k'`, `qemu-img snapshot -c s1`, `qemu-io -c 'write -P 0x22 0
//! 64k'`. Offsets are read from its header rather than assumed. Header fields (big endian):
//!
//! ```text
//!  0 magic u32        4 version u32          8 backing_file_offset u64  16 backing_file_size u32
//! 20 cluster_bits u32 24 size u64           32 crypt_method u32         36 l1_size u32
//! 40 l1_table_offset  48 refcount_table_offset u64                      56 refcount_table_clusters u32
//! 60 nb_snapshots u32 64 snapshots_offset u64 72 incompatible_features  80 compatible_features
//! 88 autoclear        96 refcount_order u32 100 header_length u32      then header extensions
//! snapshot entry: +0 l1_table_offset u64, +8 l1_size u32, +12 id_str_size u16,
//!                 +14 name_size u16, +36 extra_data_size u32, +40 extra data, id, name
//! ```

mod common;

use std::path::Path;

use common::{qemu_img, qemu_io, require, s, vmsnap_limited, Run};
use vmsnap::block::qcow2::Qcow2;
use vmsnap::block::OpenOptions;

/// Address-space limit for the CLI runs (KiB): far more than a 1 MiB image justifies.
const LIMIT_KIB: u64 = 512 * 1024;

/// What a case must fail at, at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Opening fails read-only and read-write; every subcommand fails.
    Open,
    /// Opening read-write fails (the CLI's writing commands fail); read-only may work.
    RwOpen,
    /// Opening may work; `check` reports the damage (non-zero exit).
    Check,
    /// Opening may work; `check` fails and reading guest offset 0 fails.
    CheckAndRead,
    /// Damage QEMU opens (`qcow2_read_snapshots` reads lazily): `info` and `snapshot -l`
    /// succeed exactly when qemu-img's do, `check` exits as `qemu-img check` does.
    LikeQemu,
}

/// Facts about the base image needed to aim the patches.
struct Base {
    data: Vec<u8>,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    snapshots_offset: u64,
    header_length: u64,
}

fn be64(d: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_be_bytes(d[o..o + 8].try_into().unwrap())
}
fn be32(d: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_be_bytes(d[o..o + 4].try_into().unwrap())
}
fn put64(d: &mut [u8], off: u64, v: u64) {
    d[off as usize..off as usize + 8].copy_from_slice(&v.to_be_bytes());
}
fn put32(d: &mut [u8], off: u64, v: u32) {
    d[off as usize..off as usize + 4].copy_from_slice(&v.to_be_bytes());
}
fn put16(d: &mut [u8], off: u64, v: u16) {
    d[off as usize..off as usize + 2].copy_from_slice(&v.to_be_bytes());
}

fn make_base(dir: &Path) -> Base {
    let p = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]).ok();
    qemu_io("qcow2", &p, &["write -P 0x11 0 128k".into()]).ok();
    qemu_img(&["snapshot", "-c", "s1", s(&p)]).ok();
    qemu_io("qcow2", &p, &["write -P 0x22 0 64k".into()]).ok();
    let data = std::fs::read(&p).unwrap();
    Base {
        l1_table_offset: be64(&data, 40),
        refcount_table_offset: be64(&data, 48),
        snapshots_offset: be64(&data, 64),
        header_length: u64::from(be32(&data, 100)),
        data,
    }
}

/// Moves the snapshot table (one entry) to the very end of the file, so that fields reaching
/// past the entry reach past EOF. Returns the new entry offset.
fn table_at_eof(d: &mut Vec<u8>, b: &Base) -> u64 {
    let so = b.snapshots_offset as usize;
    let extra = be32(d, b.snapshots_offset + 36) as usize;
    let id = u16::from_be_bytes([d[so + 12], d[so + 13]]) as usize;
    let name = u16::from_be_bytes([d[so + 14], d[so + 15]]) as usize;
    let len = (40 + extra + id + name).next_multiple_of(8);
    let entry = d[so..so + len].to_vec();
    let at = d.len() as u64;
    d.extend_from_slice(&entry);
    put64(d, 64, at);
    at
}

type Patch = fn(&mut Vec<u8>, &Base);

/// The cases: name, what must fail, and the patch (offsets documented inline).
fn cases() -> Vec<(&'static str, Expect, Patch)> {
    vec![
        ("truncated header (50 bytes)", Expect::Open, |d, _| {
            d.truncate(50)
        }),
        (
            "truncated before the refcount block",
            Expect::LikeQemu,
            |d, b| d.truncate(b.refcount_table_offset as usize + 100),
        ),
        ("bad magic", Expect::Open, |d, _| put32(d, 0, 0x5146_49fa)),
        ("version 1", Expect::Open, |d, _| put32(d, 4, 1)),
        ("version 4", Expect::Open, |d, _| put32(d, 4, 4)),
        (
            "unknown incompatible feature bit 20",
            Expect::Open,
            |d, _| put64(d, 72, 1 << 20),
        ),
        ("cluster_bits 30", Expect::Open, |d, _| put32(d, 20, 30)),
        ("cluster_bits 8", Expect::Open, |d, _| put32(d, 20, 8)),
        ("backing_file_size 2000", Expect::Open, |d, _| {
            put64(d, 8, 0x200);
            put32(d, 16, 2000)
        }),
        ("backing_file_offset beyond EOF", Expect::Open, |d, _| {
            put64(d, 8, 0x7fff_0000);
            put32(d, 16, 100)
        }),
        ("virtual size 2^62", Expect::Open, |d, _| {
            put64(d, 24, 1 << 62)
        }),
        (
            "L1 table too small for the size (1 TiB)",
            Expect::Open,
            |d, _| put64(d, 24, 1 << 40),
        ),
        ("l1_size 0x8000000 (1 GiB of L1)", Expect::Open, |d, _| {
            put32(d, 36, 0x0800_0000)
        }),
        ("L1 table beyond EOF", Expect::LikeQemu, |d, _| {
            put64(d, 40, 0x7fff_0000_0000)
        }),
        ("L1 table offset unaligned", Expect::Open, |d, b| {
            put64(d, 40, b.l1_table_offset + 8)
        }),
        ("refcount table beyond EOF", Expect::LikeQemu, |d, _| {
            put64(d, 48, 0x7fff_0000_0000)
        }),
        ("refcount table offset unaligned", Expect::Open, |d, b| {
            put64(d, 48, b.refcount_table_offset + 8)
        }),
        ("refcount_table_clusters 0xffffff", Expect::Open, |d, _| {
            put32(d, 56, 0x00ff_ffff)
        }),
        ("refcount_order 7", Expect::Open, |d, _| put32(d, 96, 7)),
        ("nb_snapshots 0xffffffff", Expect::Open, |d, _| {
            put32(d, 60, 0xffff_ffff)
        }),
        (
            "nb_snapshots 60000 (table past EOF)",
            Expect::LikeQemu,
            |d, _| put32(d, 60, 60000),
        ),
        ("snapshot table beyond EOF", Expect::LikeQemu, |d, _| {
            put64(d, 64, 0x7fff_0000_0000)
        }),
        ("snapshot table offset unaligned", Expect::Open, |d, b| {
            put64(d, 64, b.snapshots_offset + 4)
        }),
        (
            "snapshot extra_data_size 2000 (> 1024)",
            Expect::Open,
            |d, b| put32(d, b.snapshots_offset + 36, 2000),
        ),
        (
            "snapshot id_str_size past the table (at EOF)",
            Expect::LikeQemu,
            |d, b| {
                let at = table_at_eof(d, b);
                put16(d, at + 12, 0xffff)
            },
        ),
        (
            "snapshot name_size past the table (at EOF)",
            Expect::LikeQemu,
            |d, b| {
                let at = table_at_eof(d, b);
                put16(d, at + 14, 0xffff)
            },
        ),
        (
            "nb_snapshots 2 with one entry at EOF",
            Expect::LikeQemu,
            |d, b| {
                table_at_eof(d, b);
                put32(d, 60, 2)
            },
        ),
        ("header_length 50 (< 104 for v3)", Expect::Open, |d, _| {
            put32(d, 100, 50)
        }),
        (
            "header extension length past the cluster",
            Expect::Open,
            |d, b| put32(d, b.header_length + 4, 0xffff_ff00),
        ),
        ("corrupt bit set", Expect::RwOpen, |d, _| {
            put64(d, 72, 1 << 1)
        }),
        (
            "external data file bit without the extension",
            Expect::RwOpen,
            |d, _| put64(d, 72, 1 << 2),
        ),
        (
            "snapshot table overlapping the refcount table",
            Expect::Check,
            |d, b| put64(d, 64, b.refcount_table_offset),
        ),
        (
            "snapshot table overlapping the active L1 table",
            Expect::Check,
            |d, b| put64(d, 64, b.l1_table_offset),
        ),
        (
            "refcount block loop (reftable[0] -> reftable)",
            Expect::Check,
            |d, b| put64(d, b.refcount_table_offset, b.refcount_table_offset),
        ),
        ("refcount block beyond EOF", Expect::Check, |d, b| {
            put64(d, b.refcount_table_offset, 0x7fff_0000_0000)
        }),
        // Storage reads past EOF as zeroes (as QEMU's file driver does), so only check must
        // notice this one; an unaligned L2 offset is caught on the read path too.
        ("L2 table beyond EOF", Expect::Check, |d, b| {
            put64(d, b.l1_table_offset, (1 << 63) | 0x7fff_0000_0000)
        }),
        ("L2 table offset unaligned", Expect::CheckAndRead, |d, b| {
            let l2 = be64(d, b.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
            // 0x200: bit 9 is the lowest offset bit of an L1 entry (bits 0-8 are reserved).
            put64(d, b.l1_table_offset, (1 << 63) | (l2 + 0x200))
        }),
    ]
}

fn cli(img: &Path) -> Vec<(&'static str, Run)> {
    let p = s(img);
    vec![
        (
            "info",
            vmsnap_limited(LIMIT_KIB, &["info", "-f", "qcow2", p]),
        ),
        (
            "check",
            vmsnap_limited(LIMIT_KIB, &["check", "-f", "qcow2", p]),
        ),
        (
            "check json",
            vmsnap_limited(LIMIT_KIB, &["check", "-f", "qcow2", "--output", "json", p]),
        ),
        (
            "snapshot -l",
            vmsnap_limited(LIMIT_KIB, &["snapshot", "-f", "qcow2", "-l", p]),
        ),
        (
            "io read",
            vmsnap_limited(LIMIT_KIB, &["io", "-f", "qcow2", p, "-c", "read 0 4k"]),
        ),
    ]
}

fn no_crash(case: &str, what: &str, r: &Run) {
    assert!(
        matches!(r.code, Some(c) if c != 101),
        "{case}: `{what}` crashed (panic, abort or signal): {r:#?}"
    );
    assert!(
        !r.stderr.contains("panicked"),
        "{case}: `{what}` panicked: {r:#?}"
    );
    assert!(
        !r.stderr.contains("memory allocation"),
        "{case}: `{what}` tried a huge allocation: {r:#?}"
    );
}

/// `info` and `snapshot -l` succeed when qemu-img's do; `check` exits as qemu-img's.
fn like_qemu(name: &str, img: &Path, runs: &[(&'static str, Run)]) {
    let code = |what: &str| {
        runs.iter()
            .find(|(w, _)| *w == what)
            .and_then(|(_, r)| r.code)
    };
    let q_list = qemu_img(&["snapshot", "-U", "-l", s(img)]);
    let q_info = qemu_img(&["info", "-U", "-f", "qcow2", s(img)]);
    let q_check = qemu_img(&["check", "-U", "-f", "qcow2", s(img)]);
    assert_eq!(
        code("snapshot -l") == Some(0),
        q_list.code == Some(0),
        "{name}: snapshot -l differs from qemu-img's: {runs:#?} {q_list:#?}"
    );
    assert_eq!(
        code("info") == Some(0),
        q_info.code == Some(0),
        "{name}: info differs from qemu-img's: {runs:#?} {q_info:#?}"
    );
    assert_eq!(
        code("check"),
        q_check.code,
        "{name}: check exit differs from qemu-img's: {runs:#?} {q_check:#?}"
    );
}

fn run_case(dir: &Path, base: &Base, idx: usize, name: &str, expect: Expect, patch: Patch) {
    let img = dir.join(format!("case{idx}.qcow2"));
    let mut data = base.data.clone();
    patch(&mut data, base);
    std::fs::write(&img, &data).unwrap();
    let before = common::sha256(&data);

    let runs = cli(&img);
    for (what, r) in &runs {
        no_crash(name, what, r);
        let must_fail = match expect {
            Expect::Open => true,
            Expect::RwOpen => false,
            Expect::Check => what.starts_with("check"),
            Expect::CheckAndRead => what.starts_with("check") || *what == "io read",
            Expect::LikeQemu => false,
        };
        if must_fail {
            assert_ne!(
                r.code,
                Some(0),
                "{name}: `{what}` accepted the image: {r:#?}"
            );
            let msg = r.stderr.trim();
            assert!(!msg.is_empty(), "{name}: `{what}` failed without a message");
        }
    }
    if expect == Expect::LikeQemu {
        like_qemu(name, &img, &runs);
    }
    let write = vmsnap_limited(
        LIMIT_KIB,
        &["io", "-f", "qcow2", s(&img), "-c", "write -P 0x33 0 4k"],
    );
    no_crash(name, "io write", &write);
    let snap = vmsnap_limited(LIMIT_KIB, &["snapshot", "-f", "qcow2", "-c", "x", s(&img)]);
    no_crash(name, "snapshot -c", &snap);
    if matches!(expect, Expect::Open | Expect::RwOpen) {
        assert_ne!(write.code, Some(0), "{name}: io write accepted: {write:#?}");
        assert_ne!(
            snap.code,
            Some(0),
            "{name}: snapshot -c accepted: {snap:#?}"
        );
    }
    // The writing commands may legitimately succeed on the Check cases; undo their effect on
    // the comparison by restoring the bytes before the library opens.
    if !matches!(expect, Expect::Open | Expect::RwOpen) {
        std::fs::write(&img, &data).unwrap();
    } else {
        assert_eq!(
            common::file_hash(&img),
            before,
            "{name}: the CLI changed the file"
        );
    }

    // The library, in-process: read-only and read-write opens.
    let ro = OpenOptions {
        read_only: true,
        format: None,
        force_share: false,
    };
    let rw = OpenOptions {
        read_only: false,
        ..ro
    };
    let ro_result = Qcow2::open(&img, ro);
    let rw_result = Qcow2::open(&img, rw);
    match expect {
        Expect::Open => {
            let e = ro_result.as_ref().err().map(|e| e.to_string());
            assert!(e.is_some(), "{name}: read-only open accepted");
            assert!(rw_result.is_err(), "{name}: read-write open accepted");
            eprintln!("{name}: {}", e.unwrap_or_default());
        }
        Expect::RwOpen => assert!(rw_result.is_err(), "{name}: read-write open accepted"),
        Expect::Check | Expect::CheckAndRead | Expect::LikeQemu => {}
    }
    drop(ro_result);
    drop(rw_result);
    if matches!(expect, Expect::Open | Expect::RwOpen) {
        assert_eq!(
            common::file_hash(&img),
            before,
            "{name}: opening changed the file"
        );
    }
    // For reference only: what QEMU says about the same bytes.
    let q = qemu_img(&["info", "-f", "qcow2", s(&img)]);
    eprintln!("{name}: qemu-img info exit {:?}", q.code);
}

#[test]
fn broken_images_fail_cleanly() {
    if !require("broken_images_fail_cleanly", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path());
    assert_eq!(be32(&base.data, 60), 1, "base image must have one snapshot");
    // The base image itself is fine for both tools.
    qemu_img(&["check", s(&dir.path().join("base.qcow2"))]).ok();
    let all = cases();
    assert!(all.len() >= 20);
    for (i, (name, expect, patch)) in all.into_iter().enumerate() {
        run_case(dir.path(), &base, i, name, expect, patch);
    }
}
