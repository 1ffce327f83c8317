//! Unit tests of the qcow2 driver on in-memory storage, and smoke tests against qemu-img.

use super::*;
use crate::block::MemStorage;

fn mem_image(opts: &CreateOptions) -> (MemStorage, Qcow2) {
    let mem = MemStorage::new();
    Qcow2::create_on(Box::new(mem.clone()), opts).unwrap();
    let img = Qcow2::open_storage(Box::new(mem.clone()), false).unwrap();
    (mem, img)
}

fn params(name: &str) -> SnapshotParams {
    SnapshotParams {
        name: name.into(),
        ..Default::default()
    }
}

fn read(img: &mut Qcow2, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(off, &mut b).unwrap();
    b
}

fn assert_clean(img: &mut Qcow2) {
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{:#?}",
        &r.messages[..r.messages.len().min(8)]
    );
}

fn all_opts() -> Vec<CreateOptions> {
    let mut v = Vec::new();
    for (cs, rb, compat, ext) in [
        (65536, 16, Compat::V3, false),
        (512, 16, Compat::V3, false),
        (512, 64, Compat::V3, false),
        (2 << 20, 16, Compat::V3, false),
        (65536, 16, Compat::V2, false),
        (65536, 4, Compat::V3, false),
        (65536, 8, Compat::V3, true),
        (16384, 32, Compat::V3, true),
    ] {
        v.push(CreateOptions {
            size: 16 << 20,
            cluster_size: cs,
            refcount_bits: rb,
            compat,
            extended_l2: ext,
            ..Default::default()
        });
    }
    v
}

#[test]
fn write_snapshot_goto_delete_all_geometries() {
    for o in all_opts() {
        let (_mem, mut img) = mem_image(&o);
        assert_clean(&mut img);
        img.write_at(0, &[0x11; 70000]).unwrap();
        img.write_at(5 << 20, &[0x12; 4096]).unwrap();
        assert_clean(&mut img);
        img.snapshot_create(&params("a")).unwrap();
        assert_clean(&mut img);
        img.write_at(100, &[0x22; 1000]).unwrap();
        img.write_zeroes(5 << 20, 4096).unwrap();
        img.discard(0, 16 << 20).unwrap();
        assert_clean(&mut img);
        img.write_at(3 << 20, &[0x33; 200_000]).unwrap();
        img.snapshot_create(&params("b")).unwrap();
        assert_clean(&mut img);
        img.snapshot_goto("a").unwrap();
        assert_clean(&mut img);
        assert_eq!(read(&mut img, 0, 70000), vec![0x11; 70000], "{o:?}");
        assert_eq!(read(&mut img, 5 << 20, 4096), vec![0x12; 4096]);
        assert_eq!(read(&mut img, 3 << 20, 10), vec![0; 10]);
        img.snapshot_delete("a").unwrap();
        assert_clean(&mut img);
        img.snapshot_goto("b").unwrap();
        assert_eq!(read(&mut img, 3 << 20, 200_000), vec![0x33; 200_000]);
        assert_eq!(read(&mut img, 0, 100), vec![0; 100]);
        img.snapshot_delete("2").unwrap();
        assert_clean(&mut img);
        assert!(img.snapshot_list().is_empty());
    }
}

#[test]
fn vmstate_is_discarded_from_active_layer() {
    let (_m, mut img) = mem_image(&CreateOptions {
        size: 64 << 20,
        ..Default::default()
    });
    let state: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    img.vmstate_write(0, &state).unwrap();
    let mut p = params("vm");
    p.vm_state_size = state.len() as u64;
    img.snapshot_create(&p).unwrap();
    assert_clean(&mut img);
    let mut back = vec![0u8; state.len()];
    img.snapshot_vmstate_read("vm", 0, &mut back).unwrap();
    assert_eq!(back, state);
    let mut active = vec![1u8; 1000];
    img.vmstate_read(0, &mut active).unwrap();
    assert!(active.iter().all(|&b| b == 0));
    // The goto reverts the disk part only: the state stays the snapshot's (QEMU would map
    // it into the active layer too, until its next snapshot create discards it).
    img.snapshot_goto("vm").unwrap();
    img.vmstate_read(0, &mut active).unwrap();
    assert!(active.iter().all(|&b| b == 0));
    back.fill(0);
    img.snapshot_vmstate_read("vm", 0, &mut back).unwrap();
    assert_eq!(back, state);
    assert_clean(&mut img);
}

#[test]
fn refcount_width_one_refuses_sharing() {
    let (_m, mut img) = mem_image(&CreateOptions {
        size: 16 << 20,
        refcount_bits: 1,
        ..Default::default()
    });
    img.snapshot_create(&params("empty")).unwrap();
    img.write_at(0, &[1; 512]).unwrap();
    let e = img
        .snapshot_create(&params("full"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refcount_bits=1"), "{e}");
    assert_clean(&mut img);
}

#[test]
fn refcount_table_grows_for_small_clusters() {
    let (_m, mut img) = mem_image(&CreateOptions {
        size: 64 << 20,
        cluster_size: 512,
        refcount_bits: 64,
        ..Default::default()
    });
    let before = img.header.refcount_table_clusters;
    img.write_at(0, &vec![0x5a; 40 << 20]).unwrap();
    assert!(img.header.refcount_table_clusters > before);
    assert_clean(&mut img);
    assert_eq!(read(&mut img, (40 << 20) - 512, 512), vec![0x5a; 512]);
}

fn qemu_img() -> bool {
    let ok = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img not installed");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let o = std::process::Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

#[test]
fn images_we_write_pass_qemu_img_check_and_read_back_in_qemu() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (n, o) in all_opts().into_iter().enumerate() {
        let p = dir.path().join(format!("img{n}.qcow2"));
        Qcow2::create(&p, &o).unwrap();
        {
            let mut img = Qcow2::open(&p, OpenOptions::default()).unwrap();
            img.write_at(4096, &[0x11; 70000]).unwrap();
            img.snapshot_create(&params("s1")).unwrap();
            img.write_at(8192, &[0x22; 512]).unwrap();
            img.write_zeroes(1 << 20, 1 << 20).unwrap();
            img.vmstate_write(0, &[0x77; 100_000]).unwrap();
            let mut p2 = params("s2");
            p2.vm_state_size = 100_000;
            p2.icount = Some(5);
            img.snapshot_create(&p2).unwrap();
            img.snapshot_delete("s1").unwrap();
            img.flush().unwrap();
        }
        let ps = p.to_str().unwrap();
        let (code, out) = run("qemu-img", &["check", ps]);
        assert_eq!(code, 0, "{o:?}: {out}");
        let (_, list) = run("qemu-img", &["snapshot", "-l", ps]);
        assert!(list.contains("s2") && !list.contains("s1"), "{list}");
        let (_, io) = run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x22 8192 512",
                "-c",
                "read -P 0x11 8704 65000",
                ps,
            ],
        );
        assert!(!io.contains("Pattern verification failed"), "{o:?}: {io}");
        // QEMU writes into our image; we read it back and our check agrees.
        let (c, io) = run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x33 0 8k", ps]);
        assert_eq!(c, 0, "{io}");
        let (c, out) = run("qemu-img", &["snapshot", "-c", "qemu-made", ps]);
        assert_eq!(c, 0, "{out}");
        let mut img = Qcow2::open(&p, OpenOptions::default()).unwrap();
        assert_eq!(read(&mut img, 0, 8192), vec![0x33; 8192]);
        assert_clean(&mut img);
        img.snapshot_goto("s2").unwrap();
        assert_eq!(read(&mut img, 8192, 512), vec![0x22; 512]);
        // The state stays the snapshot's after the goto (the active layer gets the disk part).
        let mut st = vec![0u8; 100_000];
        img.snapshot_vmstate_read("s2", 0, &mut st).unwrap();
        assert!(st.iter().all(|&b| b == 0x77));
        img.flush().unwrap();
        drop(img);
        let (code, out) = run("qemu-img", &["check", ps]);
        assert_eq!(code, 0, "{o:?}: {out}");
    }
}

fn fixture_dir() -> Option<std::path::PathBuf> {
    let a = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qemu-7.2");
    let b = std::path::PathBuf::from("/work/shared/fixtures/qemu-7.2");
    [a, b].into_iter().find(|p| p.is_dir())
}

/// Copies a fixture image (gunzipped if needed) into `dir`.
fn fixture_image(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    use std::io::Read;
    let fx = fixture_dir()?;
    let out = dir.join(name);
    let plain = fx.join(name);
    if plain.exists() {
        std::fs::copy(&plain, &out).unwrap();
    } else {
        let gz = std::fs::read(fx.join(format!("{name}.gz"))).ok()?;
        let mut data = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut data)
            .unwrap();
        std::fs::write(&out, data).unwrap();
    }
    Some(out)
}

#[test]
fn qemu_fixture_images_read_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "snap-basic.qcow2",
        "compat-0.10.qcow2",
        "cluster-512.qcow2",
        "cluster-2M.qcow2",
        "refcount-bits-1.qcow2",
        "refcount-bits-64.qcow2",
        "compressed.qcow2",
        "refcount-bits-1-failed-snapshot.qcow2",
    ];
    for name in names {
        let Some(p) = fixture_image(dir.path(), name) else {
            eprintln!("SKIPPED: fixture {name} not found");
            continue;
        };
        let mut img = Qcow2::open(&p, OpenOptions::default()).unwrap();
        let r = img.check(None).unwrap();
        let expect_leaks = u64::from(name.contains("failed"));
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, expect_leaks),
            "{name}: {:?}",
            r.messages
        );
        let fx: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixture_dir()
                    .unwrap()
                    .join(name.replace(".qcow2", ".check.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            r.allocated_clusters,
            fx["allocated-clusters"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            r.image_end_offset,
            fx["image-end-offset"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            r.total_clusters,
            fx["total-clusters"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            r.fragmented_clusters,
            fx["fragmented-clusters"].as_u64().unwrap_or(0),
            "{name}"
        );
        // Every layer's content hashes as recorded.
        let layers: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixture_dir()
                    .unwrap()
                    .join(name.replace(".qcow2", ".layers.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let size = img.size();
        for layer in layers["layers"].as_array().unwrap() {
            let lname = layer["layer"].as_str().unwrap();
            let want = layer["sha256_qemu_img_convert"].as_str().unwrap();
            let mut data = vec![0u8; size as usize];
            if lname.contains("active") && img.find_snapshot(lname).is_err() {
                img.read_at(0, &mut data).unwrap();
            } else {
                let sn = img.snapshot_entries()[img.find_snapshot(lname).unwrap()].clone();
                let l1 = img.read_snapshot_l1(&sn).unwrap();
                img.read_guest(Some(&l1), 0, &mut data).unwrap();
            }
            let got = sha256_hex(&data);
            assert_eq!(got, want, "{name} layer {lname}");
        }
        // Delete every snapshot: qemu-img check stays clean, no leaks.
        let ids: Vec<String> = img.snapshot_list().into_iter().map(|s| s.id).collect();
        for id in ids {
            img.snapshot_delete(&id).unwrap();
        }
        if expect_leaks == 0 {
            assert_clean(&mut img);
        }
        img.flush().unwrap();
        drop(img);
        if qemu_img() {
            let (code, out) = run("qemu-img", &["check", p.to_str().unwrap()]);
            assert_eq!(code, if expect_leaks > 0 { 3 } else { 0 }, "{name}: {out}");
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn backing_file_reads_through_and_partial_writes_copy_from_it() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    assert_eq!(run("qemu-img", &["create", "-f", "qcow2", b, "4M"]).0, 0);
    assert_eq!(run("qemu-io", &["-c", "write -P 0xba 0 1M", b]).0, 0);
    let (c, out) = run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            t,
        ],
    );
    assert_eq!(c, 0, "{out}");
    {
        let mut img = Qcow2::open(&top, OpenOptions::default()).unwrap();
        assert_eq!(img.info().backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(read(&mut img, 4096, 10), vec![0xba; 10]);
        // A partial-cluster write copies the rest of the cluster from the backing file.
        img.write_at(100, &[0x70; 50]).unwrap();
        img.snapshot_create(&params("s")).unwrap();
        img.write_zeroes(65536, 65536).unwrap();
        img.flush().unwrap();
    }
    // Remove the backing data from under the top image's written cluster: QEMU must still read
    // the copied bytes from the top image.
    let (_, io) = run(
        "qemu-io",
        &[
            "-c",
            "read -P 0xba 0 100",
            "-c",
            "read -P 0x70 100 50",
            "-c",
            "read -P 0xba 150 65386",
            "-c",
            "read -P 0 65536 65536",
            "-c",
            "read -P 0xba 131072 4096",
            t,
        ],
    );
    assert!(!io.contains("verification failed"), "{io}");
    let (c, out) = run("qemu-img", &["check", t]);
    assert_eq!(c, 0, "{out}");
}

#[test]
fn compressed_clusters_deflate_and_zstd_made_by_qemu() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for ctype in ["zlib", "zstd"] {
        let src = dir.path().join("src.raw");
        let dst = dir.path().join(format!("{ctype}.qcow2"));
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 1000) as u8 ^ (i % 7) as u8;
        }
        std::fs::write(&src, &data).unwrap();
        let (c, out) = run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ctype}"),
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
            ],
        );
        assert_eq!(c, 0, "{out}");
        let mut img = Qcow2::open(&dst, OpenOptions::default()).unwrap();
        assert_eq!(img.info().compression_type, ctype);
        assert_eq!(read(&mut img, 0, data.len()), data, "{ctype}");
        let r = img.check(None).unwrap();
        assert!(r.compressed_clusters > 0, "{ctype}: {r:?}");
        // A write into a compressed cluster copies it out.
        img.write_at(70_000, &[0xee; 10]).unwrap();
        let mut want = data.clone();
        want[70_000..70_010].fill(0xee);
        assert_eq!(read(&mut img, 0, data.len()), want);
        assert_clean(&mut img);
        img.flush().unwrap();
        drop(img);
        assert_eq!(run("qemu-img", &["check", dst.to_str().unwrap()]).0, 0);
    }
}

#[test]
fn dirty_image_is_repaired_before_snapshots_and_autoclear_is_cleared() {
    let (mem, mut img) = mem_image(&CreateOptions {
        size: 4 << 20,
        lazy_refcounts: true,
        ..Default::default()
    });
    img.write_at(0, &[1; 65536]).unwrap();
    img.flush().unwrap();
    drop(img);
    // Simulate QEMU with lazy refcounts: dirty bit set, a refcount lost, unknown autoclear bit.
    let mut d = mem.data();
    d[79] |= 1; // incompatible_features bit 0 (dirty)
    d[95] |= 0x80; // autoclear bit 7
    let mem = MemStorage::from_vec(d);
    let before = mem.data();
    let mut img = Qcow2::open_storage(Box::new(mem.clone()), false).unwrap();
    assert!(img.info().dirty);
    // A refused operation writes nothing, not even the header updates of a writable open.
    img.snapshot_create(&params("")).unwrap_err();
    assert_eq!(
        mem.data(),
        before,
        "a refused snapshot -c changed the image"
    );
    img.snapshot_create(&params("after-repair")).unwrap();
    assert!(!img.info().dirty);
    assert_clean(&mut img);
    let d = mem.data();
    assert_eq!(d[79] & 1, 0);
    assert_eq!(d[95], 0);
}

#[test]
fn corrupt_image_is_refused_for_writing_but_readable() {
    let (mem, img) = mem_image(&CreateOptions {
        size: 1 << 20,
        ..Default::default()
    });
    drop(img);
    let mut d = mem.data();
    d[79] |= 2; // corrupt bit
    let before = d.clone();
    let e = Qcow2::open_storage(Box::new(MemStorage::from_vec(d.clone())), false).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    let ro = MemStorage::from_vec(d);
    let mut img = Qcow2::open_storage(Box::new(ro.clone()), true).unwrap();
    assert!(img.info().corrupt);
    assert!(img.write_at(0, &[1]).is_err());
    drop(img);
    assert_eq!(ro.data(), before);
}

#[test]
fn unknown_header_fields_and_extensions_survive_snapshot_operations() {
    let (mem, img) = mem_image(&CreateOptions {
        size: 4 << 20,
        ..Default::default()
    });
    drop(img);
    // Grow header_length by 8 bytes of unknown fields and add an unknown extension after the
    // feature table (which starts at 112 in our images).
    let mut d = mem.data();
    let mut rest = d[112..4096].to_vec();
    d[100..104].copy_from_slice(&120u32.to_be_bytes());
    d[112..120].copy_from_slice(b"FUTURE!!");
    let ext_end = {
        // Walk our extensions to find the end marker.
        let mut off = 0usize;
        loop {
            let kind = u32::from_be_bytes(rest[off..off + 4].try_into().unwrap());
            let len = u32::from_be_bytes(rest[off + 4..off + 8].try_into().unwrap()) as usize;
            if kind == 0 {
                break off;
            }
            off += 8 + len.div_ceil(8) * 8;
        }
    };
    rest.truncate(ext_end);
    rest.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    rest.extend_from_slice(&5u32.to_be_bytes());
    rest.extend_from_slice(b"hello\0\0\0");
    rest.extend_from_slice(&[0u8; 8]);
    d[120..120 + rest.len()].copy_from_slice(&rest);
    let header_before = d[..120 + rest.len()].to_vec();
    let mem = MemStorage::from_vec(d);
    let mut img = Qcow2::open_storage(Box::new(mem.clone()), false).unwrap();
    assert!(img
        .header()
        .extensions
        .iter()
        .any(|e| e.kind == 0x1234_5678 && e.data == b"hello"));
    img.write_at(0, &[3; 100_000]).unwrap();
    img.snapshot_create(&params("a")).unwrap();
    img.snapshot_create(&params("b")).unwrap();
    img.snapshot_goto("a").unwrap();
    img.snapshot_delete("b").unwrap();
    assert_clean(&mut img);
    drop(img);
    let after = mem.data();
    // Only the fields vmsnap owns changed: l1 (36..48), snapshots (60..72).
    for (i, (a, b)) in header_before.iter().zip(&after).enumerate() {
        if !(36..48).contains(&i) && !(60..72).contains(&i) {
            assert_eq!(a, b, "header byte {i} changed");
        }
    }
}

/// The same snapshot operations with walks written back after every L2 table and with the
/// default batch leave byte-identical images, for every geometry.
#[test]
fn walk_batch_size_does_not_change_the_result() {
    for opts in all_opts() {
        let run = |limit: Option<usize>| {
            let (mem, mut img) = mem_image(&opts);
            if let Some(l) = limit {
                img.set_walk_batch_limit(l);
            }
            for k in 0..6u64 {
                let off = k * (opts.size / 6);
                img.write_at(off, &vec![k as u8 + 1; 70_000]).unwrap();
            }
            img.snapshot_create(&params("a")).unwrap();
            img.write_at(opts.size / 3, &[0x55; 100_000]).unwrap();
            img.snapshot_create(&params("b")).unwrap();
            img.snapshot_goto("a").unwrap();
            img.snapshot_delete("b").unwrap();
            assert_clean(&mut img);
            img.flush().unwrap();
            drop(img);
            mem.data()
        };
        assert!(run(Some(0)) == run(None), "{opts:?}");
    }
}

/// A broken entry in an L2 table shared by the active layer and two snapshots is reported
/// once per L1 table reaching it (as qemu-img does), though the table is walked once, and
/// the shared clusters' expected counts include every reference.
#[test]
fn check_reports_shared_table_findings_per_reference() {
    let (mem, mut img) = mem_image(&CreateOptions {
        size: 16 << 20,
        ..Default::default()
    });
    img.write_at(0, &[1; 200_000]).unwrap();
    img.snapshot_create(&params("a")).unwrap();
    img.snapshot_create(&params("b")).unwrap();
    assert_clean(&mut img);
    // Misalign the data offset of L2 entry 1 (reserved low bits set).
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let mut e = [0u8; 8];
    img.sread(l2 + 8, &mut e).unwrap();
    let bad = BigEndian::read_u64(&e) | 0x200;
    BigEndian::write_u64(&mut e, bad);
    img.storage.write_at(l2 + 8, &e).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut img = Qcow2::open_storage(Box::new(mem), true).unwrap();
    let r = img.check(None).unwrap();
    let misaligned = r
        .messages
        .iter()
        .filter(|m| m.contains("Data cluster is not properly aligned; L2 entry corrupted."))
        .count();
    assert_eq!(misaligned, 3, "{:?}", r.messages);
    // As QEMU, the unaligned cluster is still counted where it points: it covers entry 1's
    // cluster (still 3 references) and entry 2's, which now has 6 against a stored 3.
    assert_eq!((r.corruptions, r.leaks), (4, 0), "{:?}", r.messages);
    assert!(
        r.messages
            .iter()
            .any(|m| m.ends_with("refcount=3 reference=6")),
        "{:?}",
        r.messages
    );
}

/// VM state of `len` bytes written as savevm does: reserve, then 1 MiB chunks.
fn save_state(img: &mut Qcow2, name: &str, len: usize, byte: u8) {
    img.vmstate_reserve(len as u64).unwrap();
    for (i, chunk) in vec![byte; len].chunks(1 << 20).enumerate() {
        img.vmstate_write((i << 20) as u64, chunk).unwrap();
    }
    let mut p = params(name);
    p.vm_state_size = len as u64;
    img.snapshot_create(&p).unwrap();
}

/// Whether the first `len` bytes of snapshot `name`'s VM state are all `byte`.
fn state_is(img: &mut Qcow2, name: &str, len: usize, byte: u8) -> bool {
    let mut back = vec![0u8; len];
    img.snapshot_vmstate_read(name, 0, &mut back).unwrap();
    back.iter().all(|&b| b == byte)
}

#[test]
fn reserved_vmstate_area_needs_no_flush_while_the_state_is_written() {
    for o in all_opts() {
        let (mem, mut img) = mem_image(&o);
        // Several L1 entries' worth of state (a small L2 range for small clusters).
        let cs = u64::from(o.cluster_size);
        let l1_range = cs * (cs / if o.extended_l2 { 16 } else { 8 });
        let len = (3 * l1_range).min(8 << 20) as usize;
        img.vmstate_reserve(len as u64).unwrap();
        let l1_size = img.l1.len();
        let (_, flushes) = mem.counts();
        for (i, chunk) in vec![0x5a; len].chunks(1 << 20).enumerate() {
            img.vmstate_write((i << 20) as u64, chunk).unwrap();
        }
        assert_eq!(
            mem.counts().1,
            flushes,
            "{o:?}: a flush while writing state"
        );
        assert_eq!(img.l1.len(), l1_size, "{o:?}: L1 grew again");
        let mut p = params("s");
        p.vm_state_size = len as u64;
        img.snapshot_create(&p).unwrap();
        assert_clean(&mut img);
        assert!(state_is(&mut img, "s", len, 0x5a), "{o:?}");
    }
}

#[test]
fn a_detached_vmstate_write_never_leaves_entries_past_the_end_of_the_file() {
    for o in all_opts() {
        let (mem, mut img) = mem_image(&o);
        let len = 4usize << 20;
        img.vmstate_reserve(len as u64).unwrap();
        let mut runs = Vec::new();
        for (i, chunk) in vec![0x5a; len].chunks(1 << 20).enumerate() {
            runs.extend(img.vmstate_write_detached((i << 20) as u64, chunk).unwrap());
        }
        // (1 MiB chunks hold whole-cluster runs for clusters up to 512 KiB.)
        assert!(
            !runs.is_empty() || o.cluster_size > 512 << 10,
            "{o:?}: no detached run"
        );
        if runs.is_empty() {
            continue;
        }
        // The caller never writes the runs (killed): the file still covers them, and the
        // image checks without corruption.
        let end = runs.iter().map(|r| r.host + r.len as u64).max().unwrap();
        assert!(mem.data().len() as u64 >= end, "{o:?}: a run past the end");
        let r = img.check(None).unwrap();
        assert_eq!(
            (r.corruptions, r.check_errors),
            (0, 0),
            "{o:?}: {:?}",
            r.messages
        );
    }
}

#[test]
fn a_deleted_snapshots_space_is_reused_and_discarded() {
    for o in all_opts() {
        let (mem, mut img) = mem_image(&o);
        let len = 2 << 20;
        save_state(&mut img, "a", len, 0x11);
        save_state(&mut img, "b", len, 0x22);
        img.flush().unwrap();
        let end = mem.data().len();
        let before = mem.data();
        img.snapshot_delete("a").unwrap();
        // Every host cluster that held a's state now reads as zero in the file.
        let cs = o.cluster_size as usize;
        let held: Vec<usize> = (0..before.len() / cs)
            .filter(|&c| before[c * cs..(c + 1) * cs].iter().all(|&b| b == 0x11))
            .collect();
        assert_eq!(held.len() * cs, len, "{o:?}");
        let after = mem.data();
        for c in held {
            let cluster = &after[c * cs..(c + 1) * cs];
            assert!(
                cluster.iter().all(|&b| b == 0),
                "{o:?}: cluster {c} not discarded"
            );
        }
        // The same process saves again into the freed space: the file grows by a metadata
        // cluster or two at most (new tables), not by the state.
        save_state(&mut img, "c", len, 0x33);
        img.flush().unwrap();
        let grown = mem.data().len() - end;
        assert!(
            grown as u64 <= 2 * u64::from(o.cluster_size),
            "{o:?}: file grew by {grown} instead of reusing"
        );
        assert_clean(&mut img);
        assert!(state_is(&mut img, "b", len, 0x22), "{o:?}");
        assert!(state_is(&mut img, "c", len, 0x33), "{o:?}");
    }
}

#[test]
fn one_read_over_contiguous_scattered_zero_and_unallocated_clusters() {
    for o in all_opts() {
        let (_, mut img) = mem_image(&o);
        let cs = o.cluster_size as usize;
        // Host order 3, 4, 0, 1, 6 (contiguous pairs, a jump back, a gap), 2 zero, 5 unallocated.
        let mut want = vec![0u8; 8 * cs];
        for (c, fill) in [(3usize, 3u8), (4, 4), (0, 10), (1, 11), (6, 6)] {
            let data: Vec<u8> = (0..cs).map(|i| fill ^ (i as u8)).collect();
            img.write_at((c * cs) as u64, &data).unwrap();
            want[c * cs..(c + 1) * cs].copy_from_slice(&data);
        }
        img.write_zeroes((2 * cs) as u64, cs as u64).unwrap();
        // Unaligned start and end, through the active table and through a snapshot's.
        assert_eq!(
            read(&mut img, 7, 8 * cs - 20),
            want[7..8 * cs - 13],
            "{o:?}"
        );
        img.snapshot_create(&params("s")).unwrap();
        img.write_at(0, &vec![0xee; 2 * cs]).unwrap();
        let mut back = vec![0u8; 8 * cs];
        img.read_snapshot("s", 0, &mut back).unwrap();
        assert_eq!(back, want, "{o:?}");
    }
}

#[test]
fn a_discard_scope_punches_only_what_stays_free() {
    for o in all_opts() {
        let (mem, mut img) = mem_image(&o);
        let len = 2 << 20;
        save_state(&mut img, "a", len, 0x11);
        save_state(&mut img, "b", len, 0x22);
        // savevm over "a": delete it and write a smaller state into its space, in one scope.
        img.begin_discards();
        img.snapshot_delete("a").unwrap();
        save_state(&mut img, "a", len / 2, 0x33);
        img.end_discards(true).unwrap();
        assert!(
            state_is(&mut img, "a", len / 2, 0x33),
            "{o:?}: reused space was punched"
        );
        assert!(state_is(&mut img, "b", len / 2, 0x22), "{o:?}");
        // What the new state did not take back was punched (old state bytes left in
        // clusters in use again, metadata written over part of one, do not count).
        let cs = o.cluster_size as usize;
        let mut left = 0;
        for (c, cluster) in mem.data().chunks(cs).enumerate() {
            if img.get_refcount(c as u64).unwrap() == 0 {
                left += cluster.iter().filter(|&&b| b == 0x11).count();
            }
        }
        assert!(left < cs, "{o:?}: {left} bytes not punched");
        assert_clean(&mut img);
    }
}

#[test]
fn a_table_past_the_end_of_the_file_reads_as_zeroes() {
    // 3 entries and 4 bytes of a fourth inside the file; the table goes on past its end.
    let mut d = vec![0xeeu8; 16];
    for i in 1..=3u64 {
        d.extend_from_slice(&(i << 9).to_be_bytes());
    }
    d.extend_from_slice(&[0, 0, 0, 7]);
    let mem = MemStorage::from_vec(d);
    let t = read_table(&mem, 16, 6).unwrap();
    assert_eq!(t, vec![1 << 9, 2 << 9, 3 << 9, 7 << 32, 0, 0]);
    // Wholly past the end, and empty.
    assert_eq!(read_table(&mem, 1 << 20, 4).unwrap(), vec![0; 4]);
    assert!(read_table(&mem, 8, 0).unwrap().is_empty());
    // A dead storage still fails the read.
    mem.set_fault(crate::block::storage::Fault::Write(1));
    let _ = crate::block::Storage::write_at(&mem, 0, b"x");
    assert!(read_table(&mem, 1 << 20, 4).is_err());
}
