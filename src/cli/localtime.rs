//! Local time for `snapshot -l`'s DATE column, through the `jiff` time-zone library.
//!
//! QEMU formats snapshot dates with glibc's `localtime_r`. jiff reads the same zone data the
//! same way: `$TZ` (a zone name under the system zoneinfo directory, a `:`-prefixed or
//! absolute path to a TZif file, or a POSIX TZ string such as `EST5EDT,M3.2.0,M11.1.0`), else
//! `/etc/localtime`; after the last transition a TZif file lists, its POSIX footer rule gives
//! the daylight-saving changes (RFC 8536 section 3.3), as in glibc. Zones it cannot read are
//! UTC, as glibc falls back to UTC.

use jiff::tz::{Offset, TimeZone};
use jiff::Timestamp;

/// The UTC offset in seconds at `t` (seconds since the epoch) from TZif data; `None` if the
/// data is not valid TZif.
pub fn offset_from_tzif(data: &[u8], t: i64) -> Option<i64> {
    let tz = TimeZone::tzif("tzif", data).ok()?;
    let ts = Timestamp::from_second(t).ok()?;
    Some(i64::from(tz.to_offset(ts).seconds()))
}

/// The local UTC offset in seconds at `t`; 0 (UTC) when no zone data can be read.
pub fn local_offset(t: i64) -> i64 {
    Timestamp::from_second(t).map_or(0, |ts| {
        i64::from(TimeZone::system().to_offset(ts).seconds())
    })
}

/// `strftime("%Y-%m-%d %H:%M:%S")` of `t` shifted by `offset` seconds.
pub fn format_datetime(t: i64, offset: i64) -> String {
    let zoned = i32::try_from(offset)
        .ok()
        .and_then(|o| Offset::from_seconds(o).ok())
        .zip(Timestamp::from_second(t).ok())
        .map(|(o, ts)| ts.to_zoned(TimeZone::fixed(o)));
    match zoned {
        Some(z) => z.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        // Outside jiff's range (years -9999..=9999): snapshot dates are u32 seconds, so never.
        None => format!("@{t}"),
    }
}

/// Local date and time of `t`, as QEMU prints snapshot dates.
pub fn format_local(t: i64) -> String {
    format_datetime(t, local_offset(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tzif(version: u8, transitions: &[(i64, u8)], offsets: &[i32]) -> Vec<u8> {
        let hdr = |v: &mut Vec<u8>, tc: usize, ty: usize| {
            v.extend_from_slice(b"TZif");
            v.push(version);
            v.extend_from_slice(&[0; 15]);
            for n in [0, 0, 0, tc, ty, 4] {
                v.extend_from_slice(&(n as u32).to_be_bytes());
            }
        };
        let mut v = Vec::new();
        let body = |v: &mut Vec<u8>, wide: bool| {
            for (t, _) in transitions {
                if wide {
                    v.extend_from_slice(&t.to_be_bytes());
                } else {
                    v.extend_from_slice(&(*t as i32).to_be_bytes());
                }
            }
            v.extend(transitions.iter().map(|(_, i)| *i));
            for o in offsets {
                v.extend_from_slice(&o.to_be_bytes());
                v.extend_from_slice(&[0, 0]);
            }
            // The abbreviation of every type: the footer's (a TZif reader may check that the
            // last transition agrees with the footer rule).
            v.extend_from_slice(b"CET\0");
        };
        hdr(&mut v, transitions.len(), offsets.len());
        body(&mut v, false);
        if version >= b'2' {
            hdr(&mut v, transitions.len(), offsets.len());
            body(&mut v, true);
            v.extend_from_slice(b"\nCET-1\n");
        }
        v
    }

    #[test]
    fn formats_fixture_dates() {
        // snap-basic: date-sec 1795321730 is shown as 2026-11-22 04:28:50 in UTC.
        assert_eq!(format_datetime(1_795_321_730, 0), "2026-11-22 04:28:50");
        assert_eq!(format_datetime(0, 0), "1970-01-01 00:00:00");
        assert_eq!(format_datetime(951_782_400, 0), "2000-02-29 00:00:00");
        assert_eq!(format_datetime(0, -3600), "1969-12-31 23:00:00");
    }

    #[test]
    fn reads_tzif_offsets() {
        for version in [0u8, b'2', b'3'] {
            let data = tzif(version, &[(1000, 1), (2000, 0)], &[3600, 7200]);
            assert_eq!(offset_from_tzif(&data, 0), Some(3600));
            assert_eq!(offset_from_tzif(&data, 1500), Some(7200));
            assert_eq!(offset_from_tzif(&data, 5000), Some(3600));
        }
        assert_eq!(offset_from_tzif(b"nope", 0), None);
        let data = tzif(b'2', &[(1000, 1)], &[3600, 7200]);
        assert_eq!(offset_from_tzif(&data[..60], 0), None);
        // An index past the type table is rejected, not a panic.
        let data = tzif(0, &[(1000, 9)], &[3600]);
        assert_eq!(offset_from_tzif(&data, 5000), None);
    }

    #[test]
    fn dst_rules_after_the_last_transition_come_from_the_footer() {
        // One transition in 1970, then only the POSIX rule: central European time with
        // summer time from the last Sunday of March to the last Sunday of October.
        let mut data = tzif(b'2', &[(0, 0)], &[3600]);
        let footer = data.len() - b"\nCET-1\n".len();
        data.truncate(footer);
        data.extend_from_slice(b"\nCET-1CEST,M3.5.0,M10.5.0/3\n");
        // 2026-11-22 04:28:50 UTC: winter (+1 h); 2026-07-01 00:00 UTC: summer (+2 h).
        assert_eq!(offset_from_tzif(&data, 1_795_321_730), Some(3600));
        assert_eq!(offset_from_tzif(&data, 1_782_864_000), Some(7200));
        // The switch: 2026-03-29 01:00 UTC.
        assert_eq!(offset_from_tzif(&data, 1_774_745_999), Some(3600));
        assert_eq!(offset_from_tzif(&data, 1_774_746_000), Some(7200));
    }

    #[test]
    fn reads_the_system_zone_database() {
        let Ok(data) = std::fs::read("/usr/share/zoneinfo/Europe/Berlin") else {
            eprintln!("SKIPPED: reads_the_system_zone_database: no /usr/share/zoneinfo");
            return;
        };
        // 2026-11-22 04:28:50 UTC is winter time (+1 h), 2026-07-01 summer time (+2 h).
        assert_eq!(offset_from_tzif(&data, 1_795_321_730), Some(3600));
        assert_eq!(offset_from_tzif(&data, 1_782_864_000), Some(7200));
        assert_eq!(format_datetime(1_795_321_730, 3600), "2026-11-22 05:28:50");
    }
}
