//! What `info savevm` shows: the state of the last (or current) savevm, with QEMU's
//! migration status words, the bytes of VM state written, the total time and how long the
//! guest was stopped.

use std::fmt;
use std::sync::Mutex;

/// Status of a savevm, in QEMU's migration status words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStatus {
    /// Preparing: disks checked, the old snapshot of the tag deleted, the area reserved.
    Setup,
    /// Writing the VM state (while the guest runs, for `savevm -l`).
    Active,
    /// The snapshot exists on every disk.
    Completed,
    /// The save failed; no snapshot was created.
    Failed,
}

impl SaveStatus {
    /// QEMU's word for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            SaveStatus::Setup => "setup",
            SaveStatus::Active => "active",
            SaveStatus::Completed => "completed",
            SaveStatus::Failed => "failed",
        }
    }
}

/// Figures of one savevm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveInfo {
    /// Where it stands.
    pub status: SaveStatus,
    /// The snapshot's tag.
    pub tag: String,
    /// `savevm -l` (live) or plain stop-the-world.
    pub live: bool,
    /// Bytes of VM state written so far (the VM state size once completed).
    pub bytes: u64,
    /// Milliseconds since the save started (until it ended, once it has).
    pub total_time_ms: u64,
    /// Milliseconds the guest was stopped (known once completed).
    pub downtime_ms: Option<u64>,
    /// Pre-copy rounds, each starting with a dirty-log sync (live only).
    pub dirty_sync_count: u64,
    /// Bytes still dirty at the last sync (live only).
    pub remaining: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl SaveInfo {
    /// A save of `tag` just starting.
    pub fn setup(tag: &str, live: bool) -> Self {
        SaveInfo {
            status: SaveStatus::Setup,
            tag: tag.to_string(),
            live,
            bytes: 0,
            total_time_ms: 0,
            downtime_ms: None,
            dirty_sync_count: 0,
            remaining: 0,
            error: None,
        }
    }
}

impl fmt::Display for SaveInfo {
    /// The lines of `info savevm`, in the style of QEMU's `info migrate`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "savevm status: {}", self.status.as_str())?;
        writeln!(f, "tag: {}", self.tag)?;
        writeln!(f, "mode: {}", if self.live { "live" } else { "stop" })?;
        writeln!(f, "bytes: {}", self.bytes)?;
        writeln!(f, "total time: {} ms", self.total_time_ms)?;
        if let Some(d) = self.downtime_ms {
            writeln!(f, "downtime: {d} ms")?;
        }
        if self.live {
            writeln!(f, "dirty sync count: {}", self.dirty_sync_count)?;
            writeln!(f, "remaining: {}", self.remaining)?;
        }
        if let Some(e) = &self.error {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

/// The last savevm's figures, shared by the save and the monitor (one VM per process).
static BOARD: Mutex<Option<SaveInfo>> = Mutex::new(None);

/// Publishes `info` as the current savevm's figures.
pub fn publish(info: &SaveInfo) {
    *BOARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
}

/// The figures of the last savevm, or `None` if there was none.
pub fn last() -> Option<SaveInfo> {
    BOARD.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `info savevm`'s reply.
pub fn info_savevm() -> String {
    match last() {
        Some(i) => i.to_string().trim_end().to_string(),
        None => "savevm status: none".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_lines_use_qemu_status_words() {
        let mut i = SaveInfo::setup("t1", true);
        assert!(i
            .to_string()
            .starts_with("savevm status: setup\ntag: t1\nmode: live\n"));
        i.status = SaveStatus::Completed;
        i.bytes = 1234;
        i.total_time_ms = 56;
        i.downtime_ms = Some(7);
        let s = i.to_string();
        for line in [
            "savevm status: completed",
            "bytes: 1234",
            "total time: 56 ms",
            "downtime: 7 ms",
            "dirty sync count: 0",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} in {s}");
        }
        i.live = false;
        i.status = SaveStatus::Failed;
        i.error = Some("disk full".into());
        let s = i.to_string();
        assert!(s.contains("mode: stop\n") && s.contains("error: disk full"));
        assert!(!s.contains("dirty sync"));
        assert_eq!(SaveStatus::Active.as_str(), "active");
    }
}
