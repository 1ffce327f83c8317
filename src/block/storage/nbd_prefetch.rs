//! Read-ahead one window ahead, in the background: while a sequential reader works through
//! the current window ([`super::nbd_readahead`]), a worker thread fetches the next one, so
//! that the transfer overlaps the reader's own work (loadvm parsing a VM state, the lazy
//! fill installing pages) instead of adding to it.
//!
//! One job at a time: the window that starts where the current one ends. The reader takes it
//! when its reads get there (waiting if it is still on its way); a read elsewhere leaves it.
//! Coherence with writes: a job is only started when no write is queued (the server has every
//! byte written so far), and every write, trim or error through the storage bumps a
//! generation, which drops whatever the job read. The storage holds its read-ahead lock around
//! both, so a job can never be taken with bytes older than a write that came before the read.
//! A failed job is not reported by itself (it was speculative); it leaves the connection lost,
//! so the next request says why.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use super::nbd_pool::Pool;
use super::nbd_wire::lock;

/// One window to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    start: u64,
    len: usize,
    generation: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped by every write, trim and error: a job of an older generation is stale.
    generation: u64,
    /// Asked for, not yet started.
    wanted: Option<Job>,
    /// Being fetched.
    running: Option<Job>,
    /// Fetched.
    done: Option<(Job, io::Result<Vec<u8>>)>,
    /// A buffer to fetch into (the window the reader last gave back).
    spare: Option<Vec<u8>>,
    /// The worker is running.
    worker: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// The next window, fetched by a worker thread (started on first use, stopped on drop).
#[derive(Debug, Default)]
pub(crate) struct Prefetch {
    shared: Arc<Shared>,
}

impl Prefetch {
    /// Asks for `[start, start + len)` unless that is already asked for or fetched; drops any
    /// other job's result. The caller has checked that no write is queued.
    pub(crate) fn ask(&self, pool: &Arc<Pool>, start: u64, len: usize) {
        let mut g = self.shared.lock();
        let generation = g.generation;
        let job = Job {
            start,
            len,
            generation,
        };
        let known = [g.wanted, g.running, g.done.as_ref().map(|(j, _)| *j)];
        if known
            .iter()
            .flatten()
            .any(|j| j.start == start && j.generation == generation)
        {
            return;
        }
        if g.done.as_ref().is_some_and(|(j, _)| j.start != start) {
            if let Some((_, Ok(buf))) = g.done.take() {
                g.spare = Some(buf);
            }
        }
        g.wanted = Some(job);
        if !g.worker {
            let shared = self.shared.clone();
            let pool = Arc::downgrade(pool);
            g.worker = std::thread::Builder::new()
                .name("nbd-read-ahead".into())
                .spawn(move || work(&shared, &pool))
                .is_ok();
            if !g.worker {
                g.wanted = None;
            }
        }
        self.shared.changed.notify_all();
    }

    /// The window starting at `start` if a current job holds it, waiting for it to arrive;
    /// `None` when there is none (the caller reads it itself).
    pub(crate) fn take(&self, start: u64) -> Option<io::Result<Vec<u8>>> {
        let mut g = self.shared.lock();
        let current = |j: &Option<Job>, generation: u64| {
            j.is_some_and(|j| j.start == start && j.generation == generation)
        };
        loop {
            let generation = g.generation;
            if current(&g.done.as_ref().map(|(j, _)| *j), generation) {
                return g.done.take().map(|(_, r)| r);
            }
            if !current(&g.wanted, generation) && !current(&g.running, generation) {
                // None for this window, or dropped while waiting (a write came in between):
                // the caller reads it directly.
                return None;
            }
            g = self.shared.wait(g);
        }
    }

    /// A buffer the reader no longer needs, for the next job.
    pub(crate) fn give_back(&self, buf: Vec<u8>) {
        self.shared.lock().spare = Some(buf);
    }

    /// Makes every job asked for so far stale (a write, a trim, an error).
    pub(crate) fn invalidate(&self) {
        let mut g = self.shared.lock();
        g.generation += 1;
        g.wanted = None;
        if let Some((_, Ok(buf))) = g.done.take() {
            g.spare = Some(buf);
        }
        self.shared.changed.notify_all();
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
    }
}

/// The worker: fetches each job asked for, until the prefetcher or the pool goes away.
fn work(s: &Shared, pool: &Weak<Pool>) {
    loop {
        let (job, mut buf) = {
            let mut g = s.lock();
            loop {
                if g.stop {
                    return;
                }
                if let Some(job) = g.wanted.take() {
                    g.running = Some(job);
                    break (job, g.spare.take().unwrap_or_default());
                }
                g = s.wait(g);
            }
        };
        let Some(pool) = pool.upgrade() else { return };
        buf.resize(job.len, 0);
        let r = pool.read(job.start, &mut buf).map(|()| buf);
        drop(pool);
        let mut g = s.lock();
        g.running = None;
        if job.generation == g.generation {
            g.done = Some((job, r));
        } else if let Ok(buf) = r {
            g.spare = Some(buf);
        }
        s.changed.notify_all();
    }
}
