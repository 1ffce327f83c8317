//! Progress of long savevm/loadvm operations: byte counters around the stream's writer and
//! reader that report to a callback.

use std::io::{Read, Write};

/// Bytes of VM state moved so far and the expected total (guest RAM size: the stream is
/// about that large at most, less for zero pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes written or read.
    pub done: u64,
    /// Expected bytes.
    pub total: u64,
}

/// Callback receiving progress reports.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress);

/// Report granularity.
const STEP: u64 = 4 << 20;

/// Counts bytes passing through `inner` and reports every [`STEP`] bytes.
pub struct Counting<'p, T> {
    inner: T,
    done: u64,
    reported: u64,
    total: u64,
    report: ProgressFn<'p>,
}

impl<T> std::fmt::Debug for Counting<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counting")
            .field("done", &self.done)
            .field("total", &self.total)
            .finish()
    }
}

impl<'p, T> Counting<'p, T> {
    /// Wraps `inner`, expecting about `total` bytes.
    pub fn new(inner: T, total: u64, report: ProgressFn<'p>) -> Self {
        Counting {
            inner,
            done: 0,
            reported: 0,
            total,
            report,
        }
    }

    /// Wraps `inner` for the second part of an operation whose first part already moved
    /// `done` of the `total` bytes.
    pub fn continuing(inner: T, done: u64, total: u64, report: ProgressFn<'p>) -> Self {
        Counting {
            inner,
            done,
            reported: done,
            total,
            report,
        }
    }

    fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.done - self.reported >= STEP {
            self.reported = self.done;
            (self.report)(Progress {
                done: self.done,
                total: self.total.max(self.done),
            });
        }
    }
}

impl<T: Write> Write for Counting<'_, T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.add(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Counting<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.add(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_step() {
        let mut seen = Vec::new();
        let mut cb = |p: Progress| seen.push(p.done);
        let mut w = Counting::new(Vec::new(), 10 << 20, &mut cb);
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..9 {
            w.write_all(&chunk).unwrap();
        }
        drop(w);
        assert_eq!(seen, [4 << 20, 8 << 20]);
    }
}
