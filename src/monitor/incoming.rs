//! The destination side of a live migration as the monitor starts it: at start-up
//! (`--incoming URI`) or later from QMP's `migrate-incoming` when the VM was started with
//! `--incoming defer` (QEMU's two ways).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::migrate::{self, uri::Listener, MigrateUri};

use super::Cx;

/// `--incoming defer` state: not deferred, waiting for `migrate-incoming`, started.
static DEFERRED: AtomicU8 = AtomicU8::new(0);
const WAITING: u8 = 1;
const STARTED: u8 = 2;

/// Records that the VM waits for `migrate-incoming` (`--incoming defer`).
pub fn defer() {
    DEFERRED.store(WAITING, Ordering::SeqCst);
}

/// `migrate-incoming URI`: listens on `uri` (QEMU's messages when the VM was not started
/// with `--incoming defer`, or the migration was started already).
pub fn start_deferred(cx: Cx<'_>, uri: &str) -> Result<Listener, String> {
    match DEFERRED.load(Ordering::SeqCst) {
        WAITING => {}
        STARTED => return Err("The incoming migration has already been started".into()),
        _ => return Err("'-incoming' was not specified on the command line".into()),
    }
    let uri: MigrateUri = uri
        .parse()
        .map_err(|e: migrate::uri::UriError| e.to_string())?;
    let listener = Listener::bind(&uri).map_err(|e| e.to_string())?;
    DEFERRED.store(STARTED, Ordering::SeqCst);
    migrate::incoming::announce(&listener, cx.mig);
    Ok(listener)
}

/// The incoming migration: a failed or partial stream ends the process with a non-zero
/// status before the guest ever runs (as QEMU does). A postcopy whose channel breaks after
/// the guest started here pauses (`postcopy-paused`, see `migrate::recover`) and this
/// waits on; a postcopy that fails (a malformed record) stops the guest, flushes its disks
/// and ends the process the same way: the guest never runs on with pages it did not
/// receive.
pub fn receive(cx: Cx<'_>, listener: Listener) {
    match migrate::incoming::run(cx.vm, listener, cx.mig) {
        Ok(report) => {
            cx.mig.set_drives_inactive(false);
            eprintln!(
                "vmsnap: incoming migration loaded {} MiB in {} ms",
                report.bytes >> 20,
                report.load.as_millis()
            );
        }
        Err(e) => {
            eprintln!("vmsnap: {e}");
            if matches!(e, migrate::incoming::IncomingError::PostcopyLost(_)) {
                // The guest ran here and wrote to its disks: keep what it wrote.
                let _ = super::stop_and_flush(cx);
            }
            std::process::exit(1);
        }
    }
}
