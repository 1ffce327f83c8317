//! Image locking compatible with QEMU's `file-posix` driver.
//!
//! QEMU expresses block permissions as open-file-description (OFD) byte-range read locks:
//! byte `100 + bit` means "I hold permission `bit`", byte `200 + bit` means "I do not let
//! others hold permission `bit`". Permission bits: 0 consistent-read, 1 write, 2
//! write-unchanged, 3 resize. A process wanting a permission checks that nobody holds the
//! matching "unshared" byte, and one wanting to unshare a permission checks that nobody holds
//! it. Holding the bytes as shared read locks lets any number of readers coexist; checks use
//! `F_OFD_GETLK` with a write-lock probe, which reports any other owner's lock.
//!
//! vmsnap opens read-only images holding consistent-read and unsharing write and resize (as
//! `qemu-img info` without `-U`), and writable images holding all four and unsharing write and
//! resize (as a running QEMU with a writable drive, or `qemu-img snapshot`).

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg};

use super::{Error, Result};

const LOCK_BASE_PERM: i64 = 100;
const LOCK_BASE_SHARED: i64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
const PERM_RESIZE: u32 = 1 << 3;

fn flock(kind: i32, start: i64) -> libc::flock {
    // An all-zero flock is valid; l_pid must be 0 for OFD locks.
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

fn set(file: &File, kind: i32, byte: i64) -> nix::Result<()> {
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&flock(kind, byte))).map(drop)
}

/// Whether some other open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> nix::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Takes QEMU-compatible permission locks on an open image file.
///
/// # Errors
/// [`Error::Locked`] naming the first conflicting permission, as QEMU's
/// `Failed to get "write" lock`.
pub fn lock_image(file: &File, path: &str, writable: bool) -> Result<()> {
    let perms = if writable {
        PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
    } else {
        PERM_CONSISTENT_READ
    };
    let unshared = PERM_WRITE | PERM_RESIZE;
    let io = |e: nix::Error| Error::io(format!("Failed to lock '{path}'"), e.into());
    for bit in 0..4u32 {
        let m = 1 << bit;
        if perms & m != 0 {
            set(file, libc::F_RDLCK, LOCK_BASE_PERM + i64::from(bit)).map_err(io)?;
        }
        if unshared & m != 0 {
            set(file, libc::F_RDLCK, LOCK_BASE_SHARED + i64::from(bit)).map_err(io)?;
        }
    }
    for bit in 0..4u32 {
        let m = 1 << bit;
        let name = PERM_NAMES[bit as usize];
        if perms & m != 0 && held_by_other(file, LOCK_BASE_SHARED + i64::from(bit)).map_err(io)? {
            unlock_image(file);
            return Err(Error::Locked {
                kind: if m == PERM_CONSISTENT_READ {
                    "consistent read"
                } else {
                    name
                },
                path: path.to_owned(),
            });
        }
        if unshared & m != 0 && held_by_other(file, LOCK_BASE_PERM + i64::from(bit)).map_err(io)? {
            unlock_image(file);
            return Err(Error::Locked {
                kind: if m == PERM_WRITE {
                    "shared write"
                } else {
                    "shared resize"
                },
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// Drops every lock byte this file description holds.
pub fn unlock_image(file: &File) {
    let fl = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: LOCK_BASE_PERM,
        l_len: LOCK_BASE_SHARED + 64 - LOCK_BASE_PERM,
        l_pid: 0,
    };
    let _ = fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_excludes_second_writer_and_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        lock_image(&a, "img", true).unwrap();
        assert!(matches!(
            lock_image(&b, "img", true),
            Err(Error::Locked { .. })
        ));
        assert!(matches!(
            lock_image(&b, "img", false),
            Err(Error::Locked { .. })
        ));
        unlock_image(&a);
        lock_image(&b, "img", false).unwrap();
        // Two readers coexist.
        let c = File::open(&p).unwrap();
        lock_image(&c, "img", false).unwrap();
        // A writer is refused while readers unshare write.
        assert!(lock_image(&a, "img", true).is_err());
    }
}
