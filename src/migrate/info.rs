//! What `info migrate` reports, and its text in QEMU 7.2's HMP wording.

use std::fmt::Write as _;

/// A migration's state (QEMU's MigrationStatus names).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Status {
    /// No migration yet.
    #[default]
    None,
    /// Connecting, starting dirty logging.
    Setup,
    /// Iterating while the guest runs, or in the final copy.
    Active,
    /// `migrate_cancel` seen, stopping.
    Cancelling,
    /// Stopped by `migrate_cancel`.
    Cancelled,
    /// Done: the destination has the whole stream.
    Completed,
    /// Postcopy: the guest runs on the destination, which still takes pages from here.
    PostcopyActive,
    /// Postcopy broke: the guest's RAM is split between the two sides, the guest is paused
    /// here and its pages are kept (QEMU's `postcopy-paused`); why.
    PostcopyPaused(String),
    /// Postcopy paused, a new channel being set up (`migrate -r`, `migrate_recover`; QEMU's
    /// `postcopy-recover`).
    PostcopyRecover,
    /// Stopped on an error (the message).
    Failed(String),
}

impl Status {
    /// QEMU's name.
    pub fn name(&self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
            Status::Completed => "completed",
            Status::PostcopyActive => "postcopy-active",
            Status::PostcopyPaused(_) => "postcopy-paused",
            Status::PostcopyRecover => "postcopy-recover",
            Status::Failed(_) => "failed",
        }
    }

    /// Whether a migration is under way.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Status::Setup
                | Status::Active
                | Status::Cancelling
                | Status::PostcopyActive
                | Status::PostcopyRecover
        )
    }
}

/// RAM figures (QEMU's MigrationStats).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RamInfo {
    /// Bytes of stream sent.
    pub transferred: u64,
    /// Dirty bytes not sent yet.
    pub remaining: u64,
    /// Guest RAM.
    pub total: u64,
    /// Zero pages sent.
    pub duplicate: u64,
    /// Pages sent with data.
    pub normal: u64,
    /// Dirty bitmap syncs.
    pub dirty_sync_count: u64,
    /// Page size.
    pub page_size: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Pages sent per second (last period).
    pub pages_per_second: u64,
    /// Pages dirtied per second (last period of a second or more).
    pub dirty_pages_rate: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Pages the destination asked for during postcopy.
    pub postcopy_requests: u64,
    /// Bytes sent during postcopy.
    pub postcopy_bytes: u64,
}

/// XBZRLE figures (QEMU's `XBZRLECacheStats`), shown while the capability is on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct XbzrleInfo {
    /// Bytes the page cache may hold.
    pub cache_size: u64,
    /// Bytes of XBZRLE records (without their 8-byte record word), plus a page per overflow.
    pub bytes: u64,
    /// Pages found in the cache (encoded, unchanged or overflowed).
    pub pages: u64,
    /// Pages not found in the cache.
    pub cache_miss: u64,
    /// Cache misses per page sent, over the last period.
    pub cache_miss_rate: f64,
    /// Page bytes per encoded byte, over the last period.
    pub encoding_rate: f64,
    /// Pages whose encoding did not fit a page.
    pub overflow: u64,
}

/// Everything `info migrate` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationInfo {
    /// State.
    pub status: Status,
    /// Since the start (to the end once finished), ms.
    pub total_time_ms: u64,
    /// While active: pending RAM over the measured bandwidth, ms.
    pub expected_downtime_ms: Option<u64>,
    /// Once completed: from stopping the vCPUs to the destination having the whole stream
    /// (see formats/live-migration.md), ms.
    pub downtime_ms: Option<u64>,
    /// Connecting and starting dirty logging, ms.
    pub setup_ms: Option<u64>,
    /// RAM figures, once RAM is being sent.
    pub ram: Option<RamInfo>,
    /// XBZRLE figures, while the capability is on.
    pub xbzrle: Option<XbzrleInfo>,
    /// Disk figures of a block migration (`migrate -b`).
    pub disk: Option<super::block::send::DiskCounters>,
    /// vCPU throttle while auto-converge is on and active.
    pub cpu_throttle_percentage: Option<u32>,
    /// Destination: the sockets it listens on until the stream is loaded.
    pub socket_addresses: Vec<String>,
    /// A destination's view: QEMU shows no times there.
    pub destination: bool,
}

/// QEMU 7.2's `migration_global_dump` lines (our stream matches these settings).
const GLOBALS: &str = "globals:\n\
store-global-state: on\n\
only-migratable: off\n\
send-configuration: on\n\
send-section-footer: on\n\
decompress-error-check: on\n\
clear-bitmap-shift: 18";

impl MigrationInfo {
    /// The `info migrate` text.
    pub fn to_hmp(&self) -> String {
        let mut s = String::from(GLOBALS);
        if self.status == Status::None {
            self.write_sockets(&mut s);
            return s;
        }
        let _ = write!(s, "\nMigration status: {}", self.status.name());
        if let Status::Failed(why) | Status::PostcopyPaused(why) = &self.status {
            let _ = write!(s, " ({why})");
        }
        if !self.destination {
            let _ = write!(s, "\ntotal time: {} ms", self.total_time_ms);
        }
        if let Some(ms) = self.expected_downtime_ms {
            let _ = write!(s, "\nexpected downtime: {ms} ms");
        }
        if let Some(ms) = self.downtime_ms {
            let _ = write!(s, "\ndowntime: {ms} ms");
        }
        if let Some(ms) = self.setup_ms {
            let _ = write!(s, "\nsetup: {ms} ms");
        }
        if let Some(r) = &self.ram {
            let _ = write!(
                s,
                "\ntransferred ram: {} kbytes\n\
                 throughput: {:.2} mbps\n\
                 remaining ram: {} kbytes\n\
                 total ram: {} kbytes\n\
                 duplicate: {} pages\n\
                 skipped: 0 pages\n\
                 normal: {} pages\n\
                 normal bytes: {} kbytes\n\
                 dirty sync count: {}\n\
                 page size: {} kbytes\n\
                 multifd bytes: 0 kbytes\n\
                 pages-per-second: {}",
                r.transferred >> 10,
                r.mbps,
                r.remaining >> 10,
                r.total >> 10,
                r.duplicate,
                r.normal,
                (r.normal * r.page_size) >> 10,
                r.dirty_sync_count,
                r.page_size >> 10,
                r.pages_per_second,
            );
            if r.dirty_pages_rate != 0 {
                let _ = write!(s, "\ndirty pages rate: {} pages", r.dirty_pages_rate);
            }
            if r.postcopy_requests != 0 {
                let _ = write!(s, "\npostcopy request count: {}", r.postcopy_requests);
            }
            if r.precopy_bytes != 0 {
                let _ = write!(s, "\nprecopy ram: {} kbytes", r.precopy_bytes >> 10);
            }
            if r.downtime_bytes != 0 {
                let _ = write!(s, "\ndowntime ram: {} kbytes", r.downtime_bytes >> 10);
            }
            if r.postcopy_bytes != 0 {
                let _ = write!(s, "\npostcopy ram: {} kbytes", r.postcopy_bytes >> 10);
            }
        }
        if let Some(d) = &self.disk {
            let _ = write!(
                s,
                "\ntransferred disk: {} kbytes\n\
                 remaining disk: {} kbytes\n\
                 total disk: {} kbytes",
                d.transferred >> 10,
                d.remaining >> 10,
                d.total >> 10,
            );
        }
        if let Some(x) = &self.xbzrle {
            let _ = write!(
                s,
                "\ncache size: {} bytes\n\
                 xbzrle transferred: {} kbytes\n\
                 xbzrle pages: {} pages\n\
                 xbzrle cache miss: {} pages\n\
                 xbzrle cache miss rate: {:.2}\n\
                 xbzrle encoding rate: {:.2}\n\
                 xbzrle overflow: {}",
                x.cache_size,
                x.bytes >> 10,
                x.pages,
                x.cache_miss,
                x.cache_miss_rate,
                x.encoding_rate,
                x.overflow,
            );
        }
        if let Some(p) = self.cpu_throttle_percentage {
            let _ = write!(s, "\ncpu throttle percentage: {p}");
        }
        self.write_sockets(&mut s);
        s
    }

    fn write_sockets(&self, s: &mut String) {
        if !self.socket_addresses.is_empty() {
            s.push_str("\nsocket address: [");
            for a in &self.socket_addresses {
                let _ = write!(s, "\n\t{a}");
            }
            s.push_str("\n]");
        }
    }

    /// What a destination shows: QEMU fills only the status (none while it waits for the
    /// stream) and the listening sockets.
    pub fn incoming(status: Status, socket_addresses: Vec<String>) -> Self {
        MigrationInfo {
            status,
            socket_addresses,
            destination: true,
            ..MigrationInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_shows_its_socket_then_its_status() {
        let waiting = MigrationInfo::incoming(Status::None, vec!["tcp:127.0.0.1:4455".into()]);
        // As QEMU 7.2's destination printed it while waiting (`-incoming tcp:127.0.0.1:4455`).
        assert_eq!(
            waiting.to_hmp(),
            format!("{GLOBALS}\nsocket address: [\n\ttcp:127.0.0.1:4455\n]")
        );
        let loading = MigrationInfo::incoming(Status::Active, vec!["unix:/tmp/m".into()]);
        assert!(loading
            .to_hmp()
            .ends_with("Migration status: active\nsocket address: [\n\tunix:/tmp/m\n]"));
        let done = MigrationInfo::incoming(Status::Completed, Vec::new()).to_hmp();
        assert_eq!(done, format!("{GLOBALS}\nMigration status: completed"));
    }

    #[test]
    fn xbzrle_lines_read_like_qemu_7_2() {
        let info = MigrationInfo {
            status: Status::Completed,
            xbzrle: Some(XbzrleInfo {
                cache_size: 8 << 20,
                bytes: 26 << 10,
                pages: 4096,
                cache_miss: 14050,
                cache_miss_rate: 1.0,
                encoding_rate: 0.0,
                overflow: 0,
            }),
            ..MigrationInfo::default()
        };
        // The tail of QEMU 7.2's `info migrate` after the migration that made
        // testdata/stream/qemu-xbzrle.mig.zst (tools/scripts/make-xbzrle-fixture.sh).
        assert!(info.to_hmp().ends_with(
            "cache size: 8388608 bytes\n\
             xbzrle transferred: 26 kbytes\n\
             xbzrle pages: 4096 pages\n\
             xbzrle cache miss: 14050 pages\n\
             xbzrle cache miss rate: 1.00\n\
             xbzrle encoding rate: 0.00\n\
             xbzrle overflow: 0"
        ));
    }

    #[test]
    fn nothing_yet_prints_the_globals_only() {
        let s = MigrationInfo::default().to_hmp();
        assert!(s.starts_with("globals:\nstore-global-state: on\n"));
        assert!(s.ends_with("clear-bitmap-shift: 18"));
        assert!(!s.contains("Migration status"));
    }

    #[test]
    fn completed_reads_like_qemu_7_2() {
        let info = MigrationInfo {
            status: Status::Completed,
            total_time_ms: 14,
            downtime_ms: Some(2),
            setup_ms: Some(1),
            ram: Some(RamInfo {
                transferred: 341 << 10,
                remaining: 0,
                total: 66056 << 10,
                duplicate: 16465,
                normal: 49,
                dirty_sync_count: 2,
                page_size: 4096,
                mbps: 283.756,
                downtime_bytes: 341 << 10,
                ..RamInfo::default()
            }),
            ..MigrationInfo::default()
        };
        let want = "Migration status: completed\n\
            total time: 14 ms\n\
            downtime: 2 ms\n\
            setup: 1 ms\n\
            transferred ram: 341 kbytes\n\
            throughput: 283.76 mbps\n\
            remaining ram: 0 kbytes\n\
            total ram: 66056 kbytes\n\
            duplicate: 16465 pages\n\
            skipped: 0 pages\n\
            normal: 49 pages\n\
            normal bytes: 196 kbytes\n\
            dirty sync count: 2\n\
            page size: 4 kbytes\n\
            multifd bytes: 0 kbytes\n\
            pages-per-second: 0\n\
            downtime ram: 341 kbytes";
        let got = info.to_hmp();
        assert!(got.ends_with(want), "{got}");
    }

    #[test]
    fn failures_carry_their_reason_and_active_shows_expectations() {
        let info = MigrationInfo {
            status: Status::Failed("Unable to write to socket: Broken pipe".into()),
            total_time_ms: 5,
            ..MigrationInfo::default()
        };
        assert!(info.to_hmp().contains(
            "Migration status: failed (Unable to write to socket: Broken pipe)\ntotal time: 5 ms"
        ));
        let info = MigrationInfo {
            status: Status::Active,
            expected_downtime_ms: Some(300),
            cpu_throttle_percentage: Some(20),
            ..MigrationInfo::default()
        };
        let s = info.to_hmp();
        assert!(s.contains("expected downtime: 300 ms"));
        assert!(s.ends_with("cpu throttle percentage: 20"));
        assert!(Status::Setup.is_active() && !Status::Cancelled.is_active());
    }
}
