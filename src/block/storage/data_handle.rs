//! A second descriptor of an image file, for bulk data the image driver has already placed.
//!
//! A running VM's drivers sit behind the device lock its vCPUs take for every I/O exit. A
//! long write into the VM state area or an `fdatasync` of a file holding a GiB of fresh state
//! can take tens to hundreds of milliseconds (the kernel throttles a writer that dirties the
//! page cache faster than the device takes it); done under that lock, the guest stands still
//! for all of it. With a [`DataHandle`], the driver only maps the clusters under the lock
//! (see [`crate::block::SnapshotStore::vmstate_write_detached`]) and the caller writes the
//! data and syncs through this handle with the lock released.
//!
//! The handle is a new open file description of the same file (opened through
//! `/proc/self/fd`, so it follows the file even if its name changed), not a `dup`: image
//! locks are OFD locks, and a duplicate would keep the driver's locks alive as long as the
//! handle lives.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Writes and syncs an image file without its driver. Only for byte ranges the driver has
/// allocated for the caller and will not touch until the caller is done with them.
#[derive(Debug)]
pub struct DataHandle {
    file: File,
}

impl DataHandle {
    /// A writable handle on the file behind `file`.
    pub(crate) fn reopen(file: &File) -> io::Result<DataHandle> {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(DataHandle { file })
    }

    /// Writes all of `buf` at host offset `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// `fdatasync`: makes what was written to the file so far (through any descriptor)
    /// durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Writes through a [`DataHandle`] with a bounded amount of unsynced data: once `window`
/// bytes were written, a helper thread syncs them while the next window is written, and the
/// writer waits for that sync before it starts the window after. A long write (a GiB of VM
/// state) thus never fills the page cache with dirty pages, so the kernel never throttles it
/// (or anyone else) in `balance_dirty_pages`, and the last sync has at most two windows to
/// write.
#[derive(Debug)]
pub struct WriteBehind {
    file: Arc<File>,
    window: u64,
    since: u64,
    ask: Option<SyncSender<()>>,
    done: Receiver<io::Result<()>>,
    pending: bool,
    thread: Option<JoinHandle<()>>,
}

impl WriteBehind {
    /// Writes through `handle`, syncing every `window` bytes behind the writer.
    pub fn new(handle: DataHandle, window: u64) -> io::Result<WriteBehind> {
        let file = Arc::new(handle.file);
        let (ask, asked) = sync_channel::<()>(1);
        let (tell, done) = sync_channel::<io::Result<()>>(1);
        let f = Arc::clone(&file);
        let thread = std::thread::Builder::new()
            .name("vmsnap-behind".into())
            .spawn(move || {
                while asked.recv().is_ok() {
                    if tell.send(f.sync_data()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(WriteBehind {
            file,
            window: window.max(1),
            since: 0,
            ask: Some(ask),
            done,
            pending: false,
            thread: Some(thread),
        })
    }

    /// Waits for the sync in flight, if any.
    fn wait(&mut self) -> io::Result<()> {
        if !self.pending {
            return Ok(());
        }
        self.pending = false;
        self.done
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the write-behind thread ended")))
    }

    /// Writes all of `buf` at host offset `offset`; may wait for the previous window's sync.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        self.since += buf.len() as u64;
        if self.since >= self.window {
            self.wait()?;
            if let Some(ask) = &self.ask {
                ask.send(())
                    .map_err(|_| io::Error::other("the write-behind thread ended"))?;
                self.pending = true;
            }
            self.since = 0;
        }
        Ok(())
    }

    /// Waits for the sync in flight and syncs the rest: everything written is durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.wait()?;
        self.since = 0;
        self.file.sync_data()
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.ask = None;
        let _ = self.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_the_file_and_leave_its_locks_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let name = p.display().to_string();
        crate::block::lock::lock_image(&f, &name, true).unwrap();
        let h = DataHandle::reopen(&f).unwrap();
        h.write_at(4096, b"state").unwrap();
        h.sync().unwrap();
        let mut b = [0u8; 5];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"state");
        // The driver's descriptor goes: its lock goes with it although the handle lives on.
        drop(f);
        let again = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        // Another test thread's fork holds a copy of every descriptor until its exec
        // (close-on-exec), the driver's too: a lock may stay held for that instant.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let lock = loop {
            let lock = crate::block::lock::lock_image(&again, &name, true);
            if lock.is_ok() || std::time::Instant::now() > deadline {
                break lock;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(lock.is_ok(), "{lock:?}");
        drop(h);
    }

    #[test]
    fn write_behind_keeps_every_byte_and_syncs_in_windows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = std::fs::File::create(&p).unwrap();
        let mut w = WriteBehind::new(DataHandle::reopen(&f).unwrap(), 64 << 10).unwrap();
        for i in 0..40u8 {
            w.write_at(u64::from(i) * 20_000, &[i; 20_000]).unwrap();
        }
        w.sync().unwrap();
        drop(w);
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 40 * 20_000);
        for (i, c) in data.chunks(20_000).enumerate() {
            assert!(c.iter().all(|&b| usize::from(b) == i), "chunk {i}");
        }
    }
}
