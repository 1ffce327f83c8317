//! Unit tests of the write-side refusals (`overlap`, `preflight`) on in-memory storage:
//! every refusal leaves the storage's bytes as they were.

use super::*;
use crate::block::storage::Storage;
use crate::block::MemStorage;

fn image_with_data() -> (MemStorage, Qcow2) {
    let mem = MemStorage::new();
    let opts = CreateOptions {
        size: 16 << 20,
        ..Default::default()
    };
    Qcow2::create_on(Box::new(mem.clone()), &opts).unwrap();
    let mut img = Qcow2::open_storage(Box::new(mem.clone()), false).unwrap();
    img.write_at(0, &[0x11; 65536]).unwrap();
    img.flush().unwrap();
    (mem, img)
}

fn reopen(mem: &MemStorage) -> Qcow2 {
    Qcow2::open_storage(Box::new(mem.clone()), false).unwrap()
}

fn poke64(mem: &MemStorage, off: u64, v: u64) {
    mem.write_at(off, &v.to_be_bytes()).unwrap();
}

fn params(name: &str) -> SnapshotParams {
    SnapshotParams {
        name: name.into(),
        ..Default::default()
    }
}

#[test]
fn guest_write_over_a_refcount_block_is_refused_and_writes_nothing() {
    let (mem, img) = image_with_data();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let rb = img.reftable[0];
    drop(img);
    poke64(&mem, l2, entry::OFLAG_COPIED | rb);
    let mut img = reopen(&mem);
    let before = mem.data();
    let e = img.write_at(512, &[0x2a; 512]).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Qcow2(Qcow2Error::MetadataOverlap { what: "refcount block", offset, .. })
                if *offset == rb + 512
        ),
        "{e}"
    );
    assert!(e.to_string().contains("vmsnap check -r all"), "{e}");
    assert_eq!(before, mem.data());
    // The open image takes no more writes, even harmless ones; reads still work.
    assert!(img.write_at(8 << 20, &[1; 512]).is_err());
    assert!(img.snapshot_create(&params("x")).is_err());
    assert_eq!(before, mem.data());
    let mut b = [0u8; 512];
    img.read_at(1 << 20, &mut b).unwrap();
}

#[test]
fn allocation_over_the_header_is_refused_before_its_refcount_is_written() {
    let (mem, img) = image_with_data();
    let rt = img.header.refcount_table_offset;
    drop(img);
    poke64(&mem, rt, 0);
    let mut img = reopen(&mem);
    let before = mem.data();
    let e = img.write_at(8 << 20, &[1; 4096]).unwrap_err();
    assert!(e.to_string().contains("overlaps with qcow2_header"), "{e}");
    assert_eq!(before, mem.data());
}

#[test]
fn snapshot_delete_and_goto_refuse_to_free_a_shared_cluster_counted_once() {
    let (mem, mut img) = image_with_data();
    img.snapshot_create(&params("s1")).unwrap();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let (e, _) = img.l2_get(l2, 0).unwrap();
    let data = img.layout.cluster_index(e.offset());
    assert_eq!(img.get_refcount(data).unwrap(), 2);
    img.set_refcount(data, 1).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut img = reopen(&mem);
    let before = mem.data();
    for r in [
        img.snapshot_delete("s1"),
        img.snapshot_goto("s1"),
        img.snapshot_create(&params("s2")).map(drop),
    ] {
        let e = r.unwrap_err();
        let want = format!(
            "the cluster at host offset {:#x} has refcount 1 but 2 references",
            data << img.layout.cluster_bits
        );
        assert!(e.to_string().contains(&want), "{e}");
        assert_eq!(before, mem.data());
    }
    // After a repair the same delete goes through and the data survives.
    img.check(Some(Repair::All)).unwrap();
    img.snapshot_delete("s1").unwrap();
    let mut b = vec![0u8; 65536];
    img.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn snapshot_create_refuses_an_l2_entry_past_the_end_of_the_file() {
    let (mem, img) = image_with_data();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    drop(img);
    poke64(&mem, l2 + 8, entry::OFLAG_COPIED | (1 << 40));
    let mut img = reopen(&mem);
    let before = mem.data();
    let e = img.snapshot_create(&params("x")).unwrap_err();
    assert!(
        e.to_string()
            .contains("data cluster at 0x10000000000 lies beyond the end of the file"),
        "{e}"
    );
    assert_eq!(before, mem.data());
    // Nothing was refused at the write level: the image still takes guest writes.
    img.write_at(4 << 20, &[7; 512]).unwrap();
}

/// A 16 MiB image with 512-byte clusters (many metadata clusters for little data) and
/// 4 KiB of guest data at 0.
fn small_cluster_image() -> (MemStorage, Qcow2) {
    let mem = MemStorage::new();
    let opts = CreateOptions {
        size: 16 << 20,
        cluster_size: 512,
        ..Default::default()
    };
    Qcow2::create_on(Box::new(mem.clone()), &opts).unwrap();
    let mut img = reopen(&mem);
    img.write_at(0, &[0x11; 4096]).unwrap();
    (mem, img)
}

/// `check`'s corruption count of the image on `mem`.
fn corruptions(mem: &MemStorage) -> u64 {
    let mut img = Qcow2::open_storage(Box::new(mem.clone()), true).unwrap();
    img.check(None).unwrap().corruptions
}

#[test]
fn snapshot_operations_refuse_an_l1_entry_with_the_copied_flag_and_no_offset() {
    // Reads take such an entry as unallocated; `check` (QEMU's too) reads the header as its
    // L2 table and reports its entries once per table reaching it. A snapshot copying the
    // table would add those reports again (fuzz finding
    // strict-fixed/qcow2_write/accepted-op-raised-count-region-past-eof; QEMU aborts).
    let (mem, mut img) = small_cluster_image();
    img.snapshot_create(&params("s1")).unwrap();
    assert!(img.l1.len() > 5);
    let l1 = img.header.l1_table_offset;
    let sn_l1 = img.snapshots[0].l1_table_offset;
    drop(img);
    // In the active table; in the snapshot's table (walked by goto and delete); in another
    // snapshot's table (create rewrites the header, and with it what `check` finds there).
    for (at, table) in [
        (l1, "the active L1 table"),
        (sn_l1, "the snapshot's L1 table"),
        (sn_l1, "the L1 table of snapshot 's1'"),
    ] {
        let orig = mem.data();
        poke64(&mem, at + 5 * 8, entry::OFLAG_COPIED);
        assert!(corruptions(&mem) > 0);
        let before = mem.data();
        let mut img = reopen(&mem);
        let r = match table {
            "the active L1 table" => img.snapshot_create(&params("s2")).map(drop),
            "the snapshot's L1 table" => img.snapshot_goto("s1"),
            _ => img.snapshot_create(&params("s2")).map(drop),
        };
        let e = r.unwrap_err().to_string();
        let want = format!("entry 5 of {table} (0x8000000000000000) has no offset");
        assert!(e.contains(&want), "{e}");
        assert_eq!(before, mem.data());
        let r = img.snapshot_delete("s1");
        assert!(r.unwrap_err().to_string().contains("has no offset"));
        assert_eq!(before, mem.data());
        drop(img);
        mem.write_at(0, &orig).unwrap();
    }
}

#[test]
fn snapshot_create_refuses_compressed_data_reaching_a_cluster_past_the_end_of_the_file() {
    // The data starts inside the file, so reads work (past the end they read zeroes), but
    // `check` reports the range once per table reaching it.
    let (mem, img) = image_with_data();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let shift = img.layout.csize_shift();
    drop(img);
    let len = mem.data().len() as u64;
    poke64(
        &mem,
        l2 + 8,
        entry::OFLAG_COMPRESSED | (255 << shift) | (len - 512),
    );
    assert_eq!(corruptions(&mem), 1);
    let mut img = reopen(&mem);
    let before = mem.data();
    let e = img.snapshot_create(&params("x")).unwrap_err();
    assert!(
        e.to_string().contains(
            "entry 1 of the L2 table at 0x40000 (reached from the active L1 table): `check` \
             reports it once per table reaching it: ERROR: counting reference for region \
             exceeding the end of the file"
        ),
        "{e}"
    );
    assert_eq!(before, mem.data());
}

#[test]
fn snapshot_create_clears_copied_on_a_compressed_entry_as_qemu_does() {
    let (mem, mut img) = image_with_data();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let (e0, _) = img.l2_get(l2, 0).unwrap();
    drop(img);
    // The first data cluster's entry made compressed (one sector of it), with the COPIED flag
    // `check` reports once per table reaching it.
    let bad = entry::OFLAG_COPIED | entry::OFLAG_COMPRESSED | e0.offset();
    poke64(&mem, l2, bad);
    assert_eq!(corruptions(&mem), 1);
    let mut img = reopen(&mem);
    img.snapshot_create(&params("s1")).unwrap();
    drop(img);
    assert_eq!(corruptions(&mem), 0);
    let mut b = [0u8; 8];
    mem.read_at(l2, &mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b), bad & !entry::OFLAG_COPIED);
}

#[test]
fn allocation_counted_by_a_refcount_block_past_the_end_of_the_file_is_refused_first() {
    // 512-byte clusters, 16-bit refcounts: refcount block 1 counts clusters 256-511.
    let (mem, mut img) = small_cluster_image();
    // Block 0 full (leaked clusters past the data), block 1 not made yet.
    let end = mem.data().len() as u64 / 512;
    assert!(end < 256);
    for c in end..256 {
        img.set_refcount(c, 1).unwrap();
    }
    img.flush().unwrap();
    assert_eq!(img.reftable.get(1).copied().unwrap_or(0), 0);
    let rt = img.header.refcount_table_offset;
    drop(img);
    // Fuzz finding strict-fixed/qcow2_write/refused-multicluster-write-changed-bytes-refblock-past-eof.
    poke64(&mem, rt + 8, 1 << 45);
    let mut img = reopen(&mem);
    let before = mem.data();
    // A write over several clusters (and a new L2 table) would take clusters from 256 on.
    let e = img.write_at(4 << 20, &[7; 4096]).unwrap_err();
    assert!(
        e.to_string().contains(
            "refcount block 1 at 0x200000000000, which counts clusters from 0x20000 on where \
             the allocation may go, lies beyond the end of the file"
        ),
        "{e}"
    );
    assert_eq!(before, mem.data());
    let e = img.snapshot_create(&params("s1")).unwrap_err();
    assert!(e.to_string().contains("refcount block 1 at"), "{e}");
    assert_eq!(before, mem.data());
}

#[test]
fn zeroing_and_writing_several_clusters_check_every_release_first() {
    // Three data clusters shared with a snapshot; the last one's stored refcount is 0.
    let (mem, mut img) = image_with_data();
    img.write_at(0, &[0x11; 3 * 65536]).unwrap();
    img.snapshot_create(&params("s1")).unwrap();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let (e2, _) = img.l2_get(l2, 2).unwrap();
    let c2 = img.layout.cluster_index(e2.offset());
    img.set_refcount(c2, 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut img = reopen(&mem);
    let before = mem.data();
    let want = format!(
        "refcount of cluster {:#x} would drop below zero",
        e2.offset()
    );
    for r in [
        img.discard(0, 3 * 65536),
        img.write_zeroes(0, 3 * 65536),
        img.write_at(100, &[0x22; 2 * 65536]),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(&want), "{e}");
        assert_eq!(before, mem.data());
    }
}

#[test]
fn overlap_map_follows_tables_as_they_move() {
    // L1 growth, refcount table growth (512-byte clusters), snapshot table rewrites and
    // goto/delete each move metadata; freed clusters are reused by later writes, which
    // must not be refused.
    let mem = MemStorage::new();
    let opts = CreateOptions {
        size: 64 << 20,
        cluster_size: 512,
        ..Default::default()
    };
    Qcow2::create_on(Box::new(mem.clone()), &opts).unwrap();
    let mut img = Qcow2::open_storage(Box::new(mem.clone()), false).unwrap();
    for round in 0..4u8 {
        for k in 0..64u64 {
            img.write_at(k * 300_000 % (60 << 20), &[round; 4096])
                .unwrap();
        }
        img.snapshot_create(&params(&format!("s{round}"))).unwrap();
        if round % 2 == 1 {
            img.snapshot_goto(&format!("s{}", round - 1)).unwrap();
            img.snapshot_delete(&format!("s{}", round - 1)).unwrap();
        }
    }
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn refcount_table_entries_take_every_offset_bit_as_qemu_does() {
    // Fuzz finding strict-fixed/qcow2_write/accepted-write-raised-count-refblock-outside-image:
    // bit 56 of a refcount table entry is part of the offset (L1 and L2 entries reserve it).
    let (mem, img) = image_with_data();
    let rt = img.header.refcount_table_offset;
    let rb = img.reftable[0];
    drop(img);
    poke64(&mem, rt, rb | 1 << 56);
    let mut img = reopen(&mem);
    let r = img.check(None).unwrap();
    assert!(
        r.messages
            .iter()
            .any(|m| m == "ERROR refcount block 0 is outside image"),
        "{:?}",
        r.messages
    );
    let before = mem.data();
    // The clusters that block counts read as free; the first the allocator offers is the
    // header's, and the overlap check refuses it.
    let e = img.write_at(8 << 20, &[7; 4096]).unwrap_err();
    assert!(e.to_string().contains("overlaps with qcow2_header"), "{e}");
    assert_eq!(before, mem.data());
}

#[test]
fn a_snapshot_l1_table_over_the_header_refuses_snapshot_writes_before_the_first() {
    // Fuzz finding strict-fixed/qcow2_write/accepted-create-raised-count-l1-table-over-header:
    // QEMU's overlap check counts a snapshot's L1 table at offset 0 too.
    let (mem, mut img) = image_with_data();
    img.snapshot_create(&params("s1")).unwrap();
    let table = img.header.snapshots_offset;
    drop(img);
    poke64(&mem, table, 0);
    let mut img = reopen(&mem);
    let before = mem.data();
    let e = img.snapshot_create(&params("s2")).unwrap_err();
    assert!(
        e.to_string().contains("overlaps with inactive L1 table"),
        "{e}"
    );
    assert_eq!(before, mem.data());
}

/// Two active L1 entries reaching one L2 table whose data entries lost their COPIED flags:
/// `check` reports the table's flags once per L1 entry (as QEMU does), whether the table is
/// walked twice or its findings replayed; `-r leaks` repairs them once (the second walk finds
/// them repaired).
#[test]
fn check_reports_copied_flags_of_a_shared_l2_table_once_per_l1_entry() {
    // 1 GiB: two L1 entries of 512 MiB; data in the first.
    let mem = MemStorage::new();
    let opts = CreateOptions {
        size: 1 << 30,
        ..Default::default()
    };
    Qcow2::create_on(Box::new(mem.clone()), &opts).unwrap();
    let mut img = reopen(&mem);
    img.write_at(0, &[0x11; 65536]).unwrap();
    img.flush().unwrap();
    let l2 = entry::L1Entry(img.l1[0]).l2_offset();
    let l1_off = img.header.l1_table_offset;
    assert_eq!(img.l1[1], 0);
    drop(img);
    // The first data entry loses COPIED; the second L1 entry names the same table.
    let mut e = [0u8; 8];
    mem.read_at(l2, &mut e).unwrap();
    let data = u64::from_be_bytes(e);
    assert!(data & entry::OFLAG_COPIED != 0);
    poke64(&mem, l2, data & !entry::OFLAG_COPIED);
    poke64(&mem, l1_off + 8, entry::OFLAG_COPIED | l2);
    let copied_msgs = |r: &CheckReport, word: &str| {
        r.messages
            .iter()
            .filter(|m| m.starts_with(&format!("{word} OFLAG_COPIED data cluster")))
            .count()
    };
    let mut img = reopen(&mem);
    let a = img.check(None).unwrap();
    let b = img.check(None).unwrap();
    assert_eq!(a, b);
    assert_eq!(copied_msgs(&a, "ERROR"), 2, "{:#?}", a.messages);
    // The L2 table (stored 1, referenced twice) and the data cluster are corruptions.
    assert_eq!(a.corruptions, 2, "{:#?}", a.messages);
    assert_eq!(a.leaks, 2, "{:#?}", a.messages);
    let before = mem.data();
    let fixed = img.check(Some(Repair::Leaks)).unwrap();
    assert_eq!(copied_msgs(&fixed, "Repairing"), 1, "{:#?}", fixed.messages);
    assert_eq!(fixed.leaks_fixed, 1);
    assert_ne!(before, mem.data());
    let after = img.check(None).unwrap();
    assert_eq!(copied_msgs(&after, "ERROR"), 0, "{:#?}", after.messages);
}

/// A snapshot table entry with an unaligned L1 table is reported once, with its message,
/// and its table is not read.
#[test]
fn check_reports_an_unaligned_snapshot_l1_table_once() {
    let (mem, mut img) = image_with_data();
    img.snapshot_create(&params("a")).unwrap();
    let at = img.snapshots[0].entry_offset;
    drop(img);
    let mut e = [0u8; 8];
    mem.read_at(at, &mut e).unwrap();
    poke64(&mem, at, u64::from_be_bytes(e) + 8);
    let mut img = reopen(&mem);
    assert!(img.snapshots[0].has_l1_problem(img.layout.cluster_size()));
    let r = img.check(None).unwrap();
    let msgs: Vec<_> = r
        .messages
        .iter()
        .filter(|m| m.contains("L1 table is not cluster aligned"))
        .collect();
    assert_eq!(msgs.len(), 1, "{:#?}", r.messages);
    assert!(
        msgs[0].starts_with("ERROR snapshot 1 (a) l1_offset="),
        "{}",
        msgs[0]
    );
}
