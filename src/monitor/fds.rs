//! File descriptors passed to the monitor by name (`getfd NAME` with the descriptor in an
//! `SCM_RIGHTS` message, `closefd NAME`), for commands such as `migrate fd:NAME`. One
//! registry per process, shared by the QMP and HMP front ends, as QEMU keeps one per monitor.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

static FDS: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());

fn fds() -> MutexGuard<'static, Vec<(String, OwnedFd)>> {
    FDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most descriptors kept at once (each is a kernel resource a client controls).
pub const MAX_FDS: usize = 64;

/// Keeps `fd` under `name`, closing one kept under the same name before.
pub fn insert(name: &str, fd: OwnedFd) -> Result<(), String> {
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("Parameter 'fdname' may not start with a digit".to_string());
    }
    let mut all = fds();
    all.retain(|(n, _)| n != name);
    if all.len() >= MAX_FDS {
        return Err(format!("vmsnap: at most {MAX_FDS} descriptors can be kept"));
    }
    all.push((name.to_string(), fd));
    Ok(())
}

/// Closes the descriptor kept under `name`.
pub fn close(name: &str) -> Result<(), String> {
    take(name)
        .map(drop)
        .ok_or_else(|| format!("File descriptor named '{name}' not found"))
}

/// Takes the descriptor kept under `name` out of the registry (its user owns it now).
pub fn take(name: &str) -> Option<OwnedFd> {
    let mut all = fds();
    let k = all.iter().position(|(n, _)| n == name)?;
    Some(all.remove(k).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_replaced_and_closed() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        insert("fd-t1", a.into()).unwrap();
        insert("fd-t1", b.into()).unwrap();
        assert!(take("fd-t1").is_some());
        assert_eq!(
            close("fd-t1").unwrap_err(),
            "File descriptor named 'fd-t1' not found"
        );
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(insert("1x", c.into()).is_err());
    }
}
