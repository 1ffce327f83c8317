//! Inherited descriptors made owned (`--incoming fd:N`). Here because turning a number into
//! an [`OwnedFd`] is `unsafe`, which vmsnap keeps in `vmm/`. (Descriptors a monitor client
//! passes with SCM_RIGHTS arrive owned: `monitor::fd_recv`.)

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of descriptor `n`, inherited from the parent process; fails if `n` is
/// not open. The caller must not use `n` otherwise (it is closed when the result drops).
pub fn inherited(n: RawFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(n, nix::fcntl::FcntlArg::F_GETFD).map_err(io::Error::from)?;
    // SAFETY: `n` is open (checked above) and was inherited; vmsnap opened nothing under
    // that number that it still uses (the caller's contract), so this is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}
