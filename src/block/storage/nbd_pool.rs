//! Several requests in flight: large reads and writes spread over several connections to
//! the export (NBD "multi-conn"), when the server says that is safe.
//!
//! The `nbd` crate has one request in flight per connection, and a single connection spends
//! most of a large request waiting: the server reads its file while the socket idles, then
//! the socket carries the data while the server idles. Measured here on a 2-core machine,
//! `qemu-nbd` over a Unix socket, 1 GiB from the page cache: one connection with 8 MiB
//! requests moved about 700 MiB/s; four connections with 2 MiB requests each, 1.8 GiB/s.
//!
//! The rule (as libnbd's `nbdcopy` keeps it): more connections only when the server
//! advertises `NBD_FLAG_CAN_MULTI_CONN`, its promise that all connections to the export see
//! one another's completed writes and that a flush on one covers them all. `qemu-nbd`
//! advertises it with `--shared` above 1 (or 0), `qemu-storage-daemon` for writable exports
//! by default; with `qemu-nbd`'s default of one client it does not, and a second connection
//! there would only wait for the first to go away. The extra connections are opened on the
//! first large request, each with a short handshake deadline: a server whose client limit is
//! reached (it accepts but does not greet) costs that deadline once and the link goes on with
//! what it has.
//!
//! Ordering is unchanged: a request split over connections returns when every piece is
//! answered, so the pieces of one request never overlap each other and two requests never
//! overlap in time. Flushes and trims stay on the first connection (multi-conn makes that
//! flush cover the others). A failure on any connection marks the whole link lost; when the
//! first connection dials again after a loss ([`super::nbd_redial`]), the extras are dropped
//! and a split request that failed is sent again whole on the first.

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::nbd_uri::NbdUri;
use super::nbd_wire::{lock, Wire};

/// Connections per export at most, the first included.
const CONNECTIONS: usize = 4;

/// Requests shorter than this go on one connection (a piece should be worth a round trip).
const SPLIT_FROM: usize = 2 << 20;

/// Pieces are at most this long: a connection moves small pieces faster than large ones
/// (measured: 32 MiB in 8 MiB pieces over four connections 0.9 GiB/s, in 2 MiB pieces 1.7).
const PIECE_MAX: usize = 2 << 20;

/// Pieces are cut at this granularity.
const PIECE_ALIGN: usize = 64 << 10;

/// How long an extra connection may take to connect and negotiate (in the background).
const EXTRA_HANDSHAKE: Duration = Duration::from_secs(2);

/// Extra connections unused this long are closed (so that a VM at rest holds one connection,
/// and a server with a client limit has its other slots free, e.g. for a migration's
/// destination).
const IDLE: Duration = Duration::from_secs(2);

/// What the pool knows of its extra connections.
#[derive(Debug)]
struct Extras {
    /// Open and negotiated.
    open: Vec<Arc<Wire>>,
    /// A keeper thread is opening them or watching for idleness.
    keeper: bool,
    /// An attempt failed (the server takes no more clients, or is going away): no more
    /// attempts on this pool.
    refused: bool,
    /// When a large request last asked for them.
    last_use: Instant,
}

/// What the keeper thread shares with the pool.
#[derive(Debug)]
struct Shared {
    /// The pool's first connection (the keeper carries a closed extra's loss over to it).
    first: Weak<Wire>,
    uri: String,
    parsed: NbdUri,
    size: u64,
    extras: Mutex<Extras>,
}

/// The connections to one export.
#[derive(Debug)]
pub(crate) struct Pool {
    first: Arc<Wire>,
    /// The server advertised NBD_FLAG_CAN_MULTI_CONN.
    multi_conn: bool,
    shared: Arc<Shared>,
}

impl Pool {
    /// The pool around the first connection, `first`, to the export `uri` of `size` bytes.
    pub(crate) fn new(uri: &str, parsed: NbdUri, size: u64, first: Wire, multi_conn: bool) -> Self {
        let first = Arc::new(first);
        Pool {
            multi_conn,
            shared: Arc::new(Shared {
                first: Arc::downgrade(&first),
                uri: uri.to_string(),
                parsed,
                size,
                extras: Mutex::new(Extras {
                    open: Vec::new(),
                    keeper: false,
                    refused: false,
                    last_use: Instant::now(),
                }),
            }),
            first,
        }
    }

    /// The first connection (flush, trim and small requests).
    pub(crate) fn first(&self) -> &Wire {
        &self.first
    }

    /// Whether every connection still works.
    pub(crate) fn is_up(&self) -> bool {
        self.first.is_up() && lock(&self.shared.extras).open.iter().all(|w| w.is_up())
    }

    /// NBD_CMD_FLUSH on the first connection (multi-conn makes it cover the others), after
    /// carrying any loss on the others over to it: a failed request anywhere fails it.
    pub(crate) fn flush(&self) -> io::Result<()> {
        for w in &lock(&self.shared.extras).open {
            carry_loss(w, &self.first);
        }
        self.first.flush()
    }

    /// How many connections the pool has open now.
    pub(crate) fn connections(&self) -> usize {
        1 + lock(&self.shared.extras).open.len()
    }

    /// The connections a request of `len` bytes goes over now: the first, and for a large
    /// request the extras already open (the first large request starts opening them in the
    /// background, never waiting for them).
    fn wires(&self, len: usize) -> Vec<Arc<Wire>> {
        let mut v = vec![self.first.clone()];
        if !self.multi_conn || len < SPLIT_FROM {
            return v;
        }
        let mut g = lock(&self.shared.extras);
        g.last_use = Instant::now();
        if !g.keeper && !g.refused {
            let weak = Arc::downgrade(&self.shared);
            g.keeper = std::thread::Builder::new()
                .name("nbd-conns".into())
                .spawn(move || keep(&weak))
                .is_ok();
            g.refused = !g.keeper;
        }
        v.extend(g.open.iter().filter(|w| w.is_up()).cloned());
        v
    }

    /// After a split request failed on a link whose first connection dials again: drops the
    /// extras (they went with the server) and sends the request again on the first alone.
    fn again<T>(
        &self,
        r: io::Result<T>,
        whole: impl FnOnce(&Wire) -> io::Result<T>,
    ) -> io::Result<T> {
        match r {
            Err(_) if self.first.redials() => {
                lock(&self.shared.extras).open.clear();
                whole(&self.first)
            }
            r => r,
        }
    }

    /// Reads `buf` at `offset`, split over the connections when it is large.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let wires = self.wires(buf.len());
        if wires.len() == 1 {
            return self.first.read(offset, buf);
        }
        let piece = piece_len(buf.len(), wires.len());
        let mut lanes: Vec<Vec<(u64, &mut [u8])>> = wires.iter().map(|_| Vec::new()).collect();
        for (i, chunk) in buf.chunks_mut(piece).enumerate() {
            lanes[i % wires.len()].push((offset + (i * piece) as u64, chunk));
        }
        let r = run_lanes(&wires, lanes, |w, (off, chunk)| w.read(off, chunk));
        self.again(r, |w| w.read(offset, buf))
    }

    /// Writes `buf` at `offset`, split over the connections when it is large; returns when
    /// every piece is acknowledged.
    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let wires = self.wires(buf.len());
        if wires.len() == 1 {
            return self.first.write(offset, buf);
        }
        let piece = piece_len(buf.len(), wires.len());
        let mut lanes: Vec<Vec<(u64, &[u8])>> = wires.iter().map(|_| Vec::new()).collect();
        for (i, chunk) in buf.chunks(piece).enumerate() {
            lanes[i % wires.len()].push((offset + (i * piece) as u64, chunk));
        }
        let r = run_lanes(&wires, lanes, |w, (off, chunk)| w.write(off, chunk));
        // The first connection's flush covers the pieces the others wrote.
        if r.is_ok() {
            self.first.acked_elsewhere();
        }
        self.again(r, |w| w.write(offset, buf))
    }
}

/// The keeper thread: opens up to `CONNECTIONS - 1` extra connections (stopping at the
/// first that fails), then closes them once they go unused for [`IDLE`]. Ends with the pool.
fn keep(shared: &Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        if lock(&s.extras).open.len() + 1 >= CONNECTIONS {
            break;
        }
        let (uri, parsed, size) = (s.uri.clone(), s.parsed.clone(), s.size);
        // The pool may go away while this waits for the server.
        drop(s);
        let opened = Wire::connect_within(&uri, &parsed, EXTRA_HANDSHAKE);
        let Some(s) = shared.upgrade() else { return };
        let mut g = lock(&s.extras);
        match opened {
            Ok((w, n)) if n.export.size == size && n.multi_conn => g.open.push(Arc::new(w)),
            _ => {
                g.refused = true;
                break;
            }
        }
    }
    loop {
        std::thread::sleep(IDLE / 4);
        let Some(s) = shared.upgrade() else { return };
        let mut g = lock(&s.extras);
        if g.last_use.elapsed() >= IDLE {
            if let Some(first) = s.first.upgrade() {
                g.open.iter().for_each(|w| carry_loss(w, &first));
            }
            g.open.clear();
            g.keeper = false;
            return;
        }
    }
}

/// Marks `first` lost when `other` is.
fn carry_loss(other: &Wire, first: &Wire) {
    if let Some(why) = other.lost() {
        first.poison(&why);
    }
}

/// The length of the pieces a `len`-byte request over `n` connections is cut into: at most
/// [`PIECE_MAX`], at least one piece per connection (the last may be shorter).
fn piece_len(len: usize, n: usize) -> usize {
    len.div_ceil(n).min(PIECE_MAX).div_ceil(PIECE_ALIGN) * PIECE_ALIGN
}

/// Runs lane `i`'s pieces in order on connection `i`, the lanes in parallel (lane 0 on this
/// thread); the first error after all have ended.
fn run_lanes<T: Send>(
    wires: &[Arc<Wire>],
    mut lanes: Vec<Vec<T>>,
    op: impl Fn(&Wire, T) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let op = &op;
    let lane = move |w: &Wire, pieces: Vec<T>| -> io::Result<()> {
        pieces.into_iter().try_for_each(|p| op(w, p))
    };
    let head = std::mem::take(&mut lanes[0]);
    std::thread::scope(|s| {
        let rest: Vec<_> = lanes
            .into_iter()
            .zip(wires)
            .skip(1)
            .filter(|(pieces, _)| !pieces.is_empty())
            .map(|(pieces, w)| s.spawn(move || lane(w, pieces)))
            .collect();
        let mut r = lane(&wires[0], head);
        for h in rest {
            let piece = h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("an NBD request thread panicked")));
            if r.is_ok() {
                r = piece;
            }
        }
        if let Err(e) = &r {
            // A piece failed on some connection: the request is half done, and the link is
            // lost as a whole, as a single connection would be.
            wires[0].poison(&e.to_string());
        }
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_request_in_aligned_parts() {
        assert_eq!(piece_len(8 << 20, 4), 2 << 20);
        assert_eq!(piece_len(32 << 20, 4), PIECE_MAX);
        assert_eq!(piece_len(SPLIT_FROM, 4), 512 << 10);
        assert_eq!(piece_len((2 << 20) + 1, 4), 576 << 10);
        // At least one piece for each connection when the request is long enough.
        for (len, n) in [(SPLIT_FROM, 4), (3 << 20, 3), ((32 << 20) - 7, 4)] {
            assert!(len.div_ceil(piece_len(len, n)) >= n);
        }
    }
}
