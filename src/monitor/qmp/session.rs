//! One QMP client: the greeting, capabilities negotiation, then commands and events.
//!
//! Input is a stream of JSON objects, not lines (QEMU's parser and its Python client send no
//! newline), so messages are cut with serde_json's stream reader; at most [`MAX_INPUT`]
//! bytes of one incomplete message are kept. On a unix socket, descriptors sent with
//! `SCM_RIGHTS` (for `getfd`) are received with the bytes.

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use serde_json::{json, Map, Value};

use super::args::Args;
use super::commands::{self, COMMANDS};
use super::input::{self, take_messages, MAX_INPUT};
use super::{JobWork, QmpCx, QmpError, Reply, TICK};
use crate::monitor::{events, fd_recv, Cx};

/// Most descriptors one client may have pending before `getfd` takes them.
const MAX_PENDING_FDS: usize = 16;

/// A client's socket.
#[derive(Debug)]
pub enum Conn {
    /// Unix (descriptors may come with the bytes).
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Conn {
    fn writer(&self) -> std::io::Result<events::Sink> {
        let w: Box<dyn std::io::Write + Send> = match self {
            Conn::Unix(s) => Box::new(s.try_clone()?),
            Conn::Tcp(s) => Box::new(s.try_clone()?),
        };
        Ok(Arc::new(Mutex::new(w)))
    }

    fn prepare(&self) -> std::io::Result<()> {
        let t = Some(TICK * 10);
        let w = Some(std::time::Duration::from_secs(10));
        match self {
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(w)
            }
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(w)
            }
        }
    }

    /// Reads what is there; descriptors that came along go to `fds`.
    fn read(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => fd_recv::recv_with_fds(s, buf, fds, MAX_PENDING_FDS),
        }
    }
}

/// The first message: QEMU's greeting, saying in `package` that this is vmsnap.
fn greeting() -> Value {
    json!({"QMP": {"version": commands::version(), "capabilities": []}})
}

/// The session's state between messages.
struct Session<'a> {
    q: QmpCx<'a>,
    out: events::Sink,
    negotiated: Option<u64>,
}

impl Session<'_> {
    fn reply(&self, id: Option<&Value>, body: Result<Value, QmpError>) -> bool {
        events::send(&self.out, &input::reply(id, body))
    }

    /// Handles one message; false ends the session.
    fn handle(&mut self, msg: Value) -> bool {
        let id = input::id_of(&msg);
        match self.command(&msg) {
            Ok(Reply::Value(v)) => self.reply(id, Ok(v)),
            Ok(Reply::Quit) => {
                self.reply(id, Ok(json!({})));
                quit(self.q.cx)
            }
            Err(e) => self.reply(id, Err(e)),
        }
    }

    fn command(&mut self, msg: &Value) -> Result<Reply, QmpError> {
        let (name, map) = input::request(msg)?;
        let empty = Map::new();
        let map = map.unwrap_or(&empty);
        let a = Args::new(map);
        if name == "qmp_capabilities" {
            if self.negotiated.is_some() {
                return Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                });
            }
            input::capabilities(&a)?;
            self.negotiated = Some(events::subscribe(Arc::clone(&self.out)));
            return Ok(Reply::Value(json!({})));
        }
        if self.negotiated.is_none() {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        if !COMMANDS.contains(&name) {
            return Err(QmpError::not_found(name));
        }
        commands::dispatch(&mut self.q, name, &a)
    }
}

/// `quit`: `SHUTDOWN`, the VM stopped and its drives flushed, the process ends.
fn quit(cx: Cx<'_>) -> bool {
    events::emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    let code = match crate::monitor::stop_and_flush(cx) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmsnap: flushing the drives: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// Serves one client until it disconnects or `done` is set.
pub fn run<'a>(cx: Cx<'a>, mut conn: Conn, jobs: mpsc::Sender<JobWork<'a>>, done: &AtomicBool) {
    let Ok(out) = conn.prepare().and_then(|()| conn.writer()) else {
        return;
    };
    if !events::send(&out, &greeting()) {
        return;
    }
    let mut s = Session {
        q: QmpCx {
            cx,
            jobs,
            received: Vec::new(),
        },
        out,
        negotiated: None,
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    while !done.load(Ordering::SeqCst) {
        let mut got = Vec::new();
        let n = match conn.read(&mut chunk, &mut got) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        s.q.received.extend(got);
        s.q.received.truncate(MAX_PENDING_FDS);
        buf.extend_from_slice(&chunk[..n]);
        let mut alive = take_messages(&mut buf).into_iter().all(|m| match m {
            Ok(m) => s.handle(m),
            Err(e) => s.reply(None, Err(QmpError::generic(e))),
        });
        if buf.len() > MAX_INPUT {
            buf.clear();
            let e = format!("JSON parse error, QMP input longer than {MAX_INPUT} bytes");
            alive &= s.reply(None, Err(QmpError::generic(e)));
        }
        if !alive {
            break;
        }
    }
    if let Some(id) = s.negotiated {
        events::unsubscribe(id);
    }
    // Descriptors received but never named by getfd are closed as `s` drops.
}
