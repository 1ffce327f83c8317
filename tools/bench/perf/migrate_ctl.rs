//! Driving migrations for the benchmark: child processes, vmsnap's human monitor and QEMU's
//! QMP over unix sockets, and the reply fields the cases read.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A free tcp port on loopback (racy, good enough for a benchmark).
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Child processes killed when dropped.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spawn(cmd: &mut Command) -> Result<Child, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning {cmd:?}: {e}"))
}

pub fn connect(path: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("connecting to {}: {e}", path.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// vmsnap's human monitor over a unix socket. Replies have no prompt, so each command is
/// followed by `info status`, whose `VM status:` line marks the end of the reply.
pub struct Hmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Hmp {
    pub fn connect(path: &Path) -> Result<Hmp, String> {
        let writer = connect(path)?;
        writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(writer.try_clone().map_err(|e| e.to_string())?);
        let mut banner = String::new();
        reader
            .read_line(&mut banner)
            .map_err(|e| format!("monitor banner: {e}"))?;
        Ok(Hmp { reader, writer })
    }

    /// Sends `line`; returns its reply and the `VM status:` line that follows it.
    pub fn cmd_status(&mut self, line: &str) -> Result<(String, String), String> {
        write!(self.writer, "{line}\ninfo status\n").map_err(|e| format!("{line}: {e}"))?;
        let mut reply = String::new();
        loop {
            let mut l = String::new();
            let n = self
                .reader
                .read_line(&mut l)
                .map_err(|e| format!("{line}: {e}"))?;
            if n == 0 {
                return Err(format!("{line}: monitor closed"));
            }
            if l.starts_with("VM status:") {
                return Ok((reply, l.trim_end().to_string()));
            }
            reply.push_str(&l);
        }
    }

    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.cmd_status(line).map(|(reply, _)| reply)
    }
}

/// `NAME: N ms` from an `info migrate` reply.
pub fn hmp_ms(reply: &str, name: &str) -> Option<Duration> {
    let prefix = format!("{name}: ");
    reply.lines().find_map(|l| {
        let v = l.strip_prefix(&prefix)?.strip_suffix(" ms")?;
        v.trim().parse().ok().map(Duration::from_millis)
    })
}

pub fn hmp_field<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}: ");
    reply.lines().find_map(|l| l.strip_prefix(&prefix))
}

/// A QMP connection (events are skipped).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let writer = connect(path)?;
        writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let reader = BufReader::new(writer.try_clone().map_err(|e| e.to_string())?);
        let mut q = Qmp { reader, writer };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        let n = self
            .reader
            .read_line(&mut l)
            .map_err(|e| format!("qmp read: {e}"))?;
        if n == 0 {
            return Err("qmp closed".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("qmp reply {l:?}: {e}"))
    }

    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({"execute": execute, "arguments": arguments});
        writeln!(self.writer, "{msg}").map_err(|e| format!("{execute}: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{execute}: {e}"));
            }
        }
    }
}
