//! Reconnecting to an NBD server that went away (QEMU's `reconnect-delay`).
//!
//! By default a connection on which a request failed stays lost, and every later request on
//! it fails until the image is opened again. With a reconnect delay of `D` seconds (the
//! drive option `reconnect-delay=D`, or `VMSNAP_NBD_RECONNECT_DELAY=D` for every export), a
//! request that finds the connection lost dials the server again, for up to `D` seconds from
//! the loss (after that, one quick attempt per request), and the request that failed is sent
//! once more on the new connection. The export must come back with the same size.
//!
//! What makes that safe is the rule on writes. QEMU's client re-sends what was in flight and
//! goes on; but a server that went away may have taken with it the writes it had
//! acknowledged and not yet flushed (a crash of its host: they were in its page cache), and
//! the qcow2 layer above keeps in memory the tables those writes changed. Going on would
//! build on metadata the disk no longer has. So a reconnect is transparent only when every
//! write acknowledged so far was covered by a successful flush (the VM's disks at rest, a
//! reader, an image between operations): the server's disk then holds everything, and a
//! request that was in flight is simply sent again. When acknowledged writes were not yet
//! flushed, the new connection serves reads until the first write, trim or flush, which fails
//! with an error that says why (reopen the image once the server is back and run `check`);
//! as after any failed write, the storage then fails what follows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nbd::client::NbdClient;

use super::nbd_wire::lock;

/// How to dial an export again: the connection's own parameters (size checked).
pub(crate) trait Redial<S: std::io::Read + std::io::Write>: Send + Sync {
    /// A new client on the export, negotiated within `within`.
    fn dial(&self, within: Duration) -> std::io::Result<NbdClient<S>>;
    /// How long after a loss requests keep dialing.
    fn delay(&self) -> Duration;
}

/// Pause between two attempts within the delay.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// How long one attempt after the delay may take (the server is likely still gone).
const LATE_ATTEMPT: Duration = Duration::from_secs(1);

/// Reconnect delays set per URI (drive option `reconnect-delay`).
static DELAYS: Mutex<Option<HashMap<String, Duration>>> = Mutex::new(None);

/// Sets the reconnect delay for connections to `uri` opened from now on (zero: none).
pub fn set_reconnect_delay(uri: &str, delay: Duration) {
    lock(&DELAYS)
        .get_or_insert_with(HashMap::new)
        .insert(uri.to_string(), delay);
}

/// The reconnect delay for `uri`: set for it, else `VMSNAP_NBD_RECONNECT_DELAY`, else none.
pub(crate) fn delay_for(uri: &str) -> Duration {
    if let Some(d) = lock(&DELAYS).as_ref().and_then(|m| m.get(uri)) {
        return *d;
    }
    std::env::var("VMSNAP_NBD_RECONNECT_DELAY")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::ZERO, Duration::from_secs_f64)
}

/// Dials with `r` until `lost_at + r.delay()` (at least one attempt); the last error when
/// none succeeded.
pub(crate) fn redial<S: std::io::Read + std::io::Write>(
    r: &dyn Redial<S>,
    lost_at: Instant,
    normal: Duration,
) -> std::io::Result<NbdClient<S>> {
    let deadline = lost_at + r.delay();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let within = if left.is_zero() {
            LATE_ATTEMPT
        } else {
            left.min(normal).max(RETRY_EVERY)
        };
        match r.dial(within) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() + RETRY_EVERY >= deadline => return Err(e),
            Err(_) => std::thread::sleep(RETRY_EVERY),
        }
    }
}

/// Writes acknowledged and covered by flushes: a reconnect is transparent only when every
/// acknowledged write was flushed.
#[derive(Debug, Default)]
pub(crate) struct FlushState {
    /// Writes and trims acknowledged so far.
    acked: std::sync::atomic::AtomicU64,
    /// The value of `acked` the last successful flush was sent after.
    flushed: std::sync::atomic::AtomicU64,
}

impl FlushState {
    /// A write or trim was acknowledged.
    pub(crate) fn acked(&self) {
        self.acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Taken before a flush is sent; [`FlushState::flushed`] with it once it succeeded.
    pub(crate) fn mark(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The flush sent after `mark` succeeded.
    pub(crate) fn flushed(&self, mark: u64) {
        self.flushed
            .fetch_max(mark, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether some acknowledged write is not covered by a flush yet.
    pub(crate) fn unflushed(&self) -> bool {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
            != self.flushed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Never {
        delay: Duration,
        tries: AtomicU32,
    }

    impl Redial<std::io::Cursor<Vec<u8>>> for Never {
        fn dial(&self, _: Duration) -> std::io::Result<NbdClient<std::io::Cursor<Vec<u8>>>> {
            self.tries.fetch_add(1, Ordering::SeqCst);
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        }
        fn delay(&self) -> Duration {
            self.delay
        }
    }

    #[test]
    fn dialing_stops_at_the_delay_and_tries_once_after_it() {
        let r = Never {
            delay: Duration::from_millis(500),
            tries: AtomicU32::new(0),
        };
        let t = Instant::now();
        assert!(redial(&r, t, Duration::from_secs(30)).is_err());
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(r.tries.load(Ordering::SeqCst) >= 3);
        // Long after the loss: one attempt.
        let r = Never {
            delay: Duration::from_millis(100),
            tries: AtomicU32::new(0),
        };
        assert!(redial(
            &r,
            Instant::now() - Duration::from_secs(10),
            Duration::from_secs(30)
        )
        .is_err());
        assert_eq!(r.tries.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_flush_covers_only_the_writes_acknowledged_before_it_was_sent() {
        let f = FlushState::default();
        assert!(!f.unflushed());
        f.acked();
        let m = f.mark();
        f.acked(); // acknowledged while the flush was out
        f.flushed(m);
        assert!(f.unflushed());
        let m = f.mark();
        f.flushed(m);
        assert!(!f.unflushed());
    }

    #[test]
    fn a_delay_set_for_a_uri_wins_over_the_default() {
        set_reconnect_delay("nbd://example.invalid/a", Duration::from_secs(7));
        assert_eq!(delay_for("nbd://example.invalid/a"), Duration::from_secs(7));
    }
}
