//! `vmsnap convert` against QEMU 7.2's own tools on the QEMU-made fixtures: every snapshot
//! `qemu-img snapshot -l` lists on the source is listed identically on the output, every
//! layer converts (`qemu-img convert -l snapshot.name=TAG`) to the same raw bytes, VM states
//! export to the same bytes, `qemu-img check` is clean, sharing keeps the output about as
//! large as the source, and QEMU's `-loadvm` of a converted snapshot restores guest RAM.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::qemu::{assert_pattern, Qemu, RAM};
use common::*;

/// Fixtures with internal snapshots, and the options that store them like for like (their
/// cluster size; compressed clusters stay compressed).
const FIXTURES: &[(&str, &[&str])] = &[
    ("snap-basic.qcow2.gz", &[]),
    ("compat-0.10.qcow2.gz", &["-o", "compat=0.10"]),
    ("cluster-512.qcow2", &["-o", "cluster_size=512"]),
    ("cluster-2M.qcow2.gz", &["-o", "cluster_size=2M"]),
    ("refcount-bits-1.qcow2.gz", &["-o", "refcount_bits=1"]),
    ("refcount-bits-64.qcow2.gz", &["-o", "refcount_bits=64"]),
    ("compressed.qcow2.gz", &["-c"]),
];

fn have_tools(test: &str) -> bool {
    require(test, &["qemu-img"])
}

/// Host bytes allocated to a file.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// `qemu-img snapshot -l` without its header line (ids, names, VM sizes, dates, clocks,
/// icount: everything it shows).
fn snapshot_list(img: &Path) -> String {
    let out = qemu_img(&["snapshot", "-U", "-l", s(img)]).ok().stdout;
    out.lines().skip(1).collect::<Vec<_>>().join("\n")
}

/// Names of snapshots with VM state (VM SIZE column not "0 B").
fn with_vm_state(img: &Path) -> Vec<String> {
    let out = qemu_img(&["snapshot", "-U", "-l", s(img)]).ok().stdout;
    out.lines()
        .skip(2)
        .filter(|l| !l.contains(" 0 B "))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// Everything the issue asks of a converted image, against the source.
fn assert_same_tree(src: &Path, out: &Path, tmp: &Path, what: &str) {
    let list = snapshot_list(src);
    assert!(!qemu_snapshot_ids(src).is_empty(), "{what}: no snapshots");
    assert_eq!(list, snapshot_list(out), "{what}: snapshot lists differ");
    let check = qemu_img(&["check", s(out)]);
    assert_eq!(check.code, Some(0), "{what}: qemu-img check: {check:#?}");
    assert!(check.stdout.contains("No errors were found"), "{what}");
    for (_, name) in qemu_snapshot_ids(src) {
        assert!(
            qemu_layer(src, Some(&name), tmp) == qemu_layer(out, Some(&name), tmp),
            "{what}: snapshot '{name}' reads differently"
        );
    }
    assert!(
        qemu_layer(src, None, tmp) == qemu_layer(out, None, tmp),
        "{what}: active layer reads differently"
    );
    for name in with_vm_state(src) {
        let (a, b) = (tmp.join("a.mig"), tmp.join("b.mig"));
        vmsnap(&["vmstate", "export", "-o", s(&a), s(src), &name]).ok();
        vmsnap(&["vmstate", "export", "-o", s(&b), s(out), &name]).ok();
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert!(
            a.len() > 1 << 20 && a == b,
            "{what}: VM state of '{name}' differs"
        );
    }
}

fn convert(src: &Path, out: &Path, opts: &[&str]) -> Run {
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend(opts);
    args.extend([s(src), s(out)]);
    vmsnap(&args).ok()
}

#[test]
fn convert_keeps_every_snapshot_of_every_fixture() {
    if !have_tools("convert_keeps_every_snapshot_of_every_fixture") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for &(fixture, opts) in FIXTURES {
        let src = fixture_copy(fixture, dir.path());
        let out = dir.path().join("out.qcow2");
        let r = convert(&src, &out, opts);
        let n = qemu_snapshot_ids(&src).len();
        assert!(
            r.stderr
                .contains(&format!("keeping all {n} internal snapshots")),
            "{fixture}: {}",
            r.stderr
        );
        assert_same_tree(&src, &out, dir.path(), fixture);
        let (a, b) = (allocated(&src), allocated(&out));
        assert!(
            b * 10 <= a * 11,
            "{fixture}: output allocates {b} bytes, source {a}"
        );
        std::fs::remove_file(&src).unwrap();
    }
    // `-t unsafe` (qemu-img's default cache mode for convert) skips the syncs, not the copy.
    let src = fixture_copy("snap-basic.qcow2.gz", dir.path());
    let out = dir.path().join("unsafe.qcow2");
    convert(&src, &out, &["-t", "unsafe"]);
    assert_same_tree(&src, &out, dir.path(), "snap-basic -t unsafe");
}

#[test]
fn cluster_size_compat_refcount_and_compression_changes_keep_the_tree() {
    let test = "cluster_size_compat_refcount_and_compression_changes_keep_the_tree";
    if !have_tools(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let variants: &[&[&str]] = &[
        &["-o", "cluster_size=2M,compat=0.10"],
        &["-o", "cluster_size=512,refcount_bits=2"],
        &["-o", "cluster_size=32k,extended_l2=on"],
        &["-c"],
        &["-c", "-o", "compression_type=zstd,refcount_bits=64"],
    ];
    for fixture in [
        "snap-basic.qcow2.gz",
        "compressed.qcow2.gz",
        "cluster-512.qcow2",
    ] {
        let src = fixture_copy(fixture, dir.path());
        for v in variants {
            let out = dir.path().join("out.qcow2");
            convert(&src, &out, v);
            let what = format!("{fixture} {v:?}");
            assert_same_tree(&src, &out, dir.path(), &what);
            let info = qemu_img(&["info", "--output=json", s(&out)]).ok().stdout;
            if v.contains(&"-c") && fixture != "cluster-512.qcow2" {
                // Compressed clusters were written, and sharing still holds (the snapshots'
                // data is not stored once per layer).
                let map = qemu_img(&["check", s(&out)]).ok().stdout;
                assert!(!map.contains(" 0.00% compressed"), "{what}: {map}");
                assert!(allocated(&out) * 10 <= allocated(&src) * 11, "{what}");
            }
            if v.iter().any(|a| a.contains("compat=0.10")) {
                assert!(info.contains("\"compat\": \"0.10\""), "{what}: {info}");
            }
            if v.iter().any(|a| a.contains("zstd")) {
                assert!(info.contains("\"compression-type\": \"zstd\""), "{what}");
            }
        }
        std::fs::remove_file(&src).unwrap();
    }
}

#[test]
fn active_only_and_l_give_qemu_img_convert_results() {
    if !have_tools("active_only_and_l_give_qemu_img_convert_results") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_copy("snap-basic.qcow2.gz", dir.path());
    let out = dir.path().join("out.qcow2");
    let r = convert(&src, &out, &["--active-only"]);
    assert!(!r.stderr.contains("keeping"), "{}", r.stderr);
    assert!(qemu_snapshot_ids(&out).is_empty());
    qemu_img(&["check", s(&out)]).ok();
    assert!(qemu_layer(&src, None, dir.path()) == qemu_layer(&out, None, dir.path()));
    // -l: one snapshot as the active layer, in qcow2 and in raw (qemu-img's default -O).
    for l in ["snapshot.name=second", "snapshot.id=2", "second"] {
        convert(&src, &out, &["-l", l]);
        assert!(qemu_snapshot_ids(&out).is_empty());
        assert!(
            qemu_layer(&src, Some("second"), dir.path()) == qemu_layer(&out, None, dir.path()),
            "-l {l}"
        );
    }
    let raw = dir.path().join("out.raw");
    let r = vmsnap(&["convert", "-l", "snapshot.name=first", s(&src), s(&raw)]).ok();
    assert!(!r.stderr.contains("keeping"), "{}", r.stderr);
    assert!(std::fs::read(&raw).unwrap() == qemu_layer(&src, Some("first"), dir.path()));
    // Raw output of an image with snapshots says that they are not copied.
    let r = vmsnap(&["convert", s(&src), s(&raw)]).ok();
    assert!(r.stderr.contains("not copied"), "{}", r.stderr);
    assert!(std::fs::read(&raw).unwrap() == qemu_layer(&src, None, dir.path()));
    // -p prints qemu-img's progress line.
    let r = convert(&src, &out, &["-p"]);
    assert!(r.stdout.contains("(100.00/100%)"), "{}", r.stdout);
}

#[test]
fn bad_input_fails_cleanly_and_leaves_no_output() {
    if !have_tools("bad_input_fails_cleanly_and_leaves_no_output") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_copy("snap-basic.qcow2.gz", dir.path());
    let out = dir.path().join("out.qcow2");
    let listing = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing(dir.path());
    for (args, want) in [
        (
            vec!["-l", "snapshot.name=nope"],
            "Can't find snapshot 'nope'",
        ),
        (vec!["-o", "cluster_size=3000"], "cluster_size"),
        (vec!["-o", "compat=0.10,refcount_bits=8"], "compat=1.1"),
        (vec!["-o", "bogus=1"], "Invalid parameter 'bogus=1'"),
        (vec!["-o", "refcount_bits=1"], "cannot count the"),
        (vec!["-t", "none"], "invalid value 'none'"),
    ] {
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend(args.iter());
        a.extend([s(&src), s(&out)]);
        let r = vmsnap(&a).fails_cleanly();
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert_eq!(listing(dir.path()), before, "{args:?} left files behind");
    }
    // A source that is not there, DST = SRC, compression to raw.
    vmsnap(&["convert", "-O", "qcow2", "/nonexistent.qcow2", s(&out)]).fails_cleanly();
    let r = vmsnap(&["convert", "-O", "qcow2", s(&src), s(&src)]).fails_cleanly();
    assert!(
        r.stderr.contains("both the source and the output"),
        "{}",
        r.stderr
    );
    vmsnap(&["convert", "-c", s(&src), s(&out)]).fails_cleanly();
    // A failed convert over an existing DST leaves the old DST as it was.
    std::fs::write(&out, b"old contents").unwrap();
    vmsnap(&["convert", "-O", "qcow2", "-l", "nope", s(&src), s(&out)]).fails_cleanly();
    assert_eq!(std::fs::read(&out).unwrap(), b"old contents");
    // A truncated source: a clean error, no output.
    let cut = dir.path().join("cut.qcow2");
    let data = std::fs::read(&src).unwrap();
    std::fs::write(&cut, &data[..data.len() / 3]).unwrap();
    let out2 = dir.path().join("out2.qcow2");
    vmsnap(&["convert", "-O", "qcow2", s(&cut), s(&out2)]).fails_cleanly();
    assert!(!out2.exists());
}

/// QEMU 7.2 `-loadvm first` of the converted snap-basic (made by QEMU under KVM) restores the
/// same guest RAM as `-loadvm first` of the original, and that RAM holds the fixture's pattern
/// where SeaBIOS left it alone.
#[test]
fn qemu_loadvm_of_a_converted_snapshot_restores_guest_ram() {
    let test = "qemu_loadvm_of_a_converted_snapshot_restores_guest_ram";
    if !require(test, &["qemu-img", "qemu-system-x86_64"]) || !kvm(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_copy("snap-basic.qcow2.gz", dir.path());
    let pattern = common::qemu::pattern();
    let pat = dir.path().join("pattern.bin");
    std::fs::write(&pat, &pattern).unwrap();
    let mut mems = Vec::new();
    for (name, opts) in [
        ("orig", None),
        ("conv", Some(vec!["-o", "cluster_size=2M,compat=0.10"])),
        ("conv-c", Some(vec!["-c"])),
    ] {
        let img = match &opts {
            None => src.clone(),
            Some(o) => {
                let out = dir.path().join(format!("{name}.qcow2"));
                convert(&src, &out, o);
                out
            }
        };
        let sock = dir.path().join(format!("{name}.sock"));
        let extra = ["-loadvm", "first", "-S"];
        let mut q = Qemu::start_accel("kvm", "pc-i440fx-7.2", &img, &pat, &sock, &extra);
        let status = q.status();
        assert!(status.contains("paused"), "{name}: {status}");
        let mem = q.pmemsave(&dir.path().join(format!("{name}.mem")));
        assert_eq!(mem.len(), RAM);
        q.quit();
        assert_pattern(&mem, &pattern, name);
        mems.push(mem);
    }
    assert!(
        mems[0] == mems[1],
        "RAM after -loadvm of the converted image differs"
    );
    assert!(
        mems[0] == mems[2],
        "RAM after -loadvm of the compressed copy differs"
    );
}

/// Images QEMU's tools make here, beyond the fixtures: extended L2 with subcluster writes, zero
/// and discarded subclusters and a compressed cluster; and an overlay on a backing file (the
/// output is flattened, as `qemu-img convert` flattens it).
#[test]
fn extended_l2_and_backing_file_sources() {
    if !require(
        "extended_l2_and_backing_file_sources",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (x, base, ov, out) = (p("x.qcow2"), p("base.qcow2"), p("ov.qcow2"), p("out.qcow2"));
    let io = |img: &Path, cmds: &[&str]| {
        qemu_io(
            "qcow2",
            img,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
        .ok();
    };
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        s(&x),
        "16M",
    ])
    .ok();
    io(
        &x,
        &[
            "write -P 0x11 0 8k",
            "write -P 0x12 100k 2k",
            "write -z 200k 64k",
        ],
    );
    qemu_img(&["snapshot", "-c", "a", s(&x)]).ok();
    io(
        &x,
        &[
            "write -P 0x21 4k 2k",
            "write -c -P 0x22 1M 64k",
            "discard 100k 2k",
        ],
    );
    qemu_img(&["snapshot", "-c", "b", s(&x)]).ok();
    io(&x, &["write -P 0x31 2M 6k"]);
    for v in [
        &[][..],
        &["-o", "extended_l2=on"],
        &["-o", "cluster_size=4k"],
        &["-c"],
    ] {
        convert(&x, &out, v);
        assert_same_tree(&x, &out, dir.path(), &format!("extended L2 {v:?}"));
        assert!(allocated(&out) * 10 <= allocated(&x) * 11, "{v:?}");
    }
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]).ok();
    io(&base, &["write -P 0x55 0 4M"]);
    let b = format!("backing_file={},backing_fmt=qcow2", s(&base));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &b, s(&ov)]).ok();
    io(&ov, &["write -P 0x66 1M 64k"]);
    qemu_img(&["snapshot", "-c", "s", s(&ov)]).ok();
    io(&ov, &["write -P 0x77 2M 64k"]);
    convert(&ov, &out, &[]);
    assert_same_tree(&ov, &out, dir.path(), "overlay");
    let info = qemu_img(&["info", s(&out)]).ok().stdout;
    assert!(!info.contains("backing file"), "{info}");
}
