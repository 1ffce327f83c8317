//! Write-behind for an NBD export: writes are handed to a worker thread that sends them in
//! order, so that the writer (savevm encoding the VM state, a guest) goes on while the
//! previous piece crosses the network and the server stores it.
//!
//! The client has one request in flight, so without this every write waits a round trip
//! plus the server's own write before the caller may produce the next one. Semantics are a
//! write-back cache's, as on a local file's page cache: a write that returned may still be
//! on its way; [`WriteBehind::drain`] waits for everything queued and reports the first
//! failure, and the storage drains before every flush (so crash ordering, which rests on
//! flushes, is kept), every read that goes to the server, and every trim. A failure is
//! sticky: every later write and drain fails with it (the connection is lost anyway).
//! At most [`LIMIT`] bytes wait in the queue; a writer past it waits for room.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Most bytes queued at once.
pub(crate) const LIMIT: usize = 32 << 20;

/// Sends one write (the connection's).
pub(crate) type Sink = Box<dyn Fn(u64, &[u8]) -> io::Result<()> + Send>;

#[derive(Default)]
struct State {
    queue: VecDeque<(u64, Vec<u8>)>,
    queued_bytes: usize,
    /// The worker is sending a write it took off the queue.
    busy: bool,
    /// The first failure (kind, message).
    failed: Option<(io::ErrorKind, String)>,
    /// The failure was returned to a caller once; later calls say the connection is lost.
    reported: bool,
    stop: bool,
    /// Buffers of writes already sent, for the next ones (at most [`LIMIT`] bytes of them):
    /// a fresh 8 MiB allocation costs the kernel 2,048 zeroed pages, more than the copy.
    free: Vec<Vec<u8>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        super::nbd_wire::lock(&self.state)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue and its worker thread (stopped, after sending what is queued, on drop).
pub(crate) struct WriteBehind {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("WriteBehind")
            .field("queued_bytes", &s.queued_bytes)
            .field("failed", &s.failed)
            .finish()
    }
}

/// The sticky failure for a caller: as it happened the first time, then as a lost connection
/// (the request that failed was an earlier one).
fn failure(g: &mut State) -> Option<io::Error> {
    let (kind, msg) = g.failed.as_ref()?;
    let e = if std::mem::replace(&mut g.reported, true) {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "NBD connection lost earlier ({msg}); reopen the image once the server is back"
            ),
        )
    } else {
        io::Error::new(*kind, msg.clone())
    };
    Some(e)
}

impl WriteBehind {
    /// Starts the worker; it sends every queued write through `sink`.
    ///
    /// # Errors
    /// The thread could not be started.
    pub(crate) fn start(sink: Sink) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("nbd-write-behind".into())
            .spawn(move || work(&s, &sink))?;
        Ok(WriteBehind {
            shared,
            worker: Some(worker),
        })
    }

    /// Queues a copy of `bytes` for `offset`, waiting for room first.
    ///
    /// # Errors
    /// An earlier queued write failed.
    pub(crate) fn push(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut g = self.shared.lock();
        loop {
            if let Some(e) = failure(&mut g) {
                return Err(e);
            }
            // An empty queue takes any write (one larger than the limit goes alone).
            if g.queued_bytes == 0 || g.queued_bytes + bytes.len() <= LIMIT {
                break;
            }
            g = self.shared.wait(g);
        }
        let mut data = g.free.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(bytes);
        g.queued_bytes += data.len();
        g.queue.push_back((offset, data));
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Whether nothing is queued or on its way (the server has every write so far).
    pub(crate) fn is_idle(&self) -> bool {
        let g = self.shared.lock();
        !g.busy && g.queue.is_empty()
    }

    /// Waits until every queued write was sent.
    ///
    /// # Errors
    /// The first queued write that failed.
    pub(crate) fn drain(&self) -> io::Result<()> {
        let mut g = self.shared.lock();
        while g.failed.is_none() && (g.busy || !g.queue.is_empty()) {
            g = self.shared.wait(g);
        }
        match failure(&mut g) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn work(s: &Shared, sink: &Sink) {
    loop {
        let (offset, data) = {
            let mut g = s.lock();
            loop {
                if g.failed.is_some() {
                    // Nothing more goes out; what is queued is dropped (drain reports why).
                    g.queue.clear();
                    g.queued_bytes = 0;
                }
                if let Some(w) = g.queue.pop_front() {
                    g.busy = true;
                    break w;
                }
                if g.stop {
                    return;
                }
                g = s.wait(g);
            }
        };
        let r = sink(offset, &data);
        let mut g = s.lock();
        g.busy = false;
        g.queued_bytes -= data.len();
        let kept: usize = g.free.iter().map(Vec::capacity).sum();
        if kept + data.capacity() <= LIMIT {
            g.free.push(data);
        }
        if let Err(e) = r {
            g.failed.get_or_insert((e.kind(), e.to_string()));
        }
        s.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn writes_go_out_in_order_and_a_failure_sticks() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicUsize::new(0));
        let (l, n) = (log.clone(), sent.clone());
        let wb = WriteBehind::start(Box::new(move |off, data: &[u8]| {
            if off == 666 {
                return Err(io::Error::other("server gone"));
            }
            l.lock().unwrap().push((off, data.len()));
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }))
        .unwrap();
        for i in 0..20u64 {
            // Larger than the limit in total: the writer waits for room.
            wb.push(i * 10, &vec![0u8; 4 << 20]).unwrap();
        }
        wb.drain().unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 20);
        let order: Vec<u64> = log.lock().unwrap().iter().map(|w| w.0).collect();
        assert_eq!(order, (0..20).map(|i| i * 10).collect::<Vec<_>>());
        wb.push(666, &[1]).unwrap();
        let e = wb.drain().unwrap_err();
        assert!(e.to_string().contains("server gone"), "{e}");
        let e = wb.push(0, &[1]).unwrap_err();
        assert!(e.to_string().contains("lost earlier (server gone)"), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        assert!(wb.drain().is_err());
        assert_eq!(sent.load(Ordering::SeqCst), 20);
    }

    #[test]
    fn drop_sends_what_is_queued() {
        let sent = Arc::new(AtomicUsize::new(0));
        let n = sent.clone();
        let wb = WriteBehind::start(Box::new(move |_, _: &[u8]| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }))
        .unwrap();
        for i in 0..5 {
            wb.push(i, &[0u8; 10]).unwrap();
        }
        drop(wb);
        assert_eq!(sent.load(Ordering::SeqCst), 5);
    }
}
