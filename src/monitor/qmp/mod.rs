//! QMP, QEMU's machine protocol (docs/interop/qmp-spec.rst): JSON objects over a unix or TCP
//! socket, one session per client, several clients at once.
//!
//! ```text
//!  serve ── accept ── session (greeting, qmp_capabilities, commands, events) ─┐
//!        ├─ job runner: snapshot jobs one at a time, off the sessions' threads  ├ commands.rs
//!        └─ poller: STOP/RESUME nobody reported, MIGRATION status changes     ─┘   args.rs
//! ```
//!
//! Shapes follow QEMU 7.2 (formats/qmp.md lists every command and what differs).

pub mod args;
pub mod block_info;
pub mod commands;
pub mod input;
pub mod migrate_cmds;
mod session;

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::{events, io_err, Cx, MonitorError};

/// A QMP error: QEMU's error class and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound`, …
    pub class: &'static str,
    /// The message.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// `CommandNotFound` for an unknown command.
    pub fn not_found(name: &str) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: format!("The command {name} has not been found"),
        }
    }

    /// The `error` member of a reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class, "desc": self.desc})
    }
}

/// What a command answers.
#[derive(Debug)]
pub enum Reply {
    /// `{"return": VALUE}`.
    Value(Value),
    /// `{"return": {}}`, then the process ends (`quit`).
    Quit,
}

/// A snapshot job's work, run by the job runner.
pub type JobWork<'a> = Box<dyn FnOnce() + Send + 'a>;

/// What a QMP command acts on: the VM, the job runner, the session's received descriptors.
#[derive(Debug)]
pub struct QmpCx<'a> {
    /// The VM and its migration state.
    pub cx: Cx<'a>,
    jobs: mpsc::Sender<JobWork<'a>>,
    /// Descriptors received with the session's last messages (`getfd` takes the newest).
    pub received: Vec<OwnedFd>,
}

impl<'a> QmpCx<'a> {
    /// Queues a job's work.
    pub fn run_job(&self, work: JobWork<'a>) {
        // The runner only stops once every session is gone.
        let _ = self.jobs.send(work);
    }
}

/// `--qmp unix:PATH[,server=on][,wait=off]` or `tcp:HOST:PORT[,…]` (QEMU's `-qmp` syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpSpec {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP `HOST:PORT`.
    Tcp(String),
}

impl FromStr for QmpSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parts.next().unwrap_or_default();
        for opt in parts {
            match opt {
                "server" | "server=on" | "wait=off" | "nowait" => {}
                "server=off" => return Err("--qmp: vmsnap only listens (server=on)".into()),
                "wait=on" | "wait" => {
                    return Err("--qmp: wait=on is not supported (the VM starts at once)".into())
                }
                other => return Err(format!("--qmp: unknown option '{other}'")),
            }
        }
        if let Some(p) = addr.strip_prefix("unix:") {
            return Ok(QmpSpec::Unix(PathBuf::from(p)));
        }
        if let Some(hp) = addr.strip_prefix("tcp:") {
            if hp
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                return Ok(QmpSpec::Tcp(hp.to_string()));
            }
        }
        Err(format!(
            "unknown QMP address '{addr}' (unix:PATH or tcp:HOST:PORT)"
        ))
    }
}

/// A bound QMP socket.
#[derive(Debug)]
pub enum QmpListener {
    /// Unix socket (removed again when serving ends).
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl QmpListener {
    /// Binds the socket of `spec` (a stale unix socket file is replaced, as QEMU does).
    pub fn bind(spec: &QmpSpec) -> Result<Self, MonitorError> {
        let l = match spec {
            QmpSpec::Unix(p) => {
                let _ = std::fs::remove_file(p);
                QmpListener::Unix(UnixListener::bind(p).map_err(io_err("bind"))?, p.clone())
            }
            QmpSpec::Tcp(a) => QmpListener::Tcp(TcpListener::bind(a).map_err(io_err("bind"))?),
        };
        match &l {
            QmpListener::Unix(u, _) => u.set_nonblocking(true),
            QmpListener::Tcp(t) => t.set_nonblocking(true),
        }
        .map_err(io_err("bind"))?;
        Ok(l)
    }

    fn accept(&self) -> std::io::Result<session::Conn> {
        match self {
            QmpListener::Unix(u, _) => u.accept().map(|(s, _)| session::Conn::Unix(s)),
            QmpListener::Tcp(t) => t.accept().map(|(s, _)| session::Conn::Tcp(s)),
        }
    }
}

impl Drop for QmpListener {
    fn drop(&mut self) {
        if let QmpListener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How often the accept loop, the sessions and the poller look at `done`.
const TICK: Duration = Duration::from_millis(20);

/// The last migration status reported as a `MIGRATION` event.
static LAST_MIGRATION: Mutex<&'static str> = Mutex::new("none");

/// Sends `MIGRATION` for `status` if it changed and the `events` capability is on.
pub fn note_migration(cx: Cx<'_>, status: &'static str) {
    let changed = {
        let mut last = LAST_MIGRATION.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *last, status) != status
    };
    if changed && cx.mig.capabilities().is_on("events") {
        events::emit("MIGRATION", Some(json!({"status": status})));
    }
}

/// Reports run-state and migration changes nobody reported: a migration's statuses and final
/// stop (STOP before `completed`, as QEMU sends them), a vCPU failure.
fn poll(cx: Cx<'_>, done: &AtomicBool) {
    events::sync_run_state(cx.vm);
    let (_, mut seen) = cx.mig.status_changes(u64::MAX);
    while !done.load(Ordering::SeqCst) {
        // Statuses that came and went since the last look (a short migration's `active`).
        let (changes, last) = cx.mig.status_changes(seen);
        seen = last;
        for name in changes {
            if matches!(name, "completed" | "failed") {
                events::poll_run_state(cx.vm);
            }
            note_migration(cx, name);
        }
        let status = cx.mig.info().status;
        let end = matches!(
            status,
            crate::migrate::Status::Completed | crate::migrate::Status::Failed(_)
        );
        if end {
            events::poll_run_state(cx.vm);
            note_migration(cx, status.name());
        } else {
            note_migration(cx, status.name());
            events::poll_run_state(cx.vm);
        }
        std::thread::sleep(TICK);
    }
}

/// Serves QMP clients on `listener` until `done` is set (or a client quits the process).
pub fn serve(cx: Cx<'_>, listener: QmpListener, done: &AtomicBool) {
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<JobWork<'_>>();
        s.spawn(move || {
            for work in rx {
                work();
            }
        });
        s.spawn(|| poll(cx, done));
        while !done.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok(conn) => {
                    let jobs = tx.clone();
                    s.spawn(move || session::run(cx, conn, jobs, done));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(TICK),
                Err(e) => {
                    eprintln!("vmsnap: QMP accept: {e}");
                    std::thread::sleep(TICK);
                }
            }
        }
        drop(tx);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_specs_parse_like_qemu_s() {
        assert_eq!(
            "unix:/tmp/q.sock,server=on,wait=off".parse::<QmpSpec>(),
            Ok(QmpSpec::Unix("/tmp/q.sock".into()))
        );
        assert_eq!(
            "unix:/tmp/q,server,nowait".parse::<QmpSpec>(),
            Ok(QmpSpec::Unix("/tmp/q".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444,server=on,wait=off".parse::<QmpSpec>(),
            Ok(QmpSpec::Tcp("127.0.0.1:4444".into()))
        );
        assert!("tcp:localhost".parse::<QmpSpec>().is_err());
        assert!("unix:/q,wait=on"
            .parse::<QmpSpec>()
            .unwrap_err()
            .contains("wait=on"));
        assert!("unix:/q,server=off".parse::<QmpSpec>().is_err());
        assert!("stdio".parse::<QmpSpec>().is_err());
    }

    #[test]
    fn errors_have_qemu_s_classes() {
        assert_eq!(
            QmpError::not_found("x").to_json(),
            json!({"class": "CommandNotFound", "desc": "The command x has not been found"})
        );
        assert_eq!(QmpError::generic("m").to_json()["class"], "GenericError");
    }
}
