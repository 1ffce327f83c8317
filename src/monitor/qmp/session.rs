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
use super::{JobWork, QmpCx, QmpError, Reply, TICK};
use crate::monitor::{events, fd_recv, Cx};

/// Largest message accepted (bytes of one JSON object).
pub const MAX_INPUT: usize = 1 << 20;

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
        let mut msg = match body {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": e.to_json()}),
        };
        if let Some(id) = id {
            msg["id"] = id.clone();
        }
        events::send(&self.out, &msg)
    }

    /// Handles one message; false ends the session.
    fn handle(&mut self, msg: Value) -> bool {
        let Value::Object(obj) = msg else {
            return self.reply(
                None,
                Err(QmpError::generic("QMP input must be a JSON object")),
            );
        };
        let id = obj.get("id");
        match self.command(&obj) {
            Ok(Reply::Value(v)) => self.reply(id, Ok(v)),
            Ok(Reply::Quit) => {
                self.reply(id, Ok(json!({})));
                quit(self.q.cx)
            }
            Err(e) => self.reply(id, Err(e)),
        }
    }

    fn command(&mut self, obj: &Map<String, Value>) -> Result<Reply, QmpError> {
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
        {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        let name = match obj.get("execute") {
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
        };
        let empty = Map::new();
        let map = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        let a = Args::new(map);
        if name == "qmp_capabilities" {
            if self.negotiated.is_some() {
                return Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                });
            }
            if let Some(first) = a.opt_any("enable").and_then(|v| v.as_array()?.first()) {
                return Err(QmpError::generic(format!(
                    "Capability '{}' not available",
                    first.as_str().unwrap_or_default()
                )));
            }
            a.finish()?;
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

/// Cuts complete JSON values off the front of `buf`, in order with the syntax errors met
/// on the way. After an error parsing starts again at the next `{` (the start of the next
/// message, as QEMU's streamer resets after an error); an incomplete value stays in `buf`.
fn take_messages(buf: &mut Vec<u8>) -> Vec<Result<Value, String>> {
    let mut out = Vec::new();
    loop {
        let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        let mut failed = false;
        let consumed = loop {
            match stream.next() {
                None => break stream.byte_offset(),
                Some(Ok(v)) => out.push(Ok(v)),
                Some(Err(e)) if e.is_eof() => break stream.byte_offset(),
                Some(Err(e)) => {
                    out.push(Err(format!("JSON parse error, {e}")));
                    failed = true;
                    let at = stream.byte_offset();
                    let next = buf[at + 1..].iter().position(|&b| b == b'{');
                    break next.map_or(buf.len(), |k| at + 1 + k);
                }
            }
        };
        buf.drain(..consumed);
        if !failed {
            return out;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_from_a_stream() {
        let mut buf = br#"{"execute": "a"}{"execute": "b"} {"exe"#.to_vec();
        let m = take_messages(&mut buf);
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(Result::is_ok));
        assert_eq!(buf, b"{\"exe");
        buf.extend_from_slice(b"cute\": \"c\"}\n");
        let m = take_messages(&mut buf);
        assert_eq!(m[0].as_ref().unwrap()["execute"], "c");
        let mut bad = b"{\"execute\": }".to_vec();
        let m = take_messages(&mut bad);
        assert!(m[0].as_ref().unwrap_err().starts_with("JSON parse error"));
        assert!(bad.is_empty());
        // The rest of a broken message is skipped up to the next one.
        let mut tail = b"xx\"}{\"execute\": \"d\"}".to_vec();
        let m = take_messages(&mut tail);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].is_err());
        assert_eq!(m[1].as_ref().unwrap()["execute"], "d");
    }
}
