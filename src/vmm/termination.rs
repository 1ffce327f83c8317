//! SIGINT/SIGTERM as a flag, so `vmsnap run` can stop the vCPUs and flush the disks before
//! exiting instead of dying mid-write.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM (without `SA_RESTART`, so a blocking read or
/// accept returns `EINTR` and the caller gets to look at [`requested`]).
pub fn install() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        // SAFETY: `act` is fully initialised; the handler only stores to an atomic, which is
        // async-signal-safe; a null old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
