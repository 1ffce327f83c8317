//! One connection to an NBD export: the socket (tcp or unix, with timeouts), the `nbd` crate's
//! client on it, and the rule that a connection on which a request failed stays lost (unless
//! a reconnect delay is set: [`super::nbd_redial`]).
//!
//! Requests go out one at a time (the crate has one in flight); [`Wire::request`] holds the
//! connection's lock for exactly one request (and its one retry after a reconnect).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbd::client::{handshake, Export, NbdClient, NbdExt};

use super::nbd::NbdError;
use super::nbd_redial::{redial, FlushState, Redial};
use super::nbd_uri::{NbdAddr, NbdUri};

/// Largest single request: QEMU's NBD server refuses anything past 32 MiB.
pub(crate) const MAX_REQUEST: usize = 32 << 20;

/// How long one socket read or write (and the connect) may take before the request fails.
/// `VMSNAP_NBD_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One socket, either kind.
#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn connect(addr: &NbdAddr, timeout: Duration) -> io::Result<Self> {
        let s = match addr {
            NbdAddr::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
                let mut found = None;
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
            NbdAddr::Unix(p) => Sock::Unix(UnixStream::connect(p)?),
        };
        s.set_timeouts(timeout)?;
        Ok(s)
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Sock::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Sock::Tcp(t) => Sock::Tcp(t.try_clone()?),
            Sock::Unix(u) => Sock::Unix(u.try_clone()?),
        })
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(t) => t.read(buf),
            Sock::Unix(u) => u.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(t) => t.write(buf),
            Sock::Unix(u) => u.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Buffered both ways, so that a request header goes out in one send and a reply header
/// comes in with one receive (the crate writes and reads field by field).
#[derive(Debug)]
pub(crate) struct Duplex {
    r: BufReader<Sock>,
    w: BufWriter<Sock>,
    /// The first bytes the server sent, kept during the handshake (see [`TAP_LEN`]).
    tap: Option<Vec<u8>>,
}

/// How much of the handshake [`Duplex`] keeps: the greeting and the export's size and
/// transmission flags (the crate reads the flags but keeps only some of them).
const TAP_LEN: usize = 28;

/// NBD_FLAG_CAN_MULTI_CONN: the server keeps several connections to the export coherent (a
/// flush on one covers the writes completed on all).
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        if let Some(t) = &mut self.tap {
            let keep = n.min(TAP_LEN.saturating_sub(t.len()));
            t.extend_from_slice(&buf[..keep]);
        }
        Ok(n)
    }
}

/// The transmission flags of a fixed-newstyle handshake answered to NBD_OPT_EXPORT_NAME:
/// "NBDMAGIC", "IHAVEOPT", 2 bytes of handshake flags, then the export's size (8) and flags.
fn transmission_flags(tap: &[u8]) -> Option<u16> {
    if tap.len() < TAP_LEN || &tap[8..16] != b"IHAVEOPT" {
        return None;
    }
    Some(u16::from_be_bytes([tap[26], tap[27]]))
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The connection: usable, or lost (when) with the first error that left it in an unknown
/// state.
enum Conn<S: Read + Write> {
    Up(Box<NbdClient<S>>),
    Lost { why: String, at: Instant },
}

impl<S: Read + Write> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Up(_) => f.write_str("Up"),
            Conn::Lost { why, .. } => write!(f, "Lost({why})"),
        }
    }
}

/// How a lost connection is dialed again, when a reconnect delay is set.
struct Redialer<S: Read + Write>(Box<dyn Redial<S>>);

impl<S: Read + Write> std::fmt::Debug for Redialer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redialer(delay {:?})", self.0.delay())
    }
}

/// What a request does to the export, for the reconnect rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// A connection and the URI it was opened with (for messages). `S` is the socket's
/// [`Duplex`], or any stream for [`super::nbd::run_over`].
#[derive(Debug)]
pub(crate) struct Wire<S: Read + Write = Duplex> {
    name: String,
    conn: Mutex<Conn<S>>,
    /// Set when a reconnect delay is (see [`super::nbd_redial`]).
    redial: Option<Redialer<S>>,
    flushes: FlushState,
    /// Why writes are refused: a reconnect came after writes that were acknowledged and not
    /// flushed.
    stale: Mutex<Option<String>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What the handshake said about the export.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// Size and the flags the crate reports.
    pub(crate) export: Export,
    /// The server advertised NBD_FLAG_CAN_MULTI_CONN.
    pub(crate) multi_conn: bool,
}

impl Wire {
    /// Connects to `parsed` (named `uri` in errors) and negotiates the export; with a
    /// reconnect delay set for `uri`, a lost connection is dialed again.
    pub(crate) fn connect(uri: &str, parsed: &NbdUri) -> Result<(Self, Negotiated), NbdError> {
        let (mut wire, n) = Wire::connect_within(uri, parsed, timeout())?;
        let delay = super::nbd_redial::delay_for(uri);
        if !delay.is_zero() {
            wire.redial = Some(Redialer(Box::new(Dialer {
                uri: uri.to_string(),
                parsed: parsed.clone(),
                size: n.export.size,
                delay,
            })));
        }
        Ok((wire, n))
    }

    /// As [`Wire::connect`], but the connect and the handshake must be done within
    /// `within` (the requests after it get the usual timeout), and never dialed again.
    pub(crate) fn connect_within(
        uri: &str,
        parsed: &NbdUri,
        within: Duration,
    ) -> Result<(Self, Negotiated), NbdError> {
        let (duplex, export, multi_conn) = dial(uri, parsed, within)?;
        let wire = Wire::over(uri, duplex, &export);
        Ok((wire, Negotiated { export, multi_conn }))
    }
}

/// The parameters of a connection, to dial it again.
struct Dialer {
    uri: String,
    parsed: NbdUri,
    size: u64,
    delay: Duration,
}

impl Redial<Duplex> for Dialer {
    fn dial(&self, within: Duration) -> io::Result<NbdClient<Duplex>> {
        let (duplex, export, _) =
            dial(&self.uri, &self.parsed, within).map_err(io::Error::other)?;
        if export.size != self.size {
            return Err(io::Error::other(format!(
                "the export came back with {} bytes instead of {}",
                export.size, self.size
            )));
        }
        Ok(NbdClient::new(duplex, &export))
    }

    fn delay(&self) -> Duration {
        self.delay
    }
}

/// Connects and negotiates within `within`: the stream, the export, and whether the server
/// advertised multi-conn.
fn dial(uri: &str, parsed: &NbdUri, within: Duration) -> Result<(Duplex, Export, bool), NbdError> {
    let sock = Sock::connect(&parsed.addr, within).map_err(|source| NbdError::Connect {
        uri: uri.to_string(),
        source,
    })?;
    let hs = |source| NbdError::Handshake {
        uri: uri.to_string(),
        source,
    };
    let control = sock.try_clone().map_err(hs)?;
    let mut duplex = Duplex {
        r: BufReader::with_capacity(64 << 10, sock.try_clone().map_err(hs)?),
        w: BufWriter::with_capacity(64 << 10, sock),
        tap: Some(Vec::with_capacity(TAP_LEN)),
    };
    let export = handshake(&mut duplex, parsed.export.as_bytes()).map_err(|e| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            NbdError::Busy(uri.to_string())
        } else {
            hs(e)
        }
    })?;
    let tap = duplex.tap.take().unwrap_or_default();
    let multi_conn = transmission_flags(&tap).is_some_and(|f| f & FLAG_CAN_MULTI_CONN != 0);
    control.set_timeouts(timeout()).map_err(hs)?;
    Ok((duplex, export, multi_conn))
}

impl<S: Read + Write> Wire<S> {
    /// Negotiates the export `export` on `stream` (fixed newstyle, NBD_OPT_EXPORT_NAME);
    /// `name` names the connection in errors.
    pub(crate) fn negotiate(
        name: &str,
        mut stream: S,
        export: &[u8],
    ) -> io::Result<(Self, Export)> {
        let export = handshake(&mut stream, export)?;
        Ok((Wire::over(name, stream, &export), export))
    }

    /// The transmission phase on `stream`, whose handshake negotiated `export`.
    fn over(name: &str, stream: S, export: &Export) -> Self {
        Wire {
            name: name.to_string(),
            conn: Mutex::new(Conn::Up(Box::new(NbdClient::new(stream, export)))),
            redial: None,
            flushes: FlushState::default(),
            stale: Mutex::new(None),
        }
    }

    /// Whether the connection still works (no request failed on it).
    pub(crate) fn is_up(&self) -> bool {
        matches!(*lock(&self.conn), Conn::Up(_))
    }

    /// Why the connection was lost, if it was.
    pub(crate) fn lost(&self) -> Option<String> {
        match &*lock(&self.conn) {
            Conn::Up(_) => None,
            Conn::Lost { why, .. } => Some(why.clone()),
        }
    }

    /// Whether a lost connection is dialed again (a reconnect delay is set).
    pub(crate) fn redials(&self) -> bool {
        self.redial.is_some()
    }

    /// Marks the connection lost for `why` (a request it was part of failed elsewhere).
    pub(crate) fn poison(&self, why: &str) {
        let mut g = lock(&self.conn);
        if matches!(*g, Conn::Up(_)) {
            *g = Conn::Lost {
                why: why.to_string(),
                at: Instant::now(),
            };
        }
    }

    /// Counts a write acknowledged on another connection of the same export (multi-conn):
    /// this connection's flush covers it.
    pub(crate) fn acked_elsewhere(&self) {
        self.flushes.acked();
    }

    /// Runs one request; any failure marks the connection lost (a reply may be half read).
    /// With a reconnect delay, a lost connection is dialed again first, and a request that
    /// failed is sent once more on the new one (see [`super::nbd_redial`] for the rule on
    /// writes).
    fn request<T>(
        &self,
        what: &str,
        kind: Kind,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut NbdClient<S>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut g = lock(&self.conn);
        let mut retried = false;
        loop {
            if let Conn::Lost { why, at } = &*g {
                let lost = |why: &str| {
                    io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!(
                            "NBD connection to '{}' was lost earlier ({why}); reopen the image \
                             once the server is back",
                            self.name
                        ),
                    )
                };
                let Some(r) = &self.redial else {
                    return Err(lost(why));
                };
                match redial(&*r.0, *at, timeout()) {
                    Ok(client) => {
                        if self.flushes.unflushed() {
                            *lock(&self.stale) = Some(why.clone());
                        }
                        *g = Conn::Up(Box::new(client));
                    }
                    Err(e) => return Err(lost(&format!("{why}; reconnecting failed: {e}"))),
                }
            }
            if kind != Kind::Read {
                if let Some(why) = lock(&self.stale).as_ref() {
                    return Err(io::Error::other(format!(
                        "NBD connection to '{}' was lost ({why}) while writes the server had \
                         acknowledged were not yet flushed, so it may not have them; writes \
                         are refused until the image is opened again (then run 'vmsnap \
                         check')",
                        self.name
                    )));
                }
            }
            let Conn::Up(client) = &mut *g else {
                continue;
            };
            let mark = self.flushes.mark();
            let e = match f(client) {
                Ok(v) => {
                    match kind {
                        Kind::Read => {}
                        Kind::Write => self.flushes.acked(),
                        Kind::Flush => self.flushes.flushed(mark),
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let ekind = match e.kind() {
                io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut,
                k => k,
            };
            let msg = format!(
                "NBD {what} of {len:#x} bytes at {offset:#x} on '{}' failed: {}",
                self.name,
                if ekind == io::ErrorKind::TimedOut {
                    "no answer within the timeout".to_string()
                } else {
                    e.to_string()
                }
            );
            *g = Conn::Lost {
                why: msg.clone(),
                at: Instant::now(),
            };
            if self.redial.is_none() || retried {
                return Err(io::Error::new(ekind, msg));
            }
            retried = true;
        }
    }

    /// Reads `buf` from the export in requests of at most [`MAX_REQUEST`] bytes.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            self.request("read", Kind::Read, off, chunk.len() as u64, |c| {
                use io::Seek;
                c.seek(io::SeekFrom::Start(off))?;
                c.read_exact(chunk)
            })?;
        }
        Ok(())
    }

    /// Writes `buf` to the export in requests of at most [`MAX_REQUEST`] bytes.
    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            self.request("write", Kind::Write, off, chunk.len() as u64, |c| {
                use io::Seek;
                c.seek(io::SeekFrom::Start(off))?;
                c.write_all(chunk)
            })?;
        }
        Ok(())
    }

    /// NBD_CMD_FLUSH.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.request("flush", Kind::Flush, 0, 0, |c| c.flush())
    }

    /// NBD_CMD_TRIM of `[offset, end)`, in requests of at most 1 GiB.
    pub(crate) fn trim(&self, offset: u64, end: u64) -> io::Result<()> {
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(1 << 30);
            self.request("trim", Kind::Write, pos, n, |c| {
                use io::Seek;
                c.seek(io::SeekFrom::Start(pos))?;
                c.trim(n as usize)
            })?;
            pos += n;
        }
        Ok(())
    }
}

fn timeout() -> Duration {
    std::env::var("VMSNAP_NBD_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
}
