//! The HMP channels: standard input/output with a prompt, and a unix socket server whose
//! clients are served one after the other.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;

use super::hmp::execute;
use super::{io_err, Cx, MonitorError, Outcome};

/// Serves monitor commands from `input` until `quit` or end of input (which also quits).
pub fn serve(
    cx: Cx<'_>,
    input: impl BufRead,
    mut out: impl Write,
    prompt: bool,
) -> Result<(), MonitorError> {
    writeln!(out, "vmsnap monitor - type 'help' for more information").map_err(io_err("write"))?;
    let mut lines = input.lines();
    loop {
        if prompt {
            write!(out, "(vmsnap) ").map_err(io_err("write"))?;
        }
        out.flush().map_err(io_err("flush"))?;
        let Some(line) = lines.next() else {
            return Ok(());
        };
        let line = line.map_err(io_err("read"))?;
        let (reply, quit) = match execute(cx, &line) {
            Outcome::Continue(r) => (r, false),
            Outcome::Quit(r) => (r, true),
        };
        if !reply.is_empty() {
            writeln!(out, "{reply}").map_err(io_err("write"))?;
        }
        if quit {
            out.flush().map_err(io_err("flush"))?;
            return Ok(());
        }
    }
}

/// Serves HMP on a unix socket at `path` until a client sends `quit`.
pub fn serve_unix(cx: Cx<'_>, path: &std::path::Path) -> Result<(), MonitorError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io_err("bind"))?;
    let result = loop {
        let (stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) => break Err(io_err("accept")(e)),
        };
        let reader = match stream.try_clone() {
            Ok(r) => BufReader::new(super::fd_recv::FdPassingReader(r)),
            Err(e) => break Err(io_err("accept")(e)),
        };
        // A client that merely disconnects leaves the VM running for the next one.
        let mut quit = false;
        let mut lines = reader.lines();
        let mut w = &stream;
        let _ = writeln!(w, "vmsnap monitor - type 'help' for more information");
        while let Some(Ok(line)) = lines.next() {
            let (reply, q) = match execute(cx, &line) {
                Outcome::Continue(r) => (r, false),
                Outcome::Quit(r) => (r, true),
            };
            if !reply.is_empty() {
                let _ = writeln!(w, "{reply}");
            }
            if q {
                quit = true;
                break;
            }
        }
        if quit {
            break Ok(());
        }
    };
    let _ = std::fs::remove_file(path);
    result
}
