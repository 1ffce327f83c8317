//! The arithmetic of pre-copy, kept apart from I/O so that it can be tested alone:
//! bandwidth measured per period, the rate limit, QEMU's auto-converge trigger, and the
//! decision to stop the guest for the final copy.

use std::time::{Duration, Instant};

/// QEMU's `BUFFER_DELAY`: the rate limiter's window and the bandwidth update period.
pub const PERIOD: Duration = Duration::from_millis(100);

/// Bandwidth measured per period of at least [`PERIOD`] (QEMU's
/// `migration_update_counters`), over the time spent sending or waiting for the rate
/// limiter: time the loop spends with nothing to send does not lower the estimate.
#[derive(Debug, Clone)]
pub struct BandwidthMeter {
    start: Instant,
    start_bytes: u64,
    start_pages: u64,
    busy: Duration,
    /// Bytes per millisecond over the last period (0 until the first period ends).
    pub bytes_per_ms: f64,
    /// Pages sent per second over the last period.
    pub pages_per_second: u64,
}

impl BandwidthMeter {
    /// A meter starting now at `bytes` sent.
    pub fn new(now: Instant, bytes: u64) -> Self {
        BandwidthMeter {
            start: now,
            start_bytes: bytes,
            start_pages: 0,
            busy: Duration::ZERO,
            bytes_per_ms: 0.0,
            pages_per_second: 0,
        }
    }

    /// Counts `d` as time spent sending (or held back by the rate limit).
    pub fn add_busy(&mut self, d: Duration) {
        self.busy += d;
    }

    /// Ends the period if it is long enough; returns whether the estimate changed.
    pub fn update(&mut self, now: Instant, bytes: u64, pages: u64) -> bool {
        let spent = now.saturating_duration_since(self.start);
        if spent < PERIOD {
            return false;
        }
        let sent = bytes.saturating_sub(self.start_bytes);
        let busy_ms = self.busy.min(spent).as_secs_f64() * 1000.0;
        let changed = sent > 0 && busy_ms > 0.0;
        if changed {
            self.bytes_per_ms = sent as f64 / busy_ms;
        }
        let ms = spent.as_secs_f64() * 1000.0;
        self.pages_per_second =
            (pages.saturating_sub(self.start_pages) as f64 * 1000.0 / ms) as u64;
        self.start = now;
        self.start_bytes = bytes;
        self.start_pages = pages;
        self.busy = Duration::ZERO;
        changed
    }

    /// Bytes that can be sent within `limit_ms` at the measured bandwidth (QEMU's
    /// threshold_size).
    pub fn threshold(&self, limit_ms: u64) -> u64 {
        (self.bytes_per_ms * limit_ms as f64) as u64
    }

    /// Time `pending` bytes would take, in ms (QEMU's expected_downtime).
    pub fn expected_ms(&self, pending: u64) -> Option<u64> {
        (self.bytes_per_ms > 0.0).then(|| (pending as f64 / self.bytes_per_ms) as u64)
    }
}

/// `max-bandwidth` enforced per [`PERIOD`] window, as QEMU's rate-limited QEMUFile.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_window: u64,
    window_start: Instant,
    window_bytes: u64,
}

impl RateLimiter {
    /// A limiter for `bytes_per_second` (0 = none).
    pub fn new(bytes_per_second: u64, now: Instant, bytes: u64) -> Self {
        RateLimiter {
            per_window: bytes_per_second / (1000 / PERIOD.as_millis() as u64),
            window_start: now,
            window_bytes: bytes,
        }
    }

    /// How many bytes may be sent now (`u64::MAX` without a limit), or how long to wait
    /// for the next window.
    pub fn allowance(&mut self, now: Instant, bytes: u64) -> Result<u64, Duration> {
        if self.per_window == 0 {
            return Ok(u64::MAX);
        }
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= PERIOD {
            self.window_start = now;
            self.window_bytes = bytes;
        }
        let used = bytes.saturating_sub(self.window_bytes);
        if used >= self.per_window {
            return Err(PERIOD.saturating_sub(elapsed).max(Duration::from_millis(1)));
        }
        Ok(self.per_window - used)
    }
}

/// Throttle settings (the migration parameters of the same names).
#[derive(Debug, Clone, Copy)]
pub struct ThrottleParams {
    /// throttle-trigger-threshold, percent.
    pub trigger: u8,
    /// cpu-throttle-initial, percent.
    pub initial: u8,
    /// cpu-throttle-increment, percent.
    pub increment: u8,
    /// max-cpu-throttle, percent.
    pub max: u8,
}

/// Dirty-rate bookkeeping at each bitmap sync and QEMU's `migration_trigger_throttle`.
#[derive(Debug, Clone)]
pub struct DirtyPeriod {
    params: ThrottleParams,
    auto_converge: bool,
    start: Instant,
    xfer_at_start: u64,
    dirty_pages: u64,
    high_count: u32,
    /// Current throttle, percent (0 = not throttling).
    pub throttle: u32,
    /// Pages dirtied per second over the last complete period.
    pub dirty_pages_rate: u64,
}

impl DirtyPeriod {
    /// Starts the first period now with `xfer` bytes sent.
    pub fn new(params: ThrottleParams, auto_converge: bool, now: Instant, xfer: u64) -> Self {
        DirtyPeriod {
            params,
            auto_converge,
            start: now,
            xfer_at_start: xfer,
            dirty_pages: 0,
            high_count: 0,
            throttle: 0,
            dirty_pages_rate: 0,
        }
    }

    /// Records a sync that found `new_dirty` newly dirty pages; once a period of more than
    /// a second is over, decides on throttling. Returns the new throttle percentage when it
    /// changes.
    pub fn on_sync(
        &mut self,
        now: Instant,
        xfer: u64,
        new_dirty: u64,
        page_size: u64,
    ) -> Option<u32> {
        self.dirty_pages += new_dirty;
        let spent = now.saturating_duration_since(self.start);
        if spent <= Duration::from_secs(1) {
            return None;
        }
        let xfer_period = xfer.saturating_sub(self.xfer_at_start);
        let dirty_bytes = self.dirty_pages.saturating_mul(page_size);
        let threshold = xfer_period.saturating_mul(u64::from(self.params.trigger)) / 100;
        let mut changed = None;
        if self.auto_converge && dirty_bytes > threshold {
            self.high_count += 1;
            if self.high_count >= 2 {
                self.high_count = 0;
                let next = if self.throttle == 0 {
                    u32::from(self.params.initial)
                } else {
                    (self.throttle + u32::from(self.params.increment))
                        .min(u32::from(self.params.max))
                };
                if next != self.throttle {
                    self.throttle = next;
                    changed = Some(next);
                }
            }
        }
        self.dirty_pages_rate = (self.dirty_pages as f64 / spent.as_secs_f64()) as u64;
        self.start = now;
        self.xfer_at_start = xfer;
        self.dirty_pages = 0;
        changed
    }
}

/// When to stop the guest. QEMU stops as soon as the dirty remainder fits the downtime
/// limit at the measured bandwidth. We require that too, but then keep going while each
/// round still shrinks the remainder markedly, and stop once it would take less than
/// `settle_ms` to send (or stops shrinking, or after `max_settle_rounds` rounds): the
/// remainder of a guest that dirties slower than we send gets small fast, and the
/// downtime with it.
#[derive(Debug, Clone)]
pub struct StopRule {
    /// Downtime aimed at once within the limit, ms.
    pub settle_ms: u64,
    /// Most extra rounds after the remainder first fits the limit.
    pub max_settle_rounds: u32,
    last: Option<u64>,
    rounds: u32,
}

impl StopRule {
    /// A rule aiming at `settle_ms`.
    pub fn new(settle_ms: u64, max_settle_rounds: u32) -> Self {
        StopRule {
            settle_ms,
            max_settle_rounds,
            last: None,
            rounds: 0,
        }
    }

    /// Decides after a sync: `pending` dirty bytes, `meter` the bandwidth, `limit_ms` the
    /// downtime limit.
    pub fn should_stop(&mut self, pending: u64, meter: &BandwidthMeter, limit_ms: u64) -> bool {
        if pending == 0 {
            return true;
        }
        if meter.bytes_per_ms <= 0.0 || pending > meter.threshold(limit_ms) {
            self.last = None;
            self.rounds = 0;
            return false;
        }
        if pending <= meter.threshold(self.settle_ms.min(limit_ms)) {
            return true;
        }
        let shrinking = self.last.map_or(true, |prev| pending < prev - prev / 8);
        self.last = Some(pending);
        self.rounds += 1;
        !shrinking || self.rounds > self.max_settle_rounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ThrottleParams = ThrottleParams {
        trigger: 50,
        initial: 20,
        increment: 10,
        max: 99,
    };

    #[test]
    fn meter_measures_per_period() {
        let t0 = Instant::now();
        let mut m = BandwidthMeter::new(t0, 0);
        assert!(!m.update(t0 + Duration::from_millis(50), 1000, 1));
        m.add_busy(Duration::from_millis(100));
        // 2 MB in 100 ms of sending within a 200 ms period: 20 kB/ms.
        assert!(m.update(t0 + Duration::from_millis(200), 2_000_000, 400));
        assert!((m.bytes_per_ms - 20_000.0).abs() < 1.0);
        assert_eq!(m.pages_per_second, 2000);
        m.add_busy(Duration::from_millis(50));
        assert!(m.update(t0 + Duration::from_millis(300), 3_000_000, 400));
        assert!((m.bytes_per_ms - 20_000.0).abs() < 1.0);
        // Nothing sent: the estimate stays.
        assert!(!m.update(t0 + Duration::from_millis(400), 3_000_000, 400));
        assert!((m.bytes_per_ms - 20_000.0).abs() < 1.0);
        assert_eq!(m.pages_per_second, 0);
        m.bytes_per_ms = 10_000.0;
        assert_eq!(m.threshold(300), 3_000_000);
        assert_eq!(m.expected_ms(50_000), Some(5));
    }

    #[test]
    fn limiter_allows_a_tenth_per_window() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1000, t0, 0);
        assert_eq!(l.allowance(t0, 0), Ok(100));
        assert_eq!(l.allowance(t0, 60), Ok(40));
        let wait = l
            .allowance(t0 + Duration::from_millis(30), 100)
            .unwrap_err();
        assert_eq!(wait, Duration::from_millis(70));
        assert_eq!(l.allowance(t0 + Duration::from_millis(100), 100), Ok(100));
        let mut free = RateLimiter::new(0, t0, 0);
        assert_eq!(free.allowance(t0, 1 << 40), Ok(u64::MAX));
    }

    #[test]
    fn auto_converge_steps_like_qemu() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_millis(1100 * n);
        let mut d = DirtyPeriod::new(P, true, t0, 0);
        // Short periods do not count.
        assert_eq!(
            d.on_sync(t0 + Duration::from_millis(500), 10, 1000, 4096),
            None
        );
        // Dirtied 4 MB vs 1 MB sent: high, once.
        assert_eq!(d.on_sync(s(1), 1_000_000, 0, 4096), None);
        assert!(d.dirty_pages_rate > 800);
        assert_eq!(d.on_sync(s(2), 2_000_000, 1000, 4096), Some(20));
        assert_eq!(d.on_sync(s(3), 3_000_000, 1000, 4096), None);
        assert_eq!(d.on_sync(s(4), 4_000_000, 1000, 4096), Some(30));
        // Low dirtying: no change.
        assert_eq!(d.on_sync(s(5), 104_000_000, 1, 4096), None);
        let mut d = DirtyPeriod::new(P, true, t0, 0);
        d.throttle = 95;
        d.on_sync(s(1), 0, 10, 4096);
        assert_eq!(d.on_sync(s(2), 0, 10, 4096), Some(99));
        let mut off = DirtyPeriod::new(P, false, t0, 0);
        off.on_sync(s(1), 0, 10, 4096);
        assert_eq!(off.on_sync(s(2), 0, 10, 4096), None);
    }

    #[test]
    fn stop_rule_waits_for_the_limit_then_settles() {
        let t0 = Instant::now();
        let mut m = BandwidthMeter::new(t0, 0);
        let mut r = StopRule::new(10, 5);
        // No estimate yet: only an empty remainder stops.
        assert!(!r.should_stop(1, &m, 300));
        assert!(r.should_stop(0, &m, 300));
        m.add_busy(Duration::from_millis(100));
        m.update(t0 + Duration::from_millis(100), 100_000_000, 0); // 1 MB/ms
        assert!(!r.should_stop(400_000_000, &m, 300));
        // Fits 300 ms, still shrinking: go on.
        assert!(!r.should_stop(200_000_000, &m, 300));
        assert!(!r.should_stop(100_000_000, &m, 300));
        // Stopped shrinking: stop.
        assert!(r.should_stop(95_000_000, &m, 300));
        let mut r = StopRule::new(10, 5);
        assert!(r.should_stop(9_000_000, &m, 300));
        // A lower limit wins over settle_ms.
        let mut r = StopRule::new(10, 5);
        assert!(!r.should_stop(9_000_000, &m, 5));
        let mut r = StopRule::new(10, 2);
        assert!(!r.should_stop(200_000_000, &m, 300));
        assert!(!r.should_stop(100_000_000, &m, 300));
        assert!(r.should_stop(50_000_000, &m, 300));
    }
}
