//! Migration URIs (`tcp:HOST:PORT`, `unix:PATH`, `exec:COMMAND`, `file:PATH`, `fd:NAME`) and the
//! channels they open: [`Outgoing`] on the source, [`Listener`] on the destination.
//!
//! `exec:` runs `sh -c COMMAND` as QEMU does: the source writes the stream to its standard
//! input, the destination reads the stream from its standard output.
//!
//! `fd:` (QEMU's `migration/fd.c`): the source sends over the descriptor the monitor's
//! `getfd NAME` received ([`super::fd_registry`]), the destination reads descriptor number N
//! it inherited (`--incoming fd:N`). A socket is used as one (shut down on cancel and at the
//! end); anything else (a pipe) is written and read as a file.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors parsing a URI or opening its channel.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// Not one of the four forms.
    #[error("unknown migration protocol: '{0}' (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH)")]
    UnknownProtocol(String),
    /// `tcp:` without a usable `HOST:PORT`.
    #[error("invalid tcp address '{0}': expected HOST:PORT")]
    BadTcp(String),
    /// An empty path or command.
    #[error("'{0}' needs a path or command after the colon")]
    Empty(String),
    /// `fd:NAME` names no descriptor passed with `getfd`.
    #[error(transparent)]
    Fd(#[from] super::fd_registry::FdError),
    /// `--incoming fd:N` with N not a descriptor number (QEMU's wording).
    #[error("Invalid file descriptor number '{0}'")]
    BadFdNumber(String),
    /// Connecting, listening, spawning or opening failed.
    #[error("{what} '{target}': {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// Address, path or command.
        target: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, UriError>;

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateUri {
    /// `tcp:HOST:PORT` (IPv6 hosts in brackets).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `exec:COMMAND`, run with `sh -c`.
    Exec(String),
    /// `file:PATH`.
    File(PathBuf),
    /// `fd:NAME` (source: a name given to `getfd`; destination: a descriptor number).
    Fd(String),
}

impl FromStr for MigrateUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self> {
        let (proto, rest) = s
            .split_once(':')
            .ok_or_else(|| UriError::UnknownProtocol(s.to_string()))?;
        if rest.is_empty() {
            return Err(UriError::Empty(s.to_string()));
        }
        match proto {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| UriError::BadTcp(rest.to_string()))?;
                let port = port
                    .parse()
                    .map_err(|_| UriError::BadTcp(rest.to_string()))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                Ok(MigrateUri::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            "unix" => Ok(MigrateUri::Unix(PathBuf::from(rest))),
            "exec" => Ok(MigrateUri::Exec(rest.to_string())),
            "file" => Ok(MigrateUri::File(PathBuf::from(rest))),
            "fd" => Ok(MigrateUri::Fd(rest.to_string())),
            _ => Err(UriError::UnknownProtocol(s.to_string())),
        }
    }
}

impl std::fmt::Display for MigrateUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrateUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrateUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrateUri::Exec(c) => write!(f, "exec:{c}"),
            MigrateUri::File(p) => write!(f, "file:{}", p.display()),
            MigrateUri::Fd(n) => write!(f, "fd:{n}"),
        }
    }
}

fn io_err(
    what: &'static str,
    target: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> UriError {
    let target = target.to_string();
    move |source| UriError::Io {
        what,
        target,
        source,
    }
}

/// Bytes the source may have in flight in its socket's send buffer. The kernel's default
/// grows to several MiB on loopback; whatever is in flight when the guest stops is waited
/// for inside the downtime, so keep it to a few milliseconds' worth.
const SEND_BUFFER: usize = 1 << 20;

fn limit_send_buffer(s: &impl std::os::fd::AsFd) {
    // Only a tuning: the default buffer works too.
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER);
}

fn sh(cmd: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    c
}

/// What lets another thread interrupt a migration blocked in a write.
#[derive(Debug, Clone)]
pub enum Aborter {
    /// Shut the socket down.
    Tcp(Arc<TcpStream>),
    /// Shut the socket down.
    Unix(Arc<UnixStream>),
    /// Kill the command.
    Child(Arc<Mutex<Child>>),
    /// Nothing blocks for long (files).
    Nothing,
}

impl Aborter {
    /// Makes pending and future writes of the channel fail.
    pub fn abort(&self) {
        match self {
            Aborter::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Aborter::Unix(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Aborter::Child(c) => {
                let _ = crate::vmm::lock(c).kill();
            }
            Aborter::Nothing => {}
        }
    }
}

#[derive(Debug)]
enum Writer {
    Tcp(Arc<TcpStream>),
    Unix(Arc<UnixStream>),
    Child(Option<ChildStdin>),
    File(BufWriter<File>),
}

/// The source's end of a migration channel.
#[derive(Debug)]
pub struct Outgoing {
    w: Writer,
    aborter: Aborter,
}

impl Outgoing {
    /// Connects (tcp, unix), spawns (exec) or creates (file) the channel for `uri`.
    pub fn connect(uri: &MigrateUri) -> Result<Outgoing> {
        match uri {
            MigrateUri::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .map_err(io_err("Failed to connect to", uri))?;
                let _ = s.set_nodelay(true);
                limit_send_buffer(&s);
                let s = Arc::new(s);
                Ok(Outgoing {
                    w: Writer::Tcp(Arc::clone(&s)),
                    aborter: Aborter::Tcp(s),
                })
            }
            MigrateUri::Unix(p) => {
                let s =
                    Arc::new(UnixStream::connect(p).map_err(io_err("Failed to connect to", uri))?);
                Ok(Outgoing {
                    w: Writer::Unix(Arc::clone(&s)),
                    aborter: Aborter::Unix(s),
                })
            }
            MigrateUri::Exec(cmd) => {
                let mut child = sh(cmd)
                    .stdin(Stdio::piped())
                    .spawn()
                    .map_err(io_err("Failed to run", cmd))?;
                let stdin = child.stdin.take();
                Ok(Outgoing {
                    w: Writer::Child(stdin),
                    aborter: Aborter::Child(Arc::new(Mutex::new(child))),
                })
            }
            MigrateUri::File(p) => {
                let f = File::create(p).map_err(io_err("Failed to create", p.display()))?;
                Ok(Outgoing {
                    w: Writer::File(BufWriter::with_capacity(1 << 20, f)),
                    aborter: Aborter::Nothing,
                })
            }
            MigrateUri::Fd(name) => {
                let fd = super::fd_registry::take(name)?;
                if is_socket(&fd) {
                    // Any socket family: only read, write and shutdown are used.
                    let s = Arc::new(UnixStream::from(fd));
                    limit_send_buffer(&*s);
                    return Ok(Outgoing {
                        w: Writer::Unix(Arc::clone(&s)),
                        aborter: Aborter::Unix(s),
                    });
                }
                Ok(Outgoing {
                    w: Writer::File(BufWriter::with_capacity(1 << 20, File::from(fd))),
                    aborter: Aborter::Nothing,
                })
            }
        }
    }

    /// The receiving half of a socket channel (postcopy's return path); None for exec,
    /// file and descriptors that are not sockets.
    pub fn return_path(&self) -> Option<io::Result<Box<dyn Read + Send>>> {
        match &self.w {
            Writer::Tcp(s) => Some(s.try_clone().map(|s| Box::new(s) as Box<dyn Read + Send>)),
            Writer::Unix(s) => Some(s.try_clone().map(|s| Box::new(s) as Box<dyn Read + Send>)),
            Writer::Child(_) | Writer::File(_) => None,
        }
    }

    /// A handle to interrupt this channel from another thread.
    pub fn aborter(&self) -> Aborter {
        self.aborter.clone()
    }

    /// Ends the stream once everything is written: closes the sending side and waits for
    /// the other end to finish: up to `wait` for a socket peer to close its side after
    /// reading the whole stream, until it exits (or is killed by the [`Aborter`]) for an
    /// exec command. A peer that resets the connection, or a command that fails, is an
    /// error: the stream was not taken whole.
    pub fn finish(mut self, wait: Duration) -> io::Result<()> {
        self.flush()?;
        match &mut self.w {
            Writer::Tcp(s) => {
                s.shutdown(Shutdown::Write)?;
                s.set_read_timeout(Some(wait))?;
                wait_eof(&mut &**s, wait)
            }
            Writer::Unix(s) => {
                s.shutdown(Shutdown::Write)?;
                s.set_read_timeout(Some(wait))?;
                wait_eof(&mut &**s, wait)
            }
            Writer::Child(stdin) => {
                drop(stdin.take());
                let Aborter::Child(child) = &self.aborter else {
                    return Ok(());
                };
                // Poll rather than wait with the lock held, so that an abort (cancel) can
                // still kill a command that does not exit.
                let status = loop {
                    if let Some(st) = crate::vmm::lock(child).try_wait()? {
                        break st;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                };
                if status.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!("migration command {status}")))
                }
            }
            Writer::File(f) => f.flush(),
        }
    }
}

fn is_socket(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    nix::sys::stat::fstat(fd.as_raw_fd())
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

fn wait_eof(r: &mut impl Read, wait: Duration) -> io::Result<()> {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if start.elapsed() >= wait {
            return Ok(());
        }
    }
}

impl Write for Outgoing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.w {
            Writer::Tcp(s) => (&**s).write(buf),
            Writer::Unix(s) => (&**s).write(buf),
            Writer::Child(Some(s)) => s.write(buf),
            Writer::Child(None) => Err(io::ErrorKind::BrokenPipe.into()),
            Writer::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.w {
            Writer::Child(Some(s)) => s.flush(),
            Writer::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// The destination's end, ready before the source connects (`--incoming URI`).
#[derive(Debug)]
pub enum Listener {
    /// Listening for one TCP connection.
    Tcp(TcpListener),
    /// Listening on a Unix socket (removed once a connection is accepted).
    Unix(UnixListener, PathBuf),
    /// A command to run and read.
    Exec(String),
    /// A file to read.
    File(PathBuf),
    /// An inherited descriptor (`fd:N`).
    Fd(File),
}

impl Listener {
    /// Binds the socket (tcp, unix) or checks nothing yet (exec, file).
    pub fn bind(uri: &MigrateUri) -> Result<Listener> {
        match uri {
            MigrateUri::Tcp { host, port } => Ok(Listener::Tcp(
                TcpListener::bind((host.as_str(), *port))
                    .map_err(io_err("Failed to listen on", uri))?,
            )),
            MigrateUri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(Listener::Unix(
                    UnixListener::bind(p).map_err(io_err("Failed to listen on", uri))?,
                    p.clone(),
                ))
            }
            MigrateUri::Exec(c) => Ok(Listener::Exec(c.clone())),
            MigrateUri::File(p) => Ok(Listener::File(p.clone())),
            MigrateUri::Fd(n) => {
                let num: i32 = n
                    .parse()
                    .ok()
                    .filter(|&v| v >= 0)
                    .ok_or_else(|| UriError::BadFdNumber(n.clone()))?;
                let fd = crate::vmm::fd_passing::inherited(num)
                    .map_err(io_err("Failed to use descriptor", uri))?;
                Ok(Listener::Fd(File::from(fd)))
            }
        }
    }

    /// Where the destination listens, as QEMU's `info migrate` shows it (`tcp:IP:PORT`,
    /// `unix:PATH`); None for exec and file, which are not sockets.
    pub fn socket_address(&self) -> Option<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| format!("tcp:{a}")),
            Listener::Unix(_, p) => Some(format!("unix:{}", p.display())),
            Listener::Exec(_) | Listener::File(_) | Listener::Fd(_) => None,
        }
    }

    /// Waits for the source (tcp, unix), starts the command (exec) or opens the file.
    pub fn accept(self) -> Result<Incoming> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(io_err("accept", "tcp"))?;
                Ok(Incoming::Tcp(s))
            }
            Listener::Unix(l, p) => {
                let r = l.accept().map_err(io_err("accept", p.display()));
                let _ = std::fs::remove_file(&p);
                Ok(Incoming::Unix(r?.0))
            }
            Listener::Exec(cmd) => {
                let mut child = sh(&cmd)
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(io_err("Failed to run", &cmd))?;
                let out = child.stdout.take().ok_or_else(|| UriError::Io {
                    what: "Failed to read from",
                    target: cmd.clone(),
                    source: io::ErrorKind::BrokenPipe.into(),
                })?;
                Ok(Incoming::Child(child, out))
            }
            Listener::File(p) => Ok(Incoming::File(
                File::open(&p).map_err(io_err("Failed to open", p.display()))?,
            )),
            Listener::Fd(f) => Ok(Incoming::File(f)),
        }
    }
}

/// The destination's open channel.
#[derive(Debug)]
pub enum Incoming {
    /// An accepted TCP connection.
    Tcp(TcpStream),
    /// An accepted Unix connection.
    Unix(UnixStream),
    /// A running command and its output.
    Child(Child, ChildStdout),
    /// A file.
    File(File),
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Incoming::Tcp(s) => s.read(buf),
            Incoming::Unix(s) => s.read(buf),
            Incoming::Child(_, o) => o.read(buf),
            Incoming::File(f) => f.read(buf),
        }
    }
}

impl Incoming {
    /// The sending half of a socket channel (postcopy's return path); None for exec and
    /// files.
    pub fn return_path(&self) -> Option<io::Result<Box<dyn Write + Send>>> {
        match self {
            Incoming::Tcp(s) => Some(s.try_clone().map(|s| Box::new(s) as Box<dyn Write + Send>)),
            Incoming::Unix(s) => Some(s.try_clone().map(|s| Box::new(s) as Box<dyn Write + Send>)),
            Incoming::Child(..) | Incoming::File(_) => None,
        }
    }

    /// Bounds each read of a socket channel (`None`: wait as long as it takes); no effect
    /// on commands and files.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Incoming::Tcp(s) => s.set_read_timeout(t),
            Incoming::Unix(s) => s.set_read_timeout(t),
            Incoming::Child(..) | Incoming::File(_) => Ok(()),
        }
    }

    /// Reads and drops what is left (at most `limit` bytes) so that a socket peer sees an
    /// orderly close rather than a reset, then closes the channel (waiting for a command).
    pub fn close(mut self, limit: u64) {
        let _ = io::copy(&mut (&mut self).take(limit), &mut io::sink());
        if let Incoming::Child(mut c, o) = self {
            drop(o);
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print() {
        let u: MigrateUri = "tcp:127.0.0.1:4444".parse().unwrap();
        assert_eq!(
            u,
            MigrateUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(u.to_string(), "tcp:127.0.0.1:4444");
        let u: MigrateUri = "tcp:[::1]:5".parse().unwrap();
        assert_eq!(u.to_string(), "tcp:[::1]:5");
        assert_eq!(
            "tcp::4444".parse::<MigrateUri>().unwrap(),
            MigrateUri::Tcp {
                host: "0.0.0.0".into(),
                port: 4444
            }
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrateUri>().unwrap(),
            MigrateUri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "exec:cat > /tmp/x".parse::<MigrateUri>().unwrap(),
            MigrateUri::Exec("cat > /tmp/x".into())
        );
        assert_eq!(
            "file:/tmp/s.mig".parse::<MigrateUri>().unwrap(),
            MigrateUri::File("/tmp/s.mig".into())
        );
        assert!(matches!(
            "rdma:1:2".parse::<MigrateUri>(),
            Err(UriError::UnknownProtocol(_))
        ));
        assert!(matches!(
            "tcp:host".parse::<MigrateUri>(),
            Err(UriError::BadTcp(_))
        ));
        assert!(matches!(
            "tcp:h:99999".parse::<MigrateUri>(),
            Err(UriError::BadTcp(_))
        ));
        assert!(matches!(
            "file:".parse::<MigrateUri>(),
            Err(UriError::Empty(_))
        ));
    }

    #[test]
    fn unix_channel_carries_bytes_and_finish_sees_the_close() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrateUri::Unix(dir.path().join("s"));
        let l = Listener::bind(&uri).unwrap();
        let t = std::thread::spawn(move || {
            let mut inc = l.accept().unwrap();
            let mut buf = [0u8; 5];
            inc.read_exact(&mut buf).unwrap();
            inc.close(1 << 20);
            buf
        });
        let mut out = Outgoing::connect(&uri).unwrap();
        out.write_all(b"hello and more").unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        assert_eq!(&t.join().unwrap(), b"hello");
        assert!(!dir.path().join("s").exists());
    }

    #[test]
    fn exec_and_file_channels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let uri = MigrateUri::Exec(format!("cat > {}", path.display()));
        let mut out = Outgoing::connect(&uri).unwrap();
        out.write_all(b"stream").unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"stream");

        let l = Listener::bind(&MigrateUri::Exec(format!("cat {}", path.display()))).unwrap();
        let mut s = String::new();
        let mut inc = l.accept().unwrap();
        inc.read_to_string(&mut s).unwrap();
        inc.close(0);
        assert_eq!(s, "stream");

        let out = Outgoing::connect(&MigrateUri::Exec("exit 3".into())).unwrap();
        let e = out.finish(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("exit status: 3"), "{e}");

        // A command that never exits is killed by the aborter while finish waits.
        let out = Outgoing::connect(&MigrateUri::Exec("exec sleep 60".into())).unwrap();
        let a = out.aborter();
        let t = std::thread::spawn(move || out.finish(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(100));
        a.abort();
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("signal"), "{e}");

        let f = dir.path().join("f.mig");
        let mut out = Outgoing::connect(&MigrateUri::File(f.clone())).unwrap();
        out.write_all(b"abc").unwrap();
        out.finish(Duration::ZERO).unwrap();
        let mut inc = Listener::bind(&MigrateUri::File(f))
            .unwrap()
            .accept()
            .unwrap();
        let mut s = String::new();
        inc.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
    }

    #[test]
    fn connecting_to_nobody_fails_with_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrateUri::Unix(dir.path().join("none"));
        let e = Outgoing::connect(&uri).unwrap_err();
        assert!(e.to_string().contains("Failed to connect to 'unix:"), "{e}");
    }
}
