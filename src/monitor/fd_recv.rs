//! Reading a monitor connection together with the descriptors a client passes along with
//! its bytes (SCM_RIGHTS), for `getfd` on both front ends. rustix gives owned descriptors
//! without `unsafe`.

use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// Most descriptors taken from one message (QEMU's chardev keeps up to 16 too); more in the
/// same message are closed.
const MAX_FDS: usize = 16;

/// Reads from `sock` like `read`; the descriptors that came with the bytes are pushed onto
/// `fds` (close-on-exec) while it holds fewer than `keep`, and closed otherwise.
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    keep: usize,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            for fd in received {
                if fds.len() < keep {
                    fds.push(fd);
                }
            }
        }
    }
    Ok(msg.bytes)
}

/// An HMP connection's reader: descriptors that arrive go to the registry `getfd` names
/// them from ([`crate::migrate::fd_registry::received`]).
#[derive(Debug)]
pub struct FdPassingReader(pub UnixStream);

impl io::Read for FdPassingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut fds = Vec::new();
        let n = recv_with_fds(&self.0, buf, &mut fds, MAX_FDS)?;
        for fd in fds {
            crate::migrate::fd_registry::received(fd);
        }
        Ok(n)
    }
}
