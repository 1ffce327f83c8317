//! The snapshot table as QEMU prints it (`bdrv_snapshot_dump`): `qemu-img snapshot -l` and
//! the monitor's `info snapshots`.

use crate::block::SnapshotInfo;

/// The header line (no trailing newline).
pub fn header() -> String {
    format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    )
}

/// One row; `id` replaces the snapshot's own id (QEMU shows `--` for snapshots present on
/// all disks, whose ids may differ).
pub fn row(sn: &SnapshotInfo, id: &str) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (sn.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}",
        id,
        sn.name,
        size_to_str(sn.vm_state_size),
        date(u64::from(sn.date_sec)),
        clock,
        icount
    )
}

/// QEMU's `size_to_str`: three significant digits and a binary unit (`0 B`, `1.18 MiB`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) exponent, then (e - 1) / 10.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let i = (((exp - 1).max(0)) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(val as f64 / div), SUFFIXES[i])
}

/// printf's `%0.3g` for values below 1000.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits_before = if v >= 1.0 {
        v.log10().floor() as i32 + 1
    } else {
        0
    };
    let decimals = (3 - digits_before).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `%Y-%m-%d %H:%M:%S` of a Unix time, in UTC.
pub fn date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `info snapshots` for a VM: the snapshots of the VM-state disk that every other disk also
/// has (ID shown as `--`), then, per disk, the ones that are not on every disk.
/// `disks` is `(name, snapshots)` per included disk, VM-state disk first.
pub fn info_snapshots(disks: &[(String, Vec<SnapshotInfo>)]) -> String {
    let Some((_, first)) = disks.first() else {
        return "No available block device supports snapshots".into();
    };
    let on_all = |name: &str| {
        disks
            .iter()
            .all(|(_, list)| list.iter().any(|s| s.name == name))
    };
    let mut out = String::new();
    let common: Vec<&SnapshotInfo> = first.iter().filter(|s| on_all(&s.name)).collect();
    let any_partial = disks
        .iter()
        .any(|(_, l)| l.iter().any(|s| !on_all(&s.name)));
    if common.is_empty() && !any_partial {
        return "There is no snapshot available.".into();
    }
    out.push_str("List of snapshots present on all disks:\n");
    if common.is_empty() {
        out.push_str("None\n");
    } else {
        out.push_str(&header());
        out.push('\n');
        for s in common {
            out.push_str(&row(s, "--"));
            out.push('\n');
        }
    }
    for (name, list) in disks {
        let partial: Vec<&SnapshotInfo> = list.iter().filter(|s| !on_all(&s.name)).collect();
        if partial.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\nList of partial (non-loadable) snapshots on '{name}':\n"
        ));
        out.push_str(&header());
        out.push('\n');
        for s in partial {
            out.push_str(&row(s, &s.id));
            out.push('\n');
        }
    }
    out.trim_end_matches('\n').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &str, size: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            vm_state_size: size,
            date_sec: 1_700_000_000,
            date_nsec: 0,
            vm_clock_nsec: 3_723_456_000_000,
            disk_size: None,
            icount: None,
        }
    }

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1_234_567), "1.18 MiB");
        assert_eq!(size_to_str(16 << 20), "16 MiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
    }

    #[test]
    fn rows_like_qemu_img() {
        assert_eq!(
            header(),
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
        );
        assert_eq!(
            row(&sn("1", "snap1", 0), "1"),
            "1         snap1                 0 B 2023-11-14 22:13:20 01:02:03.456           "
        );
    }

    #[test]
    fn info_snapshots_splits_common_and_partial() {
        let disks = vec![
            (
                "drive0".to_string(),
                vec![sn("1", "a", 10), sn("2", "b", 10)],
            ),
            ("drive1".to_string(), vec![sn("1", "a", 0)]),
        ];
        let text = info_snapshots(&disks);
        assert!(text.starts_with("List of snapshots present on all disks:\nID"));
        assert!(text.contains("\n--        a "), "{text}");
        assert!(text.contains("partial (non-loadable) snapshots on 'drive0'"));
        assert!(text.contains("\n2         b "), "{text}");
        assert_eq!(
            info_snapshots(&[("drive0".into(), vec![])]),
            "There is no snapshot available."
        );
    }
}
