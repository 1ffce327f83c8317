//! A stream file read through windows of a memory mapping, for the inspector's fast path.
//!
//! The default `--dump state` needs the 9-byte header of every RAM page but never its body.
//! Reading the file (even with `read(2)` into a large buffer) copies every body; `pread(2)` per
//! header costs a system call per page. Mapping the file in windows of [`WINDOW`] bytes and
//! copying out only the bytes asked for touches each page table entry once and copies almost
//! nothing; the stream reader seeks over bodies ([`Seek`]). Each window is unmapped when the
//! reader moves past it, so resident memory stays near two windows whatever the file size.
//!
//! Much of the time goes to the page tables: mapping the file's pages and unmapping them
//! again. A helper thread (the mapper) maps the window after the current one, faults it in
//! (one byte per 64 KiB: each fault maps the neighbouring cached pages too, which is faster
//! than `MAP_POPULATE`'s page-by-page walk) and unmaps the window before, while the reader
//! works. On a 1.1 GiB stream on this 2-core machine (`perf stat -r 15`): 0.124 s with
//! neither; 0.044 s with a thread that only faulted the next window in (the reader still
//! mapped and unmapped, 10 % of its samples in the kernel's unmap); 0.037 s with the mapper
//! using `MAP_POPULATE`, which made the mapper the bottleneck; 0.033 s as now.
//!
//! Reads return at most [`MAX_READ`] bytes, so the stream reader's 64 KiB buffer is never
//! filled with page bodies it would then skip.
//!
//! The file must not be truncated while it is mapped (reading a page beyond the new end would
//! raise SIGBUS); the inspector only reads files at rest.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::mpsc;

/// Bytes mapped at a time.
pub const WINDOW: u64 = 8 << 20;
/// Windows the mapper prepares ahead of the reader (two, so that the reader seldom waits for
/// one when the scheduler puts both threads on one CPU for a while).
const AHEAD: usize = 2;
/// Most bytes returned by one `read`.
pub const MAX_READ: usize = 64;

/// Strides between reads (page records: header + body) for which the next headers are
/// prefetched, and how many records ahead.
const PREFETCH_MIN_STRIDE: u64 = 4096;
const PREFETCH_MAX_STRIDE: u64 = 1 << 16;
const PREFETCH_RECORDS: usize = 4;

#[cfg(target_arch = "x86_64")]
fn prefetch(p: *const i8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is only a hint: it never
    // faults or reads into the program, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_p: *const i8) {}

/// Bytes the kernel maps per page fault on a file mapping (its default `fault_around_bytes`;
/// more where the page cache holds large folios).
const FAULT_AROUND: usize = 64 << 10;

/// One mapped window of the file. The address is kept as an integer so that a window can be
/// handed to the mapper thread to be unmapped there.
#[derive(Debug)]
struct Window {
    addr: usize,
    /// File offset of the first mapped byte (page aligned).
    start: u64,
    /// Mapped length.
    len: usize,
}

impl Window {
    /// Maps `len` bytes of `file` at `start`.
    fn map(file: &File, start: u64, len: usize) -> io::Result<Window> {
        let offset = libc::off_t::try_from(start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh read-only private mapping of `len` bytes (≥ 1, inside the file) of
        // an open file at a page-aligned offset; the kernel chooses the address, so no
        // existing memory is affected. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window {
            addr: ptr as usize,
            start,
            len,
        })
    }

    /// Faults the window's pages in by reading one byte per [`FAULT_AROUND`] bytes (the
    /// kernel maps the neighbouring cached pages of each fault in the same call, faster than
    /// `MAP_POPULATE`'s page-by-page walk).
    fn touch(&self) {
        for off in (0..self.len).step_by(FAULT_AROUND) {
            // SAFETY: `off < len`, inside this live read-only mapping; the byte is read and
            // dropped, only for the page fault.
            unsafe { std::ptr::read_volatile(self.ptr().add(off)) };
        }
    }

    fn ptr(&self) -> *const u8 {
        self.addr as *const u8
    }

    fn covers(&self, pos: u64) -> bool {
        pos >= self.start && pos < self.start + self.len as u64
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly what mmap returned for this window, and no reference
        // into the mapping outlives the window (bytes are copied out of it).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// What the mapper thread is asked to do.
enum Job {
    /// Map (and populate) the window at this offset and send it back.
    Map(u64, usize),
    /// Unmap this window (dropping it is the unmap).
    Unmap(Window),
}

/// The helper thread that maps the next window, with its page table entries filled in, and
/// unmaps the previous one while the reader works on the current window: both system calls
/// (and the page table work of a mapping, most of the inspector's system time) leave the
/// reader's path.
struct Mapper {
    jobs: Option<mpsc::Sender<Job>>,
    ready: mpsc::Receiver<io::Result<Window>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mapper {
    fn spawn(file: &File) -> Option<Mapper> {
        let file = file.try_clone().ok()?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mapper".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Map(start, len) => {
                            let w = Window::map(&file, start, len).inspect(Window::touch);
                            if tx.send(w).is_err() {
                                return;
                            }
                        }
                        Job::Unmap(w) => drop(w),
                    }
                }
            })
            .ok()?;
        Some(Mapper {
            jobs: Some(jobs),
            ready,
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        // Closing the job channel ends the thread's loop; a window it mapped and never
        // handed over is unmapped when the `ready` channel drops after the join.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A file read through a moving window of a read-only private mapping.
pub struct MappedFile<'f> {
    file: &'f File,
    len: u64,
    pos: u64,
    window: Option<Window>,
    /// The offsets of the windows the mapper is preparing, in order.
    ahead: VecDeque<u64>,
    mapper: Option<Mapper>,
    /// Where the previous read started (to see the stride of page records).
    last_read: u64,
}

impl std::fmt::Debug for MappedFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.len)
            .field("pos", &self.pos)
            .field("window", &self.window)
            .field("ahead", &self.ahead)
            .finish()
    }
}

impl<'f> MappedFile<'f> {
    /// Reads `file` from offset 0 through mappings.
    pub fn new(file: &'f File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(MappedFile {
            file,
            len,
            pos: 0,
            window: None,
            ahead: VecDeque::new(),
            mapper: Mapper::spawn(file),
            last_read: 0,
        })
    }

    /// Maps the window holding `self.pos` (which is below `self.len`), and has the mapper
    /// prepare the next [`AHEAD`] ones.
    fn map_at_pos(&mut self) -> io::Result<&Window> {
        if !self.window.as_ref().is_some_and(|w| w.covers(self.pos)) {
            let start = self.pos & !(WINDOW - 1);
            // Retire the old window first: at most AHEAD + 2 are resident (this one, those
            // ahead, the one being unmapped).
            if let Some(old) = self.window.take() {
                // Without a mapper, the window is unmapped here, as the job drops.
                self.mapper_send(Job::Unmap(old));
            }
            let prepared = match self.ahead.front() {
                Some(&at) if at == start => {
                    self.ahead.pop_front();
                    self.receive()
                }
                // A seek away from the windows ahead: they are unmapped as they arrive.
                Some(_) => {
                    while self.ahead.pop_front().is_some() {
                        drop(self.receive());
                    }
                    None
                }
                None => None,
            };
            self.window = Some(match prepared {
                Some(w) => w,
                None => self.map_window(start)?,
            });
            let mut next = self.ahead.back().map_or(start, |&b| b) + WINDOW;
            while self.ahead.len() < AHEAD && next < self.len {
                let len = self.window_len(next)?;
                if !self.mapper_send(Job::Map(next, len)) {
                    break;
                }
                self.ahead.push_back(next);
                next += WINDOW;
            }
        }
        self.window
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Other))
    }

    /// The next window the mapper prepared (None if it failed to map it, or is gone).
    fn receive(&self) -> Option<Window> {
        self.mapper.as_ref()?.ready.recv().ok()?.ok()
    }

    /// Hands `job` to the mapper; false (the job dropped) when there is no mapper to take
    /// it. A send fails only when the thread is gone: the file is then read without it.
    fn mapper_send(&mut self, job: Job) -> bool {
        let sent = self.mapper.as_ref().is_some_and(|m| m.send(job));
        if !sent {
            self.mapper = None;
        }
        sent
    }

    fn window_len(&self, start: u64) -> io::Result<usize> {
        usize::try_from((self.len - start).min(WINDOW))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }

    fn map_window(&self, start: u64) -> io::Result<Window> {
        Window::map(self.file, start, self.window_len(start)?)
    }
}

impl Read for MappedFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let pos = self.pos;
        let stride = pos.wrapping_sub(self.last_read);
        self.last_read = pos;
        let w = self.map_at_pos()?;
        let at = usize::try_from(pos - w.start).unwrap_or(usize::MAX);
        let n = buf.len().min(MAX_READ).min(w.len - at);
        // SAFETY: `at + n <= w.len`, so the source range lies inside the live mapping; `buf`
        // holds at least `n` bytes and cannot overlap a mapping we just created.
        unsafe {
            std::ptr::copy_nonoverlapping(w.ptr().add(at), buf.as_mut_ptr(), n);
        }
        // Reads that step over page bodies touch one new page each time, and wait for it:
        // ask the CPU for the header a few records ahead (a prefetch never faults).
        if (PREFETCH_MIN_STRIDE..=PREFETCH_MAX_STRIDE).contains(&stride) {
            let ahead = at.saturating_add(PREFETCH_RECORDS * stride as usize);
            if ahead < w.len {
                prefetch(w.ptr().cast::<i8>().wrapping_add(ahead));
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for MappedFile<'_> {
    /// Seeks like a file, except that a position beyond the end is an
    /// [`io::ErrorKind::UnexpectedEof`] error (the stream reader reports a truncated stream).
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(t) if t <= self.len => {
                self.pos = t;
                Ok(t)
            }
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_across_windows_and_refuses_seeks_past_the_end() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..WINDOW as usize + 5000)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let mut m = MappedFile::new(&f).unwrap();
        let mut head = [0u8; 1000];
        assert_eq!(m.read(&mut head).unwrap(), MAX_READ);
        assert_eq!(&head[..MAX_READ], &data[..MAX_READ]);
        // Just before the window boundary: the read stops at it, the next one maps the next.
        m.seek(SeekFrom::Start(WINDOW - 10)).unwrap();
        let mut b = [0u8; MAX_READ / 2];
        assert_eq!(m.read(&mut b).unwrap(), 10);
        assert_eq!(m.read(&mut b).unwrap(), b.len());
        let w = WINDOW as usize;
        assert_eq!(&b[..], &data[w..w + b.len()]);
        let mut rest = Vec::new();
        m.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &data[w + b.len()..]);
        let e = m.seek(SeekFrom::Current(1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(m.seek(SeekFrom::Start(3)).unwrap(), 3);
        // Back to the first window, which the one mapped ahead does not cover.
        let mut one = [0u8; 1];
        assert_eq!(m.read(&mut one).unwrap(), 1);
        assert_eq!(one[0], data[3]);
    }
}
