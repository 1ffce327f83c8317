//! How fast the guest dirties its RAM, measured as QEMU's `calc-dirty-rate` does in its
//! default mode, `page-sampling` (QEMU's migration/dirtyrate.c): hash a random sample of
//! guest pages, wait the period, hash them again; the share of changed pages times the RAM
//! size over the period is the rate in MB/s. It reads guest RAM only, so it runs beside a
//! migration or a live savevm (which own the dirty log) and never pauses the guest. Its
//! point here: both sides of a migration comparison can show what their guests really dirty
//! (QEMU under TCG, vmsnap under KVM), each with the same method.
//!
//! QEMU's HMP `calc_dirty_rate [-r] [-b] second [sample_pages_per_GB]` / `info dirty_rate`
//! and QMP `calc-dirty-rate` / `query-dirty-rate`, with QEMU 7.2's words and fields; its
//! `start-time` is the host's monotonic clock in seconds (QEMU 7.2 prints it with "(ms)").
//! Differences: the `dirty-ring` and `dirty-bitmap` modes are refused (QEMU 7.2 under TCG
//! crashes on both); a guest under 128 MiB is sampled too (QEMU skips such RAM blocks),
//! with at least `sample-pages` pages or all of them; one measurement per process, as in
//! QEMU.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Shortest `calc-time`, seconds.
pub const MIN_CALC_TIME: u64 = 1;
/// Longest `calc-time`, seconds.
pub const MAX_CALC_TIME: u64 = 60;
/// Sampled pages per GiB of RAM when not given.
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;
const PAGE: u64 = 4096;

/// Where a measurement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No measurement yet.
    Unstarted,
    /// One runs.
    Measuring,
    /// The last one is done.
    Measured,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Unstarted => "unstarted",
            Status::Measuring => "measuring",
            Status::Measured => "measured",
        }
    }
}

/// The last measurement (QEMU's `DirtyRateInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRateInfo {
    /// Where it is.
    pub status: Status,
    /// Host monotonic clock at the start, seconds.
    pub start_time: u64,
    /// The period, seconds.
    pub calc_time: u64,
    /// Sampled pages per GiB.
    pub sample_pages: u64,
    /// MB/s, once measured.
    pub dirty_rate: Option<u64>,
}

static LAST: Mutex<DirtyRateInfo> = Mutex::new(DirtyRateInfo {
    status: Status::Unstarted,
    start_time: 0,
    calc_time: 0,
    sample_pages: 0,
    dirty_rate: None,
});

fn last() -> std::sync::MutexGuard<'static, DirtyRateInfo> {
    LAST.lock().unwrap_or_else(|e| e.into_inner())
}

/// A refused `calc-dirty-rate`, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyRateError {
    /// `calc-time` outside 1..=60.
    #[error("calc-time is out of range[{MIN_CALC_TIME}, {MAX_CALC_TIME}].")]
    CalcTime,
    /// A measurement runs.
    #[error("the dirty rate is already being measured.")]
    Busy,
    /// A mode other than page-sampling.
    #[error("mode {0} is not enabled, use other method instead.")]
    Mode(String),
    /// `sample-pages` 0 or beyond 32 bits.
    #[error("sample-pages is out of range[1, {max}].", max = u32::MAX)]
    SamplePages,
}

/// The last measurement.
pub fn query() -> DirtyRateInfo {
    *last()
}

/// Starts measuring the dirty rate of `mem` over `calc_time` seconds in a thread of its own;
/// `mode` as QMP names it (only `page-sampling`), `sample_pages` per GiB.
pub fn start(
    mem: &GuestMemoryMmap,
    calc_time: u64,
    sample_pages: Option<u64>,
    mode: Option<&str>,
) -> Result<(), DirtyRateError> {
    if let Some(m) = mode.filter(|m| *m != "page-sampling") {
        return Err(DirtyRateError::Mode(m.to_string()));
    }
    if !(MIN_CALC_TIME..=MAX_CALC_TIME).contains(&calc_time) {
        return Err(DirtyRateError::CalcTime);
    }
    let per_gib = sample_pages.unwrap_or(DEFAULT_SAMPLE_PAGES);
    if per_gib == 0 || per_gib > u64::from(u32::MAX) {
        return Err(DirtyRateError::SamplePages);
    }
    let mut info = last();
    if info.status == Status::Measuring {
        return Err(DirtyRateError::Busy);
    }
    *info = DirtyRateInfo {
        status: Status::Measuring,
        start_time: monotonic_secs(),
        calc_time,
        sample_pages: per_gib,
        dirty_rate: None,
    };
    drop(info);
    let mem = mem.clone();
    let spawned = std::thread::Builder::new()
        .name("dirty-rate".into())
        .spawn(move || {
            let rate = measure(&mem, Duration::from_secs(calc_time), per_gib);
            let mut info = last();
            info.status = Status::Measured;
            info.dirty_rate = Some(rate);
        });
    if spawned.is_err() {
        // No thread, no measurement: report a rate of nothing rather than measure forever.
        let mut info = last();
        info.status = Status::Measured;
        info.dirty_rate = Some(0);
    }
    Ok(())
}

fn monotonic_secs() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| u64::try_from(t.tv_sec()).unwrap_or(0))
}

/// The sampled page numbers for `pages` pages of RAM at `per_gib` per GiB: at least
/// `per_gib` (or every page of a smaller RAM), spread by a xorshift generator.
fn sample(pages: u64, per_gib: u64, seed: u64) -> Vec<u64> {
    if pages == 0 {
        return Vec::new();
    }
    let by_size = (pages * PAGE).div_ceil(1 << 30).saturating_mul(per_gib);
    let n = by_size.max(per_gib).min(pages);
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        })
        .collect()
}

/// CRC-32 of each sampled page (a page that cannot be read hashes as 0).
fn hashes(mem: &GuestMemoryMmap, pages: &[u64], buf: &mut [u8]) -> Vec<u32> {
    pages
        .iter()
        .map(|&p| match mem.read_slice(buf, GuestAddress(p * PAGE)) {
            Ok(()) => crc32fast::hash(buf),
            Err(_) => 0,
        })
        .collect()
}

/// Measures over `period`: MB/s, QEMU's formula (dirty samples × RAM MB × 1000 / (samples ×
/// ms)).
fn measure(mem: &GuestMemoryMmap, period: Duration, per_gib: u64) -> u64 {
    let ram: u64 = mem.iter().map(GuestMemoryRegion::len).sum();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
    let pages = sample(ram / PAGE, per_gib, seed);
    let mut buf = vec![0u8; PAGE as usize];
    let start = Instant::now();
    let before = hashes(mem, &pages, &mut buf);
    std::thread::sleep(period.saturating_sub(start.elapsed()));
    let after = hashes(mem, &pages, &mut buf);
    let ms = u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let dirty = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u64;
    rate(dirty, pages.len() as u64, ram >> 20, ms)
}

fn rate(dirty: u64, samples: u64, ram_mb: u64, ms: u64) -> u64 {
    if samples == 0 {
        return 0;
    }
    let r = u128::from(dirty) * u128::from(ram_mb) * 1000 / (u128::from(samples) * u128::from(ms));
    u64::try_from(r).unwrap_or(u64::MAX)
}

impl DirtyRateInfo {
    /// `info dirty_rate`'s reply (QEMU 7.2's lines).
    pub fn to_hmp(&self) -> String {
        let rate = match self.dirty_rate {
            Some(r) => format!("{r} (MB/s)"),
            None => "(not ready)".into(),
        };
        format!(
            "Status: {}\nStart Time: {} (ms)\nSample Pages: {} (per GB)\nPeriod: {} (sec)\n\
             Mode: page-sampling\nDirty rate: {rate}",
            self.status.name(),
            self.start_time,
            self.sample_pages,
            self.calc_time
        )
    }

    /// `query-dirty-rate`'s return value.
    pub fn to_qmp(&self) -> Value {
        let mut v = json!({
            "status": self.status.name(),
            "start-time": self.start_time,
            "calc-time": self.calc_time,
            "sample-pages": self.sample_pages,
            "mode": "page-sampling",
        });
        if let Some(r) = self.dirty_rate {
            v["dirty-rate"] = json!(r);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_scale_with_ram_and_stay_in_range() {
        let s = sample(262_144, 512, 42); // 1 GiB
        assert_eq!(s.len(), 512);
        assert!(s.iter().all(|&p| p < 262_144));
        assert_eq!(sample(4 * 262_144, 512, 42).len(), 2048);
        assert_eq!(sample(4096, 512, 42).len(), 512); // 16 MiB: not skipped
        assert_eq!(sample(100, 512, 42).len(), 100);
        assert!(sample(0, 512, 42).is_empty());
    }

    #[test]
    fn rate_is_qemus_formula() {
        // A fifth of 1024 MB changed in one second.
        assert_eq!(rate(100, 500, 1024, 1000), 204);
        assert_eq!(rate(0, 500, 1024, 1000), 0);
        assert_eq!(rate(5, 0, 1024, 1000), 0);
    }

    #[test]
    fn a_measurement_sees_the_pages_that_change() {
        // 4 MiB: every one of the 512 sampled pages out of 1024 changes, or none.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        assert_eq!(measure(&mem, Duration::from_millis(200), 512), 0);
        let writer = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                for p in 0..1024u64 {
                    mem.write_obj(0xdead_beef_u64 + p, GuestAddress(p * PAGE))
                        .unwrap();
                }
            })
        };
        // 4 MB changed in about 0.4 s.
        let r = measure(&mem, Duration::from_millis(400), 512);
        writer.join().unwrap();
        assert!((5..=10).contains(&r), "{r} MB/s");
    }

    #[test]
    fn requests_are_checked_and_the_result_reads_like_qemus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        assert_eq!(start(&mem, 0, None, None), Err(DirtyRateError::CalcTime));
        assert_eq!(start(&mem, 61, None, None), Err(DirtyRateError::CalcTime));
        assert_eq!(
            start(&mem, 1, None, Some("dirty-ring"))
                .unwrap_err()
                .to_string(),
            "mode dirty-ring is not enabled, use other method instead."
        );
        assert_eq!(query().status, Status::Unstarted);
        start(&mem, 1, Some(256), None).unwrap();
        assert_eq!(start(&mem, 1, None, None), Err(DirtyRateError::Busy));
        let q = query();
        assert_eq!(q.status, Status::Measuring);
        assert!(q.to_hmp().ends_with(
            "Sample Pages: 256 (per GB)\nPeriod: 1 (sec)\nMode: page-sampling\nDirty rate: (not ready)"
        ));
        assert!(q.to_qmp().get("dirty-rate").is_none());
        let deadline = Instant::now() + Duration::from_secs(5);
        while query().status == Status::Measuring && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let q = query();
        assert_eq!(q.status, Status::Measured);
        assert_eq!(q.to_qmp()["dirty-rate"], 0);
        assert_eq!(q.to_qmp()["mode"], "page-sampling");
        assert!(q.to_hmp().starts_with("Status: measured\nStart Time: "));
        assert!(q.to_hmp().ends_with("Dirty rate: 0 (MB/s)"));
    }
}
