//! A userfaultfd (`userfaultfd(2)`, `ioctl_userfaultfd(2)`) in missing-page mode: the kernel
//! stops every access to a registered, not yet populated page — from the process, from KVM's
//! `copy_from_user` and from `get_user_pages` when KVM maps guest memory — until the page is
//! installed with `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`.
//!
//! Hand-written rather than taken from the `userfaultfd` crate (bytecodealliance, the one
//! Firecracker uses): its `userfaultfd-sys` build script runs bindgen against the kernel
//! headers in every configuration, which needs libclang on every build machine, and it brings
//! a second `nix` and `thiserror`. We need six ioctls on fixed `linux/userfaultfd.h` layouts.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOC(dir, 0xaa, nr, size)` as x86-64 encodes it (`_IOC_WRITE` 1, `_IOC_READ` 2).
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = ioc(3, 0x3f, 24);
const UFFDIO_REGISTER: u64 = ioc(3, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(2, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(2, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(3, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(3, 0x04, 32);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): for a page fault, `arg.pagefault.address` at offset 16.
const MSG_LEN: usize = 32;

const _: () = assert!(std::mem::size_of::<Api>() == 24);
const _: () = assert!(std::mem::size_of::<Register>() == 32);
const _: () = assert!(std::mem::size_of::<Copy>() == 40);
const _: () = assert!(std::mem::size_of::<Zeropage>() == 32);

/// A userfaultfd in missing-page mode (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct UffdFd {
    fd: OwnedFd,
}

impl UffdFd {
    /// Opens a userfaultfd and negotiates the API (no optional features).
    pub fn open() -> io::Result<UffdFd> {
        // SAFETY: a plain system call with flags; it returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(raw).map_err(|_| io::Error::other("userfaultfd: bad fd"))?;
        // SAFETY: `raw` is a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let uffd = UffdFd { fd };
        let mut api = Api {
            api: UFFD_API,
            ..Default::default()
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the structure `linux/userfaultfd.h` defines for
        // `request` (sizes checked at compile time above); the kernel reads and writes only
        // that structure.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Registers `[start, start + len)` (page aligned, one private anonymous mapping) for
    /// missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = Register {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
    }

    /// Ends the registration of `[start, start + len)`.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = Range { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
    }

    /// Wakes the threads waiting on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = Range { start, len };
        self.ioctl(UFFDIO_WAKE, &mut range)
    }

    /// Installs `data` (a whole number of pages) at `dst`, a registered address, and wakes
    /// the waiters. Returns the bytes installed: fewer than asked when a page on the way was
    /// already there (`EEXIST`, installed by someone else first), 0 if the first one was.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<u64> {
        let mut c = Copy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        loop {
            match self.ioctl(UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(u64::try_from(c.copy).unwrap_or(0)),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(0),
                // The address space changed under the copy: try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && c.copy <= 0 => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Ok(u64::try_from(c.copy).unwrap_or(0))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Installs `len` bytes of zero pages at `dst` and wakes the waiters; returns the bytes
    /// installed as [`UffdFd::copy`] does.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<u64> {
        let mut z = Zeropage {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        loop {
            match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(u64::try_from(z.zeropage).unwrap_or(0)),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(0),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && z.zeropage <= 0 => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Ok(u64::try_from(z.zeropage).unwrap_or(0))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout_ms` for a page fault; returns the faulting address, or `None`
    /// on timeout (or a non-fault event, which missing mode does not produce).
    pub fn next_fault(&self, timeout_ms: i32) -> io::Result<Option<u64>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; MSG_LEN];
        // SAFETY: reads at most MSG_LEN bytes into the local buffer.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_LEN) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        if usize::try_from(r).ok() != Some(MSG_LEN) || msg[0] != EVENT_PAGEFAULT {
            return Ok(None);
        }
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&msg[16..24]);
        Ok(Some(u64::from_ne_bytes(addr)))
    }
}
