//! `qcow2_read`: what `vmsnap info`, `snapshot -l` and `check` do to an image, read-only, on
//! arbitrary bytes held in memory: open, list (table and JSON), header facts, check, and a
//! bounded read of guest data and of each snapshot's VM state.

use vmsnap::block::qcow2::Qcow2;
use vmsnap::block::{BlockDriver, MemStorage, SnapshotStore};
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
    let _ = snapshot_table(&list);
    let _ = snapshots_json(&list);
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
    for sn in &list {
        let _ = img.read_snapshot(&sn.id, 0, &mut buf);
        let n = sn.vm_state_size.min(READ_LEN as u64) as usize;
        let mut state = vec![0u8; n];
        let _ = img.snapshot_vmstate_read(&sn.id, 0, &mut state);
        let _ = img.snapshot_extra_tail(&sn.id);
    }
    assert_eq!(mem.data(), data, "a read-only open changed the bytes");
}
