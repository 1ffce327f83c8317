//! Snapshot lists as `qemu-img` prints them: the `snapshot -l` table (QEMU
//! `bdrv_snapshot_dump`) and the `snapshots` array of `info --output=json`.

use serde_json::{json, Value};

use super::localtime;
use super::size::size_to_str;
use crate::block::SnapshotInfo;

/// The table header line, without a newline.
pub fn header_line() -> String {
    format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    )
}

/// `HH:MM:SS.mmm` of a guest clock in nanoseconds.
pub fn vm_clock(nsec: u64) -> String {
    let secs = nsec / 1_000_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        nsec / 1_000_000 % 1000
    )
}

/// One table row, without a newline; `date` is the formatted DATE column.
pub fn row_with_date(s: &SnapshotInfo, date: &str) -> String {
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        date,
        vm_clock(s.vm_clock_nsec),
        icount
    )
}

/// The whole `snapshot -l` text (empty when there are no snapshots, as `qemu-img`).
pub fn snapshot_table(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&header_line());
    out.push('\n');
    for s in list {
        let date = localtime::format_local(i64::from(s.date_sec));
        out.push_str(&row_with_date(s, &date));
        out.push('\n');
    }
    out
}

/// One snapshot as an element of `qemu-img info --output=json`'s `snapshots`, keys in the
/// order QEMU 7.2 prints them.
pub fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(i) = s.icount {
        m.insert("icount".into(), json!(i));
    }
    m.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

/// The `snapshots` array.
pub fn snapshots_json(list: &[SnapshotInfo]) -> Value {
    Value::Array(list.iter().map(snapshot_json).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str, vm: u64, clock: u64, icount: Option<u64>) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            vm_state_size: vm,
            date_sec: 1_795_321_730,
            date_nsec: 302_166_000,
            vm_clock_nsec: clock,
            disk_size: None,
            icount,
        }
    }

    #[test]
    fn rows_match_the_fixture_text() {
        // Lines of fixtures/qemu-7.2/snap-basic.snapshot-l.txt (dates in UTC).
        assert_eq!(
            header_line(),
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
        );
        let date = localtime::format_datetime(1_795_321_730, 0);
        assert_eq!(
            row_with_date(&snap("1", "first", 30_057_799, 1_585_745_936, None), &date),
            "1         first            28.7 MiB 2026-11-22 04:28:50 00:00:01.585           "
        );
        assert_eq!(
            row_with_date(&snap("3", "disk-only", 0, 0, Some(0)), &date),
            "3         disk-only             0 B 2026-11-22 04:28:50 00:00:00.000          0"
        );
        assert_eq!(vm_clock(3_723_004_000_000), "01:02:03.004");
    }

    #[test]
    fn json_has_qemu_keys() {
        let v = snapshot_json(&snap("1", "first", 30_057_799, 1_585_745_936, None));
        assert_eq!(v["vm-clock-sec"], 1);
        assert_eq!(v["vm-clock-nsec"], 585_745_936);
        assert_eq!(v["vm-state-size"], 30_057_799);
        assert!(v.get("icount").is_none());
        let v = snapshot_json(&snap("3", "d", 0, 0, Some(0)));
        assert_eq!(v["icount"], 0);
        assert_eq!(snapshot_table(&[]), "");
    }
}
