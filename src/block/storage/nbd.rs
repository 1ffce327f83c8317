//! An NBD export as storage: the bytes of an image live on a network block server
//! (`qemu-nbd`, `qemu-storage-daemon`, `nbdkit`, or anything QEMU fronts: Ceph RBD, iSCSI…).
//!
//! # Client library
//! The protocol comes from the `nbd` crate (pure Rust, `forbid(unsafe_code)`, one dependency),
//! not written here. The alternatives compared:
//! - libnbd (the reference client: structured replies, several requests in flight, TLS) has
//!   Rust bindings only in its own source tree since 1.18; they are not on crates.io, and
//!   Debian 12 ships libnbd 1.14 without them. Binding its C API ourselves would put `unsafe`
//!   FFI in the block layer, which stays safe Rust.
//! - `tokio-nbd` and the `nbdkit` crate are servers, not clients.
//! - `nbd` 0.3 is old but small and correct for what it does: fixed-newstyle handshake with
//!   `NBD_OPT_EXPORT_NAME`, simple replies, READ, WRITE, FLUSH, TRIM, one request in flight,
//!   and it refuses a reply with a bad magic or an unexpected handle.
//!
//! What this module adds around it: QEMU's URI syntax ([`super::nbd_uri`]), bounded timeouts
//! (connect, every read and write on the socket), requests split at 32 MiB (QEMU's server
//! limit), a refusal of writable use when the server cannot flush or exports read-only, an
//! "export full" error before a write past the export's end, and a connection that, once an
//! error or timeout left it in an unknown state, refuses everything after (a new open, when
//! the server is back, starts afresh). WRITE_ZEROES is not in the crate: zero writes go out as
//! ordinary writes of zeroes.
//!
//! # Single writer
//! NBD has no locks. One writer per export is the user's rule; what enforces it is the
//! server: `qemu-nbd` serves one client at a time unless `--shared` says otherwise, and
//! `qemu-storage-daemon`'s `nbd-server-start` takes `max-connections`. A read-only export is
//! refused for writable use here.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nbd::client::{handshake, NbdClient, NbdExt};

use super::nbd_readahead::ReadAhead;
use super::nbd_uri::{NbdAddr, NbdUri, UriError};
use super::Storage;

/// Largest single request: QEMU's NBD server refuses anything past 32 MiB.
const MAX_REQUEST: usize = 32 << 20;

/// How long one socket read or write (and the connect) may take before the request fails.
/// `VMSNAP_NBD_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an NBD export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The URI is malformed.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The server could not be reached.
    #[error("Failed to connect to NBD server for '{uri}': {source}")]
    Connect {
        /// The URI.
        uri: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server closed or garbled the handshake (for example: no such export).
    #[error("NBD handshake with '{uri}' failed (no such export?): {source}")]
    Handshake {
        /// The URI.
        uri: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server accepted the connection but did not negotiate within the timeout: it is
    /// most likely serving another client (`qemu-nbd` serves one at a time by default).
    #[error(
        "NBD server for '{0}' did not answer the handshake within the timeout: is another \
         client using the export? (qemu-nbd serves one client at a time unless --shared)"
    )]
    Busy(String),
    /// Writable use of an export the server marks read-only.
    #[error("NBD export '{0}' is read-only")]
    ReadOnly(String),
    /// Writable use of an export the server cannot flush: crash ordering would be lost.
    #[error("NBD export '{0}' cannot be used writable: the server does not support flush (NBD_CMD_FLUSH)")]
    NoFlush(String),
}

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
        match &s {
            Sock::Tcp(t) => {
                t.set_read_timeout(Some(timeout))?;
                t.set_write_timeout(Some(timeout))?;
            }
            Sock::Unix(u) => {
                u.set_read_timeout(Some(timeout))?;
                u.set_write_timeout(Some(timeout))?;
            }
        }
        Ok(s)
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
struct Duplex {
    r: BufReader<Sock>,
    w: BufWriter<Sock>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The connection: usable, or lost with the first error that left it in an unknown state.
enum Conn {
    Up(Box<NbdClient<Duplex>>),
    Lost(String),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Up(_) => f.write_str("Up"),
            Conn::Lost(why) => write!(f, "Lost({why})"),
        }
    }
}

/// One connection to an export and what goes with it, shared by every [`NbdStorage`] of this
/// process on the same URI (see [`super::nbd_shared`]).
#[derive(Debug)]
pub(crate) struct Link {
    size: u64,
    can_trim: bool,
    /// The export is writable and can flush (checked at the handshake).
    can_write: bool,
    read_only_export: bool,
    conn: Mutex<Conn>,
    /// Sequential reads are served from one large request (see [`super::nbd_readahead`]).
    ra: Mutex<ReadAhead>,
}

impl Link {
    /// Whether the connection still works (no request failed on it).
    pub(crate) fn is_up(&self) -> bool {
        matches!(*lock(&self.conn), Conn::Up(_))
    }
}

/// An NBD export; its size is fixed by the server.
#[derive(Debug)]
pub struct NbdStorage {
    name: String,
    size: u64,
    can_trim: bool,
    writable: bool,
    link: Arc<Link>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn timeout() -> Duration {
    std::env::var("VMSNAP_NBD_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
}

impl NbdStorage {
    /// Connects to the export `uri` names (QEMU's URI syntax).
    ///
    /// # Errors
    /// [`NbdError`]: a bad URI, no server, no such export, or writable use of an export that
    /// is read-only or cannot flush.
    pub fn open(uri: &str, writable: bool) -> Result<Self, NbdError> {
        let parsed = NbdUri::parse(uri)?;
        let link = match super::nbd_shared::find(uri) {
            Some(link) => {
                // Another open of this process may have read before a peer wrote (a
                // migration's inactive destination): this one starts without cached bytes.
                lock(&link.ra).forget();
                link
            }
            None => {
                let link = Arc::new(Self::connect(uri, &parsed)?);
                super::nbd_shared::add(uri, &link);
                link
            }
        };
        if writable && link.read_only_export {
            return Err(NbdError::ReadOnly(uri.to_string()));
        }
        if writable && !link.can_write {
            return Err(NbdError::NoFlush(uri.to_string()));
        }
        Ok(Self {
            name: uri.to_string(),
            size: link.size,
            can_trim: link.can_trim,
            writable,
            link,
        })
    }

    /// A new connection: connect and handshake.
    fn connect(uri: &str, parsed: &NbdUri) -> Result<Link, NbdError> {
        let t = timeout();
        let sock = Sock::connect(&parsed.addr, t).map_err(|source| NbdError::Connect {
            uri: uri.to_string(),
            source,
        })?;
        let hs = |source| NbdError::Handshake {
            uri: uri.to_string(),
            source,
        };
        let mut duplex = Duplex {
            r: BufReader::with_capacity(64 << 10, sock.try_clone().map_err(hs)?),
            w: BufWriter::with_capacity(64 << 10, sock),
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
        let client = NbdClient::new(duplex, &export);
        Ok(Link {
            size: export.size,
            can_trim: export.send_trim,
            can_write: !export.readonly && export.send_flush,
            read_only_export: export.readonly,
            conn: Mutex::new(Conn::Up(Box::new(client))),
            ra: Mutex::new(ReadAhead::default()),
        })
    }

    /// The export's fixed size in bytes.
    pub fn export_size(&self) -> u64 {
        self.size
    }

    /// Runs one request; any failure marks the connection lost (a reply may be half read).
    fn request<T>(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut NbdClient<Duplex>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut g = lock(&self.link.conn);
        let client = match &mut *g {
            Conn::Up(c) => c,
            Conn::Lost(why) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!(
                        "NBD connection to '{}' was lost earlier ({why}); reopen the image once \
                         the server is back",
                        self.name
                    ),
                ))
            }
        };
        match f(client) {
            Ok(v) => Ok(v),
            Err(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut,
                    k => k,
                };
                let msg = format!(
                    "NBD {what} of {len:#x} bytes at {offset:#x} on '{}' failed: {}",
                    self.name,
                    if kind == io::ErrorKind::TimedOut {
                        "no answer within the timeout".to_string()
                    } else {
                        e.to_string()
                    }
                );
                *g = Conn::Lost(msg.clone());
                Err(io::Error::new(kind, msg))
            }
        }
    }

    fn read_ahead(&self) -> MutexGuard<'_, ReadAhead> {
        lock(&self.link.ra)
    }

    /// Reads `buf` from the export in requests of at most [`MAX_REQUEST`] bytes.
    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            self.request("read", off, chunk.len() as u64, |c| {
                use io::Seek;
                c.seek(io::SeekFrom::Start(off))?;
                c.read_exact(chunk)
            })?;
        }
        Ok(())
    }

    fn check_end(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(export_full(&self.name, offset, len, self.size)),
        }
    }
}

/// The error for a write past the end of a fixed-size export.
pub(crate) fn export_full(name: &str, offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::other(format!(
        "NBD export '{name}' is full: {len:#x} bytes at {offset:#x} go past its end ({size} bytes)"
    ))
}

impl Storage for NbdStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Past the end reads as zero, as for a file.
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let buf = &mut buf[..inside];
        let mut ra = self.read_ahead();
        let served = if ra.serve(offset, buf) {
            Ok(())
        } else if ra.wants_window(offset, inside) {
            let n = self.size.saturating_sub(offset).min(ra.window_len() as u64) as usize;
            let mut window = ra.take_buffer(n);
            match self.read_direct(offset, &mut window) {
                Ok(()) => {
                    ra.fill(offset, window);
                    if ra.serve(offset, buf) {
                        Ok(())
                    } else {
                        self.read_direct(offset, buf)
                    }
                }
                Err(e) => {
                    ra.forget();
                    Err(e)
                }
            }
        } else {
            self.read_direct(offset, buf)
        };
        ra.note_read(offset, inside);
        served
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("NBD export '{}' is opened read-only", self.name),
            ));
        }
        self.check_end(offset, buf.len() as u64)?;
        // The window is held while the write goes out, so no read sees it between the two.
        let mut ra = self.read_ahead();
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            let r = self.request("write", off, chunk.len() as u64, |c| {
                use io::Seek;
                c.seek(io::SeekFrom::Start(off))?;
                c.write_all(chunk)
            });
            if let Err(e) = r {
                ra.forget();
                return Err(e);
            }
        }
        ra.patch(offset, buf);
        Ok(())
    }

    /// An export cannot grow; shrinking is a no-op (the bytes past `len` are simply unused).
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.size {
            return Err(export_full(
                &self.name,
                self.size,
                len - self.size,
                self.size,
            ));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.request("flush", 0, 0, |c| c.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_trim || !self.writable {
            return Ok(());
        }
        self.read_ahead().forget();
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(1 << 30);
            self.request("trim", pos, n, |c| {
                use io::Seek;
                c.seek(io::SeekFrom::Start(pos))?;
                c.trim(n as usize)
            })?;
            pos += n;
        }
        Ok(())
    }
}
