//! Descriptors passed to the monitor, by name: QEMU's `getfd NAME` / `closefd NAME`
//! (`monitor/misc.c`), used by `migrate fd:NAME`.
//!
//! The unix-socket monitor hands every descriptor that arrives with SCM_RIGHTS to
//! [`received`]; `getfd NAME` names the last one received (and closes any earlier
//! descriptor of that name), `closefd NAME` closes it, and [`take`] gives it to its user,
//! which owns it from then on (QEMU's `monitor_get_fd`). One registry per process: a vmsnap
//! process runs one VM, and its HMP and QMP monitors share it.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// Errors of the fd commands, worded as QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdError {
    /// `getfd` without a descriptor passed on the connection.
    #[error("No file descriptor supplied via SCM_RIGHTS")]
    NoneSupplied,
    /// A name that could be taken for a descriptor number.
    #[error("Parameter 'fdname' expects a name not starting with a digit")]
    DigitName,
    /// `closefd` of an unknown name.
    #[error("File descriptor named '{0}' not found")]
    NotFound(String),
    /// More named descriptors than a client may make the process hold.
    #[error("at most {MAX_NAMED} named file descriptors can be kept")]
    TooMany,
    /// `migrate fd:NAME` (any user) of an unknown name.
    #[error("File descriptor named '{0}' has not been found")]
    NotFoundForUse(String),
}

/// Most named descriptors kept at once (each is a kernel resource a client controls).
pub const MAX_NAMED: usize = 64;

#[derive(Debug, Default)]
struct Registry {
    received: Option<OwnedFd>,
    named: Vec<(String, OwnedFd)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    received: None,
    named: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A descriptor arrived on a monitor connection (it replaces, and closes, one received
/// earlier and not yet named, as QEMU's chardev keeps only the last message's).
pub fn received(fd: OwnedFd) {
    registry().received = Some(fd);
}

/// `getfd NAME` on the HMP monitor: names the descriptor received last on its connection.
pub fn getfd(name: &str) -> Result<(), FdError> {
    let fd = registry().received.take().ok_or(FdError::NoneSupplied)?;
    insert(name, fd)
}

/// Keeps `fd` under `name` (QMP's `getfd` with the descriptor its own connection received),
/// closing one kept under the same name before.
pub fn insert(name: &str, fd: OwnedFd) -> Result<(), FdError> {
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(FdError::DigitName);
    }
    let mut r = registry();
    r.named.retain(|(n, _)| n != name);
    if r.named.len() >= MAX_NAMED {
        return Err(FdError::TooMany);
    }
    r.named.push((name.to_string(), fd));
    Ok(())
}

/// `closefd NAME`.
pub fn closefd(name: &str) -> Result<(), FdError> {
    let mut r = registry();
    let before = r.named.len();
    r.named.retain(|(n, _)| n != name);
    if r.named.len() == before {
        return Err(FdError::NotFound(name.to_string()));
    }
    Ok(())
}

/// Removes descriptor NAME from the registry and gives it to the caller.
pub fn take(name: &str) -> Result<OwnedFd, FdError> {
    let mut r = registry();
    let i = r
        .named
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| FdError::NotFoundForUse(name.to_string()))?;
    Ok(r.named.remove(i).1)
}

/// The monitor commands `getfd NAME` and `closefd NAME`: the reply text (empty on success,
/// `Error: …` as QEMU's HMP prints it).
pub fn command(cmd: &str, name: &str) -> String {
    let r = match cmd {
        "getfd" => getfd(name),
        _ => closefd(name),
    };
    r.err().map_or_else(String::new, |e| format!("Error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn getfd_names_the_received_descriptor_and_closefd_closes_it() {
        // One test: the registry is per process.
        assert_eq!(
            command("getfd", "m"),
            "Error: No file descriptor supplied via SCM_RIGHTS"
        );
        received(devnull());
        assert_eq!(
            command("getfd", "1m"),
            "Error: Parameter 'fdname' expects a name not starting with a digit"
        );
        received(devnull());
        assert_eq!(command("getfd", "m"), "");
        assert_eq!(
            command("closefd", "x"),
            "Error: File descriptor named 'x' not found"
        );
        received(devnull());
        assert_eq!(command("getfd", "n"), "");
        assert_eq!(command("closefd", "m"), "");
        assert_eq!(
            take("m").unwrap_err().to_string(),
            "File descriptor named 'm' has not been found"
        );
        assert!(take("n").is_ok());
        assert!(take("n").is_err());
    }
}
