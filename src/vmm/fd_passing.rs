//! Raw descriptors made owned: those a peer passes with SCM_RIGHTS (the monitor's `getfd`)
//! and those a process inherits (`--incoming fd:N`). Here because turning a number into an
//! [`OwnedFd`] is `unsafe`, which vmsnap keeps in `vmm/`.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Most descriptors taken from one message (QEMU's chardev keeps up to 16 too).
const MAX_FDS: usize = 16;

/// Reads from `sock` like `read`, and returns the descriptors that came with the bytes
/// (SCM_RIGHTS), owned and close-on-exec.
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed `r` in this process for this message;
                // nothing else refers to it.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Takes ownership of descriptor `n`, inherited from the parent process; fails if `n` is
/// not open. The caller must not use `n` otherwise (it is closed when the result drops).
pub fn inherited(n: RawFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(n, nix::fcntl::FcntlArg::F_GETFD).map_err(io::Error::from)?;
    // SAFETY: `n` is open (checked above) and was inherited; vmsnap opened nothing under
    // that number that it still uses (the caller's contract), so this is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}
