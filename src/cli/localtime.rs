//! Local time for `snapshot -l`'s DATE column, without `unsafe` or libc.
//!
//! QEMU formats snapshot dates with `localtime_r`. We read the same zone data: `$TZ` (a zone
//! name under `/usr/share/zoneinfo`, a `:`-prefixed or absolute path, or `UTC`), else
//! `/etc/localtime`, in the TZif format (RFC 8536). The UTC offset of an instant is the one of
//! the last transition at or before it. Known limit: after the last transition listed in the
//! file we keep that offset and do not evaluate the POSIX TZ footer rule, which matters only
//! for "slim" zone files of zones with daylight saving time.

use std::path::PathBuf;

/// Bytes of a zone file we are willing to read (real ones are a few KiB).
const MAX_TZIF: u64 = 1 << 20;

/// Reads big-endian integers from a byte slice without panicking.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn be32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// The counts of a TZif header.
struct Counts {
    isutc: usize,
    isstd: usize,
    leap: usize,
    time: usize,
    typ: usize,
    chr: usize,
}

fn header(r: &mut Reader<'_>) -> Option<(u8, Counts)> {
    if r.take(4)? != b"TZif" {
        return None;
    }
    let version = r.take(1)?[0];
    r.take(15)?;
    let mut n = || r.be32().map(|v| v as usize);
    Some((
        version,
        Counts {
            isutc: n()?,
            isstd: n()?,
            leap: n()?,
            time: n()?,
            typ: n()?,
            chr: n()?,
        },
    ))
}

/// The UTC offset in seconds at `t` (seconds since the epoch) from TZif data; `None` if the
/// data is not TZif.
pub fn offset_from_tzif(data: &[u8], t: i64) -> Option<i64> {
    let mut r = Reader { data, pos: 0 };
    let (version, mut c) = header(&mut r)?;
    let mut time_size = 4;
    if version >= b'2' {
        // Skip the 32-bit block; the 64-bit one follows with its own header.
        let v1 = c.time * 5 + c.typ * 6 + c.chr + c.leap * 8 + c.isstd + c.isutc;
        r.take(v1)?;
        c = header(&mut r)?.1;
        time_size = 8;
    }
    let times = r.take(c.time.checked_mul(time_size)?)?;
    let idx = r.take(c.time)?;
    let types = r.take(c.typ.checked_mul(6)?)?;
    let utoff = |i: usize| -> Option<i64> {
        let b = types.get(i * 6..i * 6 + 4)?;
        Some(i64::from(i32::from_be_bytes(b.try_into().ok()?)))
    };
    let at = |i: usize| -> Option<i64> {
        let b = times.get(i * time_size..(i + 1) * time_size)?;
        Some(if time_size == 8 {
            i64::from_be_bytes(b.try_into().ok()?)
        } else {
            i64::from(i32::from_be_bytes(b.try_into().ok()?))
        })
    };
    let mut ty = 0usize; // Before the first transition: the first type (RFC 8536 3.2).
    for i in 0..c.time {
        if at(i)? > t {
            break;
        }
        ty = usize::from(*idx.get(i)?);
    }
    utoff(ty)
}

fn zone_file() -> Option<PathBuf> {
    match std::env::var("TZ") {
        Ok(tz) => {
            let tz = tz.strip_prefix(':').unwrap_or(&tz);
            if tz.is_empty() || tz == "UTC" || tz == "UTC0" || tz == "GMT" {
                None
            } else if tz.starts_with('/') {
                Some(PathBuf::from(tz))
            } else if tz.contains("..") {
                None
            } else {
                Some(PathBuf::from("/usr/share/zoneinfo").join(tz))
            }
        }
        Err(_) => Some(PathBuf::from("/etc/localtime")),
    }
}

/// The local UTC offset in seconds at `t`; 0 (UTC) when no zone data can be read.
pub fn local_offset(t: i64) -> i64 {
    use std::io::Read;
    let Some(path) = zone_file() else { return 0 };
    let mut data = Vec::new();
    let ok = std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TZIF).read_to_end(&mut data))
        .is_ok();
    if !ok {
        return 0;
    }
    offset_from_tzif(&data, t).unwrap_or(0)
}

/// Civil date (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `strftime("%Y-%m-%d %H:%M:%S")` of `t` shifted by `offset` seconds.
pub fn format_datetime(t: i64, offset: i64) -> String {
    let s = t + offset;
    let (y, m, d) = civil_from_days(s.div_euclid(86_400));
    let secs = s.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
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
            v.extend_from_slice(b"UTC\0");
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
