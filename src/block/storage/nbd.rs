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
//! What vmsnap adds around it: QEMU's URI syntax ([`super::nbd_uri`]); the connection
//! ([`super::nbd_wire`]: bounded timeouts on connect and every socket read and write,
//! requests split at 32 MiB, QEMU's server limit, and a connection that, once an error or
//! timeout left it in an unknown state, refuses everything after; a new open, when the server
//! is back, starts afresh; with a reconnect delay it is dialed again, [`super::nbd_redial`]);
//! one link per export and process ([`super::nbd_shared`]);
//! several requests in flight over up to four connections when the server advertises
//! multi-conn ([`super::nbd_pool`]); read-ahead for sequential reads
//! ([`super::nbd_readahead`]) with the next window fetched in the background
//! ([`super::nbd_prefetch`]), and write-behind ([`super::nbd_behind`]), which make up for the
//! round trips where they cost most (VM state); here: a refusal of writable use when the
//! server cannot flush or exports read-only, and an "export full" error before a write past
//! the export's end. WRITE_ZEROES is not in the crate: zero writes go out as ordinary writes
//! of zeroes.
//!
//! # Single writer
//! NBD has no locks. One writer per export is the user's rule; what enforces it is the
//! server: `qemu-nbd` serves one client at a time unless `--shared` says otherwise, and
//! `qemu-storage-daemon`'s `nbd-server-start` takes `max-connections`. A read-only export is
//! refused for writable use here.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::nbd_behind::WriteBehind;
use super::nbd_pool::Pool;
use super::nbd_prefetch::Prefetch;
use super::nbd_readahead::ReadAhead;
use super::nbd_uri::{NbdUri, UriError};
use super::nbd_wire::{lock, Wire};
use super::Storage;

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

/// One connection to an export and what goes with it, shared by every [`NbdStorage`] of this
/// process on the same URI (see [`super::nbd_shared`]).
#[derive(Debug)]
pub(crate) struct Link {
    size: u64,
    can_trim: bool,
    /// The export is writable and can flush (checked at the handshake).
    can_write: bool,
    read_only_export: bool,
    pool: Arc<Pool>,
    /// Sequential reads are served from one large request (see [`super::nbd_readahead`]).
    ra: Mutex<ReadAhead>,
    /// The window after `ra`'s, fetched in the background (see [`super::nbd_prefetch`]).
    prefetch: Prefetch,
    /// Writes go out from a worker thread (see [`super::nbd_behind`]); started by the first
    /// write.
    behind: Mutex<Option<Arc<WriteBehind>>>,
}

impl Link {
    /// Whether the connection still works (no request failed on it).
    pub(crate) fn is_up(&self) -> bool {
        self.pool.is_up()
    }

    /// How many connections the link has open.
    pub(crate) fn connections(&self) -> usize {
        self.pool.connections()
    }

    /// The write-behind queue, started on first use (None if no thread could be started:
    /// writes then go out directly).
    fn behind(&self) -> Option<Arc<WriteBehind>> {
        let mut g = lock(&self.behind);
        if g.is_none() {
            let pool = self.pool.clone();
            *g = WriteBehind::start(Box::new(move |off, data: &[u8]| pool.write(off, data)))
                .ok()
                .map(Arc::new);
        }
        g.clone()
    }

    /// Starts fetching the window after `ra`'s when a sequential run reads through it and
    /// the server has every write so far (nothing queued behind).
    fn read_ahead_next(&self, ra: &ReadAhead, size: u64) {
        let Some((start, len)) = ra.next_window() else {
            return;
        };
        let len = size.saturating_sub(start).min(len as u64) as usize;
        let idle = lock(&self.behind).as_ref().map_or(true, |b| b.is_idle());
        if len > 0 && idle {
            self.prefetch.ask(&self.pool, start, len);
        }
    }

    /// Waits for every write queued so far.
    fn drain(&self) -> io::Result<()> {
        let behind = lock(&self.behind).clone();
        behind.map_or(Ok(()), |b| b.drain())
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
                link.prefetch.invalidate();
                link
            }
            None => {
                let (wire, n) = Wire::connect(uri, &parsed)?;
                let export = n.export;
                let link = Arc::new(Link {
                    size: export.size,
                    can_trim: export.send_trim,
                    can_write: !export.readonly && export.send_flush,
                    read_only_export: export.readonly,
                    pool: Arc::new(Pool::new(uri, parsed, export.size, wire, n.multi_conn)),
                    ra: Mutex::new(ReadAhead::default()),
                    prefetch: Prefetch::default(),
                    behind: Mutex::new(None),
                });
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

    /// The export's fixed size in bytes.
    pub fn export_size(&self) -> u64 {
        self.size
    }

    /// How many connections to the export this process has open now: one, and more while
    /// large requests run on a server that advertises multi-conn (`formats/nbd.md`).
    pub fn connections(&self) -> usize {
        self.link.connections()
    }

    fn read_ahead(&self) -> MutexGuard<'_, ReadAhead> {
        lock(&self.link.ra)
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
        let link = &self.link;
        // What the window holds is up to date (writes patch it when they are queued); what
        // comes from the server must not be older than the writes queued before it.
        let served = if ra.serve(offset, buf) {
            Ok(())
        } else if let Some(fetched) = link.prefetch.take(offset) {
            // The background job fetched the window that starts here.
            match fetched {
                Ok(window) => {
                    link.prefetch.give_back(ra.replace(offset, window));
                    if ra.serve(offset, buf) {
                        Ok(())
                    } else {
                        link.drain().and_then(|()| link.pool.read(offset, buf))
                    }
                }
                Err(e) => {
                    ra.forget();
                    Err(e)
                }
            }
        } else if let Err(e) = link.drain() {
            Err(e)
        } else if ra.wants_window(offset, inside) {
            let n = self.size.saturating_sub(offset).min(ra.window_len() as u64) as usize;
            let mut window = ra.take_buffer(n);
            match link.pool.read(offset, &mut window) {
                Ok(()) => {
                    ra.fill(offset, window);
                    if ra.serve(offset, buf) {
                        Ok(())
                    } else {
                        link.pool.read(offset, buf)
                    }
                }
                Err(e) => {
                    ra.forget();
                    Err(e)
                }
            }
        } else {
            link.pool.read(offset, buf)
        };
        ra.note_read(offset, inside);
        match &served {
            Ok(()) => link.read_ahead_next(&ra, self.size),
            Err(_) => link.prefetch.invalidate(),
        }
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
        // The window is held while the write is queued, so no read sees it between the two.
        let mut ra = self.read_ahead();
        let r = match self.link.behind() {
            Some(b) => b.push(offset, buf),
            None => self.link.pool.write(offset, buf),
        };
        match r {
            Ok(()) => {
                ra.patch(offset, buf);
                self.link.prefetch.invalidate();
                Ok(())
            }
            Err(e) => {
                ra.forget();
                self.link.prefetch.invalidate();
                Err(e)
            }
        }
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
        self.link.drain()?;
        self.link.pool.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_trim || !self.writable {
            return Ok(());
        }
        let mut ra = self.read_ahead();
        ra.forget();
        self.link.prefetch.invalidate();
        self.link.drain()?;
        let end = offset.saturating_add(len).min(self.size);
        self.link.pool.first().trim(offset, end)
    }
}

/// One request as a drive's connection sends it, for [`run_over`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdRequest {
    /// NBD_CMD_READ of `len` bytes at `offset` (split at 32 MiB).
    Read {
        /// First byte.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// NBD_CMD_WRITE of `len` zero bytes at `offset` (split at 32 MiB).
    Write {
        /// First byte.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM of `[offset, end)` (split at 1 GiB).
    Trim {
        /// First byte.
        offset: u64,
        /// First byte after.
        end: u64,
    },
}

/// What the server's handshake said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// NBD_FLAG_READ_ONLY.
    pub readonly: bool,
    /// NBD_FLAG_SEND_FLUSH.
    pub can_flush: bool,
    /// NBD_FLAG_SEND_TRIM.
    pub can_trim: bool,
}

/// Runs a drive's connection code over `stream` instead of a socket: the handshake for
/// `export`, then `requests` one at a time, with the same splitting and the same rule that
/// a connection on which a request failed stays lost. The server is whatever answers on
/// `stream`; the `nbd_reply` fuzz target plays it from memory. Returns what the handshake
/// said and each request's outcome (read data is dropped).
///
/// # Errors
/// [`NbdError::Handshake`] (named `name`) when the negotiation fails.
pub fn run_over<S: io::Read + io::Write>(
    name: &str,
    stream: S,
    export: &str,
    requests: &[NbdRequest],
) -> Result<(NbdExportInfo, Vec<io::Result<()>>), NbdError> {
    let (wire, e) =
        Wire::negotiate(name, stream, export.as_bytes()).map_err(|source| NbdError::Handshake {
            uri: name.to_string(),
            source,
        })?;
    let info = NbdExportInfo {
        size: e.size,
        readonly: e.readonly,
        can_flush: e.send_flush,
        can_trim: e.send_trim,
    };
    let results = requests
        .iter()
        .map(|r| match *r {
            NbdRequest::Read { offset, len } => wire.read(offset, &mut vec![0u8; len]),
            NbdRequest::Write { offset, len } => wire.write(offset, &vec![0u8; len]),
            NbdRequest::Flush => wire.flush(),
            NbdRequest::Trim { offset, end } => wire.trim(offset, end),
        })
        .collect();
    Ok((info, results))
}
