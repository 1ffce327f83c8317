//! `qcow2_read`: what `vmsnap info`, `snapshot -l` and `check` do to an image, read-only, on
//! arbitrary bytes held in memory: open, list (table and JSON), header facts, check, and a
//! bounded read of guest data and of each snapshot's VM state.

use std::collections::HashSet;

use vmsnap::block::qcow2::Qcow2;
use vmsnap::block::{BlockDriver, MemStorage, SnapshotInfo, SnapshotStore};
use vmsnap::cli::table::{snapshot_table, snapshots_json};

/// Guest bytes read from the active layer and from each snapshot.
const READ_LEN: usize = 64 << 10;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mem = MemStorage::from_vec(data.to_vec());
    let Ok(mut img) = Qcow2::open_storage(Box::new(mem.clone()), true) else {
        return;
    };
    let list = img.snapshot_list();
    // The table and the JSON format each entry on its own. A table past the end of the file
    // lists tens of thousands of identical entries (zeroes): runs of equal entries are cut to
    // two, so every distinct entry, and a repeated one, is still formatted.
    // `same[i]`: entry i equals entry i - 1 (one comparison per entry; equality is
    // transitive, so entry i equals both entries before it when `same[i] && same[i - 1]`).
    let same: Vec<bool> = (0..list.len())
        .map(|i| i > 0 && list[i] == list[i - 1])
        .collect();
    let shown: Vec<SnapshotInfo> = list
        .iter()
        .enumerate()
        .filter(|&(i, _)| i < 2 || !(same[i] && same[i - 1]))
        .map(|(_, sn)| sn.clone())
        .collect();
    let _ = snapshot_table(&shown);
    let _ = snapshots_json(&shown);
    let _ = img.info();
    if let Ok(report) = img.check(None) {
        assert!(
            (0..=3).contains(&report.exit_code()),
            "check exit {}",
            report.exit_code()
        );
    }
    let len = img.size().min(READ_LEN as u64) as usize;
    let mut buf = vec![0u8; len];
    let _ = img.read_at(0, &mut buf);
    // Snapshots are found by id (the first one with it): a table of tens of thousands of
    // entries past the end of the file (zeroes, all with the id "") would repeat the same
    // reads of the same snapshot for each entry, thousands of times per execution.
    let mut done = HashSet::new();
    for (i, sn) in list.iter().enumerate() {
        // The id of the entry before is in `done` already (the runs of equal entries are
        // long): no hashing for it.
        if (i > 0 && sn.id == list[i - 1].id) || !done.insert(sn.id.as_str()) {
            continue;
        }
        let _ = img.read_snapshot(&sn.id, 0, &mut buf);
        let n = sn.vm_state_size.min(READ_LEN as u64) as usize;
        let mut state = vec![0u8; n];
        let _ = img.snapshot_vmstate_read(&sn.id, 0, &mut state);
        let _ = img.snapshot_extra_tail(&sn.id);
    }
    assert!(
        mem.with_data(|d| d == data),
        "a read-only open changed the bytes"
    );
}
