//! Live migration: QEMU-style pre-copy of a running [`Vm`] to another vmsnap (or to a file
//! or command), in the same stream format savevm writes.
//!
//! ```text
//!  monitor ──start/cancel/info──▶ Migrator ◀──serve(vm)── migration thread
//!                                    │                         │ source::migrate
//!                                    │ params, capabilities    ├─ uri::Outgoing (tcp/unix/exec/file)
//!                                    │ MigrationInfo           ├─ live_ram (dirty-log driven RAM,
//!                                    │                         │  xbzrle_send for re-sent pages)
//!                                    ▼                         ├─ converge (bandwidth, limit, throttle)
//!                                 info::to_hmp                 └─ disks (lock handover)
//!  --incoming URI ──▶ incoming::run: uri::Listener → load_state → activate disks → resume
//! ```
//!
//! The wire format and the phases are described in `formats/live-migration.md`.

pub mod block;
pub mod converge;
pub mod dirty_rate;
pub mod disks;
pub mod fd_registry;
pub mod incoming;
pub mod info;
pub mod live_ram;
pub mod pagemap;
pub mod params;
pub mod postcopy;
pub mod postcopy_pages;
pub mod recover;
pub mod source;
pub mod uri;
pub mod xbzrle_send;

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::vmm::Vm;
pub use disks::DriveOpen;
pub use info::{MigrationInfo, Status};
pub use params::{Capabilities, ParamError, Parameters};
pub use source::MigrateError;
pub use uri::MigrateUri;

/// Errors of the monitor's migration commands.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Another migration is under way.
    #[error("There's a migration process in progress")]
    Busy,
    /// The URI is not valid.
    #[error(transparent)]
    Uri(#[from] uri::UriError),
    /// A parameter or capability could not be set.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The disks belong to the migration destination (or have not arrived yet).
    #[error("the disks are inactive: they were handed over in a live migration")]
    Inactive,
    /// Reopening the disks for `cont` failed.
    #[error(transparent)]
    Disks(#[from] disks::DiskError),
    /// `migrate_start_postcopy` without the capability (QEMU's words).
    #[error("Enable postcopy with migrate_set_capability before the start of migration")]
    PostcopyOff,
    /// `migrate_start_postcopy` before `migrate` (QEMU's words).
    #[error("Postcopy must be started after migration has been started")]
    PostcopyNotStarted,
    /// `cont` on a source whose postcopy broke: the destination ran the guest.
    #[error("the guest ran on the destination after postcopy started; its RAM here is stale and its disks are the destination's")]
    PostcopyLost,
    /// `migrate -b` with the postcopy-ram capability: the destination would run on images
    /// that have not arrived.
    #[error("block migration and postcopy-ram cannot be combined: turn postcopy-ram off or migrate without -b")]
    BlockPostcopy,
    /// `migrate -r` on a source whose postcopy is not paused (QEMU's words).
    #[error("Cannot resume if there is no paused migration")]
    NoPausedMigration,
    /// `migrate_recover` on a destination whose postcopy is not paused (QEMU's words).
    #[error("Migrate recover can only be run when postcopy is paused.")]
    RecoverNotPaused,
    /// `migrate_recover` while an earlier one still waits for the source (QEMU's words).
    #[error("Migrate recovery is triggered already")]
    RecoverPending,
    /// `migrate_recover` or `migrate -r` with a URI that gives no return path.
    #[error("postcopy recovery needs a tcp: or unix: URI, not {0}")]
    RecoverNeedsSocket(String),
}

#[derive(Debug, Default)]
struct State {
    params: Parameters,
    caps: Capabilities,
    request: Option<MigrateUri>,
    /// The queued migration carries the drives (`migrate -b`).
    block: bool,
    /// The queued request resumes a paused postcopy (`migrate -r`).
    resume: bool,
    info: MigrationInfo,
    started: Option<Instant>,
    cancel: bool,
    /// `migrate_start_postcopy` was asked for this migration.
    postcopy: bool,
    aborter: Option<uri::Aborter>,
    shutdown: bool,
    inactive: bool,
    /// Set on a destination (`--incoming`): what its `info migrate` shows.
    incoming: Option<MigrationInfo>,
    /// A destination's postcopy page source while postcopy runs (pauses, recovers).
    incoming_pages: Option<std::sync::Arc<postcopy_pages::ChannelPages>>,
    /// Every status this side went through, in order (see [`StatusLog`]).
    log: StatusLog,
}

/// The statuses a migration went through, numbered, so that an observer that polls (QMP's
/// MIGRATION events) sees a status that lasted less than its polling period too.
#[derive(Debug, Default)]
struct StatusLog {
    /// Number of the newest entry (the first is 1).
    last: u64,
    /// The newest entries, oldest first.
    recent: std::collections::VecDeque<&'static str>,
}

impl StatusLog {
    /// Most entries kept: a migration goes through a handful of statuses.
    const KEEP: usize = 32;

    fn record(&mut self, status: &Status) {
        let name = status.name();
        if self.recent.back() != Some(&name) {
            self.last += 1;
            self.recent.push_back(name);
            if self.recent.len() > Self::KEEP {
                self.recent.pop_front();
            }
        }
    }

    fn since(&self, seen: u64) -> Vec<&'static str> {
        let new = usize::try_from(self.last.saturating_sub(seen)).unwrap_or(usize::MAX);
        let skip = self.recent.len().saturating_sub(new);
        self.recent.iter().skip(skip).copied().collect()
    }
}

/// What the migration thread was asked to do.
enum Work {
    /// `migrate`: a new migration.
    Migrate(source::Job),
    /// `migrate -r`: resume the paused postcopy (its figures so far) over a new channel.
    Resume(MigrateUri, Box<MigrationInfo>),
}

/// The migration state of one VM, shared by the monitor and the migration thread
/// ([`Migrator::serve`]).
#[derive(Debug)]
pub struct Migrator {
    state: Mutex<State>,
    changed: Condvar,
    drives: Vec<DriveOpen>,
}

impl Migrator {
    /// A migrator for a VM whose drives were opened as `drives` (in order).
    pub fn new(drives: Vec<DriveOpen>) -> Self {
        Migrator {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            drives,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::vmm::lock(&self.state)
    }

    /// `migrate URI`: queues a migration for the migration thread.
    pub fn start(&self, uri: &str) -> Result<(), CommandError> {
        self.start_with(uri, false)
    }

    /// `migrate [-b] URI`: with `block`, the writable drives travel in the stream too.
    pub fn start_with(&self, uri: &str, block: bool) -> Result<(), CommandError> {
        let uri: MigrateUri = uri.parse()?;
        let mut st = self.lock();
        // A paused postcopy is still a migration: only `migrate -r` carries it on.
        if st.info.status.is_active()
            || st.request.is_some()
            || matches!(st.info.status, Status::PostcopyPaused(_))
        {
            return Err(CommandError::Busy);
        }
        if block && st.caps.postcopy_ram() {
            return Err(CommandError::BlockPostcopy);
        }
        st.request = Some(uri);
        st.block = block;
        st.resume = false;
        st.cancel = false;
        st.postcopy = false;
        st.started = Some(Instant::now());
        st.info = MigrationInfo {
            status: Status::Setup,
            ..MigrationInfo::default()
        };
        self.changed.notify_all();
        Ok(())
    }

    /// `migrate -r URI`: queues the resumption of a paused postcopy (QEMU's `resume`).
    pub fn start_resume(&self, uri: &str) -> Result<(), CommandError> {
        let mut st = self.lock();
        if !matches!(st.info.status, Status::PostcopyPaused(_)) || st.request.is_some() {
            return Err(CommandError::NoPausedMigration);
        }
        let uri: MigrateUri = uri.parse()?;
        if !matches!(uri, MigrateUri::Tcp { .. } | MigrateUri::Unix(_)) {
            return Err(CommandError::RecoverNeedsSocket(uri.to_string()));
        }
        st.request = Some(uri);
        st.resume = true;
        st.cancel = false;
        st.info.status = Status::PostcopyRecover;
        st.log.record(&Status::PostcopyRecover);
        self.changed.notify_all();
        Ok(())
    }

    /// `migrate_recover URI` on a destination whose postcopy is paused: listens on `uri`
    /// for the source's `migrate -r`.
    pub fn recover(&self, uri: &str) -> Result<(), CommandError> {
        let refused = |r| match r {
            recover::Refusal::NotPaused => CommandError::RecoverNotPaused,
            recover::Refusal::Pending => CommandError::RecoverPending,
        };
        let pages = self.lock().incoming_pages.clone();
        let pages = pages.ok_or(CommandError::RecoverNotPaused)?;
        pages.check_recover().map_err(refused)?;
        let uri: MigrateUri = uri.parse()?;
        if !matches!(uri, MigrateUri::Tcp { .. } | MigrateUri::Unix(_)) {
            return Err(CommandError::RecoverNeedsSocket(uri.to_string()));
        }
        let listener = uri::Listener::bind(&uri)?;
        pages.recover(listener).map_err(refused)
    }

    /// Records (or clears) the destination's postcopy page source, so that `info migrate`
    /// shows a pause and `migrate_recover` reaches it.
    pub fn set_incoming_pages(&self, pages: Option<std::sync::Arc<postcopy_pages::ChannelPages>>) {
        self.lock().incoming_pages = pages;
    }

    /// On a destination whose postcopy channel broke (paused or recovering): why. Its
    /// receiving thread and faulting vCPUs wait for pages that have not come.
    pub fn incoming_postcopy_interrupted(&self) -> Option<String> {
        let pages = self.lock().incoming_pages.clone()?;
        match pages.link() {
            recover::Link::Up => None,
            recover::Link::Paused(why) => Some(why),
            recover::Link::Recovering => Some("recovering".into()),
        }
    }

    /// Waits until no migration is queued or running; returns the final figures.
    pub fn wait(&self) -> MigrationInfo {
        let mut st = self.lock();
        while (st.request.is_some() || st.info.status.is_active()) && !st.shutdown {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.info.clone()
    }

    /// `migrate_cancel`: stops a running migration (no effect otherwise).
    pub fn cancel(&self) {
        let mut st = self.lock();
        // Once postcopy runs, the guest lives on the destination: there is nothing to go
        // back to (QEMU refuses too).
        if st.info.status.is_active()
            && !matches!(
                st.info.status,
                Status::PostcopyActive | Status::PostcopyRecover
            )
        {
            st.cancel = true;
            st.info.status = Status::Cancelling;
            st.log.record(&Status::Cancelling);
            if let Some(a) = &st.aborter {
                a.abort();
            }
        }
    }

    /// `migrate_start_postcopy`: the running migration switches to postcopy at its next
    /// step (QEMU: at once if still in setup, else at the next iteration).
    pub fn start_postcopy(&self) -> Result<(), CommandError> {
        let mut st = self.lock();
        if !st.caps.postcopy_ram() {
            return Err(CommandError::PostcopyOff);
        }
        if st.info.status == Status::None && st.request.is_none() {
            return Err(CommandError::PostcopyNotStarted);
        }
        st.postcopy = true;
        Ok(())
    }

    /// Refuses `cont` on a source whose postcopy broke (the guest lives on the destination).
    pub fn check_cont(&self) -> Result<(), CommandError> {
        match self.lock().info.status {
            Status::PostcopyPaused(_) | Status::PostcopyRecover => Err(CommandError::PostcopyLost),
            _ => Ok(()),
        }
    }

    /// Whether a migration is queued or running.
    pub fn is_active(&self) -> bool {
        let st = self.lock();
        st.request.is_some() || st.info.status.is_active()
    }

    /// Records the destination side's state (`--incoming`), shown by [`Migrator::info`]
    /// until this VM starts a migration of its own.
    pub fn set_incoming(&self, status: Status, socket_address: Option<String>) {
        let mut st = self.lock();
        st.incoming = Some(MigrationInfo::incoming(
            status,
            socket_address.into_iter().collect(),
        ));
    }

    /// `info migrate` figures (total time is counted up to now while active).
    pub fn info(&self) -> MigrationInfo {
        let st = self.lock();
        if let (Status::None, Some(incoming)) = (&st.info.status, &st.incoming) {
            let mut info = incoming.clone();
            if let (Status::PostcopyActive, Some(pages)) = (&info.status, &st.incoming_pages) {
                match pages.link() {
                    recover::Link::Up => {}
                    recover::Link::Paused(why) => info.status = Status::PostcopyPaused(why),
                    recover::Link::Recovering => info.status = Status::PostcopyRecover,
                }
            }
            return info;
        }
        let mut info = st.info.clone();
        if info.status.is_active() {
            if let Some(t) = st.started {
                info.total_time_ms = t.elapsed().as_millis().try_into().unwrap_or(u64::MAX);
            }
        }
        info
    }

    /// `migrate_set_parameter NAME VALUE`; a running migration follows max-bandwidth and
    /// downtime-limit from its next step (the throttle settings apply to the next one).
    pub fn set_parameter(&self, name: &str, value: &str) -> Result<(), CommandError> {
        Ok(self.lock().params.set(name, value)?)
    }

    /// `migrate_set_capability NAME on|off` (refused while migrating).
    pub fn set_capability(&self, name: &str, state: &str) -> Result<(), CommandError> {
        let mut st = self.lock();
        if st.info.status.is_active() {
            return Err(CommandError::Busy);
        }
        Ok(st.caps.set(name, state)?)
    }

    /// Current parameters.
    pub fn parameters(&self) -> Parameters {
        self.lock().params.clone()
    }

    /// Current capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.lock().caps.clone()
    }

    /// Whether the drives were handed over (after a completed migration, or on a
    /// destination before the stream is loaded): they must not be flushed or used.
    pub fn drives_inactive(&self) -> bool {
        self.lock().inactive
    }

    /// Marks the drives handed over or taken back.
    pub fn set_drives_inactive(&self, inactive: bool) {
        self.lock().inactive = inactive;
    }

    /// Reopens handed-over drives with their locks (QEMU's `cont` after a migration).
    pub fn reactivate(&self, vm: &Vm) -> Result<(), CommandError> {
        let mut st = self.lock();
        if st.inactive {
            disks::activate(vm, &self.drives)?;
            st.inactive = false;
        }
        Ok(())
    }

    /// How the drives were opened.
    pub fn drives(&self) -> &[DriveOpen] {
        &self.drives
    }

    /// Ends [`Migrator::serve`] (cancelling a running migration).
    pub fn shutdown(&self) {
        self.cancel();
        let mut st = self.lock();
        st.shutdown = true;
        self.changed.notify_all();
    }

    /// The migration thread: runs queued migrations of `vm` until [`Migrator::shutdown`].
    pub fn serve(&self, vm: &Vm) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if st.shutdown {
                        return;
                    }
                    if let Some(uri) = st.request.take() {
                        if st.resume {
                            break Work::Resume(uri, Box::new(st.info.clone()));
                        }
                        st.info.status = Status::Setup;
                        st.log.record(&Status::Setup);
                        break Work::Migrate(source::Job {
                            uri,
                            params: st.params.clone(),
                            auto_converge: st.caps.auto_converge(),
                            lz4: st.caps.lz4(),
                            xbzrle: st.caps.xbzrle(),
                            block: st.block,
                            postcopy: st.caps.postcopy_ram(),
                            drives: self.drives.clone(),
                        });
                    }
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            let result = match &job {
                Work::Migrate(job) => source::migrate(vm, job, self),
                Work::Resume(uri, paused) => recover::resume(vm, uri, self, paused),
            };
            let mut st = self.lock();
            st.aborter = None;
            let total = st.started.map_or(0, |t| {
                t.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
            });
            match result {
                Ok(done) => {
                    st.info = done.info;
                    st.inactive = true;
                }
                Err(MigrateError::PostcopyLost(why)) => {
                    // The guest stays paused here and keeps its pages; the disks stay
                    // released (the destination ran the guest on them).
                    st.inactive = true;
                    st.info.status = Status::PostcopyPaused(why);
                    st.info.total_time_ms = total;
                }
                Err(MigrateError::Cancelled) => {
                    st.info.status = Status::Cancelled;
                    st.info.total_time_ms = total;
                }
                Err(e) => {
                    st.inactive = matches!(e, MigrateError::Reactivate { .. });
                    st.info.status = Status::Failed(e.to_string());
                    st.info.total_time_ms = total;
                    st.info.expected_downtime_ms = None;
                }
            }
            let status = st.info.status.clone();
            st.log.record(&status);
            self.changed.notify_all();
        }
    }

    /// The statuses recorded after entry `seen` (oldest first) and the newest entry's number:
    /// pass that number back on the next call.
    pub fn status_changes(&self, seen: u64) -> (Vec<&'static str>, u64) {
        let st = self.lock();
        (st.log.since(seen), st.log.last)
    }
}

impl source::Observer for Migrator {
    fn progress(&self, info: &MigrationInfo) {
        let mut st = self.lock();
        // A cancel in progress keeps its status.
        let status = if st.info.status == Status::Cancelling {
            Status::Cancelling
        } else {
            info.status.clone()
        };
        st.info = info.clone();
        st.log.record(&status);
        st.info.status = status;
    }

    fn cancelled(&self) -> bool {
        self.lock().cancel
    }

    fn postcopy_requested(&self) -> bool {
        self.lock().postcopy
    }

    fn parameters(&self) -> Option<Parameters> {
        Some(self.lock().params.clone())
    }

    fn channel_open(&self, aborter: uri::Aborter) {
        let mut st = self.lock();
        if st.cancel {
            aborter.abort();
        }
        st.aborter = Some(aborter);
    }
}

#[cfg(test)]
mod tests {
    use super::{Status, StatusLog};

    #[test]
    fn status_log_keeps_short_lived_statuses_in_order() {
        let mut log = StatusLog::default();
        assert!(log.since(0).is_empty());
        log.record(&Status::Setup);
        let seen = log.last;
        log.record(&Status::Active);
        log.record(&Status::Active);
        log.record(&Status::Completed);
        assert_eq!(log.since(seen), ["active", "completed"]);
        assert_eq!(log.since(0), ["setup", "active", "completed"]);
        assert!(log.since(log.last).is_empty());
        for _ in 0..40 {
            log.record(&Status::Setup);
            log.record(&Status::Cancelled);
        }
        // Only the newest are kept; an observer far behind gets those.
        assert_eq!(log.since(0).len(), StatusLog::KEEP);
        assert_eq!(log.since(log.last - 2), ["setup", "cancelled"]);
    }
}
