//! Guest RAM as the "ram" section of a live migration: every page is dirty at setup, each
//! PART sends dirty pages up to a byte budget, [`LiveRam::sync`] merges the VM's dirty
//! bitmap in, and the END section sends whatever is still dirty (the VM is stopped then).
//!
//! Pages are copied one at a time from guest memory into a page buffer (the guest may be
//! writing them; a page written after its dirty bit was fetched is dirty again and is sent
//! again), zero pages go out as ZERO records. The source drives it through a shared
//! [`RefCell`] ([`LiveRamEntry`] is what the save registry holds).

use std::cell::RefCell;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::migration::page_index::PageRecorder;
use crate::migration::ram::{is_zero, RamBlockInfo, RamRecord, RamWriter};
use crate::migration::savevm::{handler_err, IterativeState, Sink, Source};
use crate::migration::stream::{self, ErrorKind, Event, StreamError};

use super::pagemap::Pagemap;
use super::xbzrle_send::{Outcome, XbzrleSender};

/// Where pages are read from.
pub trait PageSource {
    /// Bytes of RAM.
    fn ram_len(&self) -> u64;
    /// Copies the page at `addr` into `buf` (one page).
    fn read_page(&self, addr: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Host address of RAM when it is one private anonymous mapping, whose never-touched
    /// pages can be found in the pagemap (see [`Pagemap`]).
    fn anonymous_base(&self) -> Option<u64> {
        None
    }
    /// The page at `addr` (`len` bytes) lent in place, when RAM can be read without a copy;
    /// `None` makes the caller copy it with [`PageSource::read_page`].
    fn page_slice(&self, _addr: u64, _len: u64) -> Option<&[u8]> {
        None
    }
}

impl PageSource for GuestMemoryMmap {
    fn ram_len(&self) -> u64 {
        self.iter().map(vm_memory::GuestMemoryRegion::len).sum()
    }

    fn read_page(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.read_slice(buf, GuestAddress(addr))
            .map_err(|e| format!("reading guest page {addr:#x}: {e}"))
    }

    fn anonymous_base(&self) -> Option<u64> {
        // The VMM's RAM is one anonymous private mapping (vm-memory's `from_ranges`).
        if self.num_regions() != 1 {
            return None;
        }
        self.get_host_address(GuestAddress(0))
            .ok()
            .map(|p| p as usize as u64)
    }
}

impl PageSource for [u8] {
    fn ram_len(&self) -> u64 {
        self.len() as u64
    }

    fn read_page(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let a = usize::try_from(addr).map_err(|_| format!("page {addr:#x}"))?;
        let src = a
            .checked_add(buf.len())
            .and_then(|end| self.get(a..end))
            .ok_or_else(|| format!("page {addr:#x} beyond RAM"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn page_slice(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let a = usize::try_from(addr).ok()?;
        self.get(a..a.checked_add(usize::try_from(len).ok()?)?)
    }
}

/// The VMM's guest RAM as one byte slice (`Vm::ram`): one private anonymous mapping, so
/// pages are sent straight from it and its never-touched pages are found in the pagemap.
/// The vCPUs may write a page while it is being sent; such a page is dirty again in the
/// next dirty-log fetch and is sent again, as with a copy.
#[derive(Debug, Clone, Copy)]
pub struct GuestRam<'m>(pub &'m [u8]);

impl PageSource for GuestRam<'_> {
    fn ram_len(&self) -> u64 {
        self.0.ram_len()
    }

    fn read_page(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_page(addr, buf)
    }

    fn anonymous_base(&self) -> Option<u64> {
        Some(self.0.as_ptr() as usize as u64)
    }

    fn page_slice(&self, addr: u64, len: u64) -> Option<&[u8]> {
        self.0.page_slice(addr, len)
    }
}

/// Counters shown by `info migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamCounters {
    /// Pages sent as ZERO records ("duplicate").
    pub zero_pages: u64,
    /// Pages sent with their data ("normal").
    pub normal_pages: u64,
    /// Pages sent as XBZRLE records.
    pub xbzrle_pages: u64,
    /// Dirty bitmap syncs so far (the setup counts as the first).
    pub dirty_syncs: u64,
}

/// Longest a PART may take (QEMU's `MAX_WAIT`), checked every 64 pages, so
/// that the migration loop gets back to its clock, cancel flag and dirty log.
pub const PART_TIME_LIMIT: Duration = Duration::from_millis(50);
/// Pages sent between two looks at the clock.
const CHECK_EVERY: u64 = 64;

/// Live RAM migration state of one RAM block.
#[derive(Debug)]
pub struct LiveRam<'m, M: PageSource + ?Sized> {
    mem: &'m M,
    block: String,
    page_size: u64,
    pages: u64,
    dirty: Vec<u64>,
    pending: u64,
    cursor: u64,
    budget: u64,
    writer: Option<RamWriter>,
    page: Vec<u8>,
    zero: Vec<u8>,
    pagemap: Option<(Pagemap, u64)>,
    hint: Option<(u64, u64)>,
    /// Counters for `info migrate`.
    pub counters: RamCounters,
    /// Send pages with data LZ4-compressed (the registry must announce the capability).
    pub lz4: bool,
    /// Where each page's last copy lands in the stream, for a page index (live savevm).
    pub recorder: Option<PageRecorder>,
    /// Re-sent pages as XBZRLE deltas (the `xbzrle` capability), when set.
    pub xbzrle: Option<XbzrleSender>,
}

impl<'m, M: PageSource + ?Sized> LiveRam<'m, M> {
    /// RAM block `block` of `mem`, with every page dirty.
    pub fn new(mem: &'m M, block: &str, page_size: u64) -> Self {
        let pages = mem.ram_len() / page_size.max(1);
        let words = pages.div_ceil(64) as usize;
        let mut dirty = vec![u64::MAX; words];
        if pages % 64 != 0 {
            if let Some(last) = dirty.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        LiveRam {
            mem,
            block: block.to_string(),
            page_size,
            pages,
            dirty,
            pending: pages,
            cursor: 0,
            budget: u64::MAX,
            writer: None,
            page: vec![0; page_size as usize],
            zero: vec![0; page_size as usize],
            lz4: false,
            recorder: None,
            xbzrle: None,
            pagemap: match mem.anonymous_base() {
                Some(base) if page_size == 4096 => Pagemap::open().map(|p| (p, base)),
                _ => None,
            },
            hint: None,
            counters: RamCounters {
                dirty_syncs: 1,
                ..RamCounters::default()
            },
        }
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Bytes of RAM.
    pub fn total_bytes(&self) -> u64 {
        self.pages * self.page_size
    }

    /// Bytes still dirty (QEMU's pending RAM).
    pub fn pending_bytes(&self) -> u64 {
        self.pending * self.page_size
    }

    /// Limits the bytes the next PART may write (the rate limiter's allowance).
    pub fn set_budget(&mut self, bytes: u64) {
        self.budget = bytes;
    }

    /// Merges a dirty bitmap (bit i = page i, as KVM's) into the pages to send; returns
    /// how many pages became dirty that were not already.
    pub fn sync(&mut self, bitmap: &[u64]) -> u64 {
        let mut newly = 0u64;
        for (d, b) in self.dirty.iter_mut().zip(bitmap) {
            let add = *b & !*d;
            newly += u64::from(add.count_ones());
            *d |= add;
        }
        self.pending += newly;
        self.counters.dirty_syncs += 1;
        newly
    }

    /// Takes the dirty set out, leaving nothing pending (postcopy sends those pages on
    /// demand instead): bit i = page i.
    pub fn take_dirty(&mut self) -> Vec<u64> {
        self.pending = 0;
        let empty = vec![0; self.dirty.len()];
        std::mem::replace(&mut self.dirty, empty)
    }

    /// Whether `page` was never touched, from the pagemap (read 64 pages at a time; the
    /// hint is dropped at each PART so it is never older than the last dirty-log fetch).
    fn untouched(&mut self, page: u64) -> bool {
        let Some((pm, base)) = self.pagemap.as_mut() else {
            return false;
        };
        let word = page / 64;
        let bits = match self.hint {
            Some((w, bits)) if w == word => bits,
            _ => {
                let first = word * 64;
                let n = (self.pages - first).min(64) as usize;
                match pm.untouched(*base + first * self.page_size, n) {
                    Some(b) => {
                        let bits = b.first().copied().unwrap_or(0);
                        self.hint = Some((word, bits));
                        bits
                    }
                    None => {
                        self.pagemap = None;
                        return false;
                    }
                }
            }
        };
        bits & (1 << (page % 64)) != 0
    }

    fn next_dirty(&self) -> Option<u64> {
        let start = self.cursor;
        let mut w = (start / 64) as usize;
        let mut mask = !0u64 << (start % 64);
        while let Some(word) = self.dirty.get(w) {
            let bits = word & mask;
            if bits != 0 {
                return Some(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            mask = !0;
        }
        None
    }

    /// Sends dirty pages until `budget` bytes are written, `time_limit` has passed or none
    /// is left (wrapping around to the start once, as QEMU's page search does).
    fn send(&mut self, f: &mut Sink<'_>, budget: u64, time_limit: Duration) -> Result<(), String> {
        let mut w = self.writer.take().ok_or("RAM sent before setup")?;
        let r = self.send_with(&mut w, f, budget, time_limit);
        self.writer = Some(w);
        r
    }

    fn send_with(
        &mut self,
        w: &mut RamWriter,
        f: &mut Sink<'_>,
        budget: u64,
        time_limit: Duration,
    ) -> Result<(), String> {
        let start = f.position();
        let started = Instant::now();
        self.hint = None;
        let mut wrapped = false;
        let mut n = 0u64;
        while self.pending > 0 && f.position() - start < budget {
            n += 1;
            if n % CHECK_EVERY == 0 && started.elapsed() > time_limit {
                break;
            }
            let Some(page) = self.next_dirty() else {
                if wrapped {
                    break;
                }
                wrapped = true;
                self.cursor = 0;
                if let Some(x) = self.xbzrle.as_mut() {
                    x.round_complete();
                }
                continue;
            };
            let (word, bit) = ((page / 64) as usize, page % 64);
            if let Some(d) = self.dirty.get_mut(word) {
                *d &= !(1 << bit);
            }
            self.pending -= 1;
            self.cursor = page + 1;
            let addr = page * self.page_size;
            if self.untouched(page) {
                self.counters.zero_pages += 1;
                w.write_page(f, &self.block, addr, &self.zero)
                    .map_err(|e| e.to_string())?;
                if let Some(x) = self.xbzrle.as_mut() {
                    x.zero_page(addr, self.counters.dirty_syncs);
                }
                continue;
            }
            if self.xbzrle.is_some() {
                self.send_xbzrle(w, f, addr)?;
                continue;
            }
            let mem = self.mem;
            let data = match mem.page_slice(addr, self.page_size) {
                Some(d) => d,
                None => {
                    mem.read_page(addr, &mut self.page)?;
                    &self.page
                }
            };
            if is_zero(data) {
                self.counters.zero_pages += 1;
            } else {
                self.counters.normal_pages += 1;
            }
            w.write_page(f, &self.block, addr, data)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl<M: PageSource + ?Sized> LiveRam<'_, M> {
    /// Sends the page at `addr` with XBZRLE on: from a stable copy (the page the cache
    /// holds must be the page the destination gets), as ZERO, XBZRLE or a normal page.
    fn send_xbzrle(
        &mut self,
        w: &mut RamWriter,
        f: &mut Sink<'_>,
        addr: u64,
    ) -> Result<(), String> {
        let age = self.counters.dirty_syncs;
        self.mem.read_page(addr, &mut self.page)?;
        let Some(x) = self.xbzrle.as_mut() else {
            return Ok(());
        };
        let outcome = if is_zero(&self.page) {
            self.counters.zero_pages += 1;
            x.zero_page(addr, age);
            Outcome::Normal
        } else {
            let o = x.save(w, f, &self.block, addr, &self.page, age)?;
            match o {
                Outcome::Encoded => self.counters.xbzrle_pages += 1,
                Outcome::Normal => self.counters.normal_pages += 1,
                Outcome::Unchanged => {}
            }
            o
        };
        if outcome == Outcome::Normal {
            // A ZERO record for a zero page, else the page with its data.
            w.write_page(f, &self.block, addr, &self.page)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The registry's view of a [`LiveRam`] shared with the migration loop.
#[derive(Debug)]
pub struct LiveRamEntry<'a, 'm, M: PageSource + ?Sized>(pub &'a RefCell<LiveRam<'m, M>>);

impl<M: PageSource + ?Sized> IterativeState for LiveRamEntry<'_, '_, M> {
    fn save_setup(&mut self, f: &mut Sink<'_>) -> Result<(), String> {
        let mut ram = self.0.borrow_mut();
        let mut w = RamWriter::new(ram.page_size, false).map_err(|e| e.to_string())?;
        w.set_lz4(ram.lz4);
        w.set_recorder(ram.recorder.take());
        let info = RamBlockInfo {
            idstr: ram.block.clone(),
            used_length: ram.total_bytes(),
            mr_addr: None,
        };
        w.write_mem_size(f, &[info]).map_err(|e| e.to_string())?;
        w.write_eos(f).map_err(|e| e.to_string())?;
        ram.writer = Some(w);
        Ok(())
    }

    fn save_iterate(&mut self, f: &mut Sink<'_>) -> Result<bool, String> {
        let mut ram = self.0.borrow_mut();
        let budget = ram.budget;
        ram.send(f, budget, PART_TIME_LIMIT)?;
        let w = ram.writer.as_mut().ok_or("RAM sent before setup")?;
        w.write_eos(f).map_err(|e| e.to_string())?;
        Ok(ram.pending == 0)
    }

    fn save_complete(&mut self, f: &mut Sink<'_>) -> Result<(), String> {
        let mut ram = self.0.borrow_mut();
        // The END section names its block again rather than continuing the last PART's: a
        // lazy loadvm parses the stream from the END section on without the PARTs before it.
        ram.writer
            .as_mut()
            .ok_or("RAM sent before setup")?
            .name_next_block();
        if let Some(x) = ram.xbzrle.as_mut() {
            x.last_stage = true;
        }
        ram.send(f, u64::MAX, Duration::MAX)?;
        let w = ram.writer.as_mut().ok_or("RAM sent before setup")?;
        w.write_eos(f).map_err(|e| e.to_string())
    }

    fn load(&mut self, r: &mut Source<'_>) -> stream::Result<()> {
        Err(StreamError {
            offset: r.position(),
            section: Some("'ram'".into()),
            kind: Box::new(ErrorKind::Handler {
                idstr: "ram".into(),
                message: "live RAM only saves; load with the VM's RAM state".into(),
            }),
        })
    }
}

/// The destination's "ram" section loader: pages straight into guest memory. A ZERO record
/// for a page that is already zero writes nothing (as QEMU's `ram_handle_zero`), so the
/// untouched RAM of a fresh destination is not faulted in page by page.
#[derive(Debug)]
pub struct IncomingRam<'m> {
    block: String,
    mem: &'m mut [u8],
    page_size: usize,
    untouched: Option<Vec<u64>>,
}

impl<'m> IncomingRam<'m> {
    /// Loads RAM block `block` into `mem`.
    pub fn new(block: &str, mem: &'m mut [u8], page_size: u64) -> Self {
        IncomingRam {
            block: block.to_string(),
            mem,
            page_size: usize::try_from(page_size).unwrap_or(usize::MAX),
            untouched: None,
        }
    }

    /// Skips ZERO records for pages never touched (read from the pagemap now). Only for
    /// memory that is a private anonymous mapping, such as the VMM's guest RAM.
    pub fn skip_untouched(mut self) -> Self {
        if self.page_size == 4096 {
            let pages = self.mem.len() / self.page_size;
            let base = self.mem.as_ptr() as usize as u64;
            self.untouched = Pagemap::open().and_then(|mut pm| pm.untouched(base, pages));
        }
        self
    }

    /// Whether page `index` is known to be zero; forgets it (the page is about to change).
    fn known_zero(&mut self, addr: u64, forget: bool) -> bool {
        let Some(bits) = self.untouched.as_mut() else {
            return false;
        };
        let i = usize::try_from(addr).unwrap_or(usize::MAX) / self.page_size.max(1);
        let Some(w) = bits.get_mut(i / 64) else {
            return false;
        };
        let set = *w & (1 << (i % 64)) != 0;
        if forget {
            *w &= !(1 << (i % 64));
        }
        set
    }

    fn page(&mut self, block: &str, addr: u64) -> Result<&mut [u8], String> {
        if block != self.block {
            return Err(format!("Unknown ramblock \"{block}\""));
        }
        let a = usize::try_from(addr).unwrap_or(usize::MAX);
        a.checked_add(self.page_size)
            .and_then(|end| self.mem.get_mut(a..end))
            .ok_or_else(|| format!("page {addr:#x} outside '{block}'"))
    }
}

impl IterativeState for IncomingRam<'_> {
    fn save_setup(&mut self, _f: &mut Sink<'_>) -> Result<(), String> {
        Err("incoming RAM only loads".into())
    }

    fn save_iterate(&mut self, _f: &mut Sink<'_>) -> Result<bool, String> {
        Err("incoming RAM only loads".into())
    }

    fn save_complete(&mut self, _f: &mut Sink<'_>) -> Result<(), String> {
        Err("incoming RAM only loads".into())
    }

    fn load(&mut self, r: &mut Source<'_>) -> stream::Result<()> {
        loop {
            let at = r.position();
            let err = |m: String| handler_err(at, "ram", m);
            match r.next_event()? {
                Event::Ram { record, .. } => match record {
                    RamRecord::MemSize { blocks, .. } => {
                        for b in blocks {
                            if b.idstr != self.block {
                                return Err(err(format!("Unknown ramblock \"{}\"", b.idstr)));
                            }
                            if b.used_length != self.mem.len() as u64 {
                                return Err(err(format!(
                                    "Length mismatch: {}: {:#x} in != {:#x}",
                                    b.idstr,
                                    b.used_length,
                                    self.mem.len()
                                )));
                            }
                        }
                    }
                    RamRecord::Page { block, addr, .. } => {
                        self.page(&block, addr).map_err(err)?;
                        self.known_zero(addr, true);
                        let dst = self.page(&block, addr).map_err(err)?;
                        r.read_page_into(dst)?;
                    }
                    RamRecord::Zero {
                        block, addr, fill, ..
                    } => {
                        self.page(&block, addr).map_err(err)?;
                        if fill == 0 && self.known_zero(addr, false) {
                            continue;
                        }
                        self.known_zero(addr, true);
                        let dst = self.page(&block, addr).map_err(err)?;
                        if fill != 0 || !is_zero(dst) {
                            dst.fill(fill);
                        }
                    }
                    RamRecord::MultifdFlush => {}
                    RamRecord::Eos => return Ok(()),
                },
                other => return Err(err(format!("unexpected record in RAM section: {other:?}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::ram_state::RamState;
    use crate::migration::savevm::{load_state, Registry, SaveSession};

    const PS: u64 = 4096;

    fn pattern(pages: usize) -> Vec<u8> {
        let mut m = vec![0u8; pages * PS as usize];
        for (i, p) in m.chunks_mut(PS as usize).enumerate() {
            if i % 3 != 0 {
                p[7] = i as u8;
            }
        }
        m
    }

    #[test]
    fn guest_ram_lends_pages_in_place_and_bounds_them() {
        let mem = pattern(3);
        let g = GuestRam(&mem[..]);
        let page = g.page_slice(PS, PS).unwrap();
        assert_eq!(page.as_ptr(), mem[PS as usize..].as_ptr());
        assert!(g.page_slice(2 * PS + 1, PS).is_none());
        assert!(g.page_slice(u64::MAX, PS).is_none());
        assert_eq!(g.anonymous_base(), Some(mem.as_ptr() as usize as u64));
    }

    #[test]
    fn setup_marks_everything_dirty_and_sync_counts_new_pages() {
        let mem = pattern(70);
        let mut ram = LiveRam::new(&mem[..], "pc.ram", PS);
        assert_eq!(ram.pending_bytes(), 70 * PS);
        assert_eq!(ram.dirty.len(), 2);
        assert_eq!(ram.dirty[1], (1 << 6) - 1);
        // Already dirty: nothing new.
        assert_eq!(ram.sync(&[1, 0]), 0);
        assert_eq!(ram.counters.dirty_syncs, 2);
    }

    #[test]
    fn rounds_with_budgets_and_resent_pages_load_back_identically() {
        let mut mem = pattern(40);
        let mut out = Vec::new();
        let cell;
        {
            let snapshot = mem.clone();
            cell = RefCell::new(LiveRam::new(&snapshot[..], "pc.ram", PS));
            let mut entry = LiveRamEntry(&cell);
            let mut reg = Registry::new("m");
            reg.register_iterative("ram", 0, 4, &mut entry);
            let mut s = SaveSession::begin(&mut reg, &mut out).unwrap();
            cell.borrow_mut().set_budget(10 * PS);
            assert!(!s.iterate().unwrap());
            let sent = cell.borrow().counters;
            assert!(sent.normal_pages + sent.zero_pages >= 10);
            assert!(cell.borrow().pending_bytes() < 40 * PS);
            // Pages 0 and 1 "dirtied again" (same data here), sent again at the end.
            cell.borrow_mut().sync(&[0b11]);
            cell.borrow_mut().set_budget(u64::MAX);
            assert!(s.iterate().unwrap());
            cell.borrow_mut().sync(&[0b100]);
            s.complete().unwrap();
            let c = cell.borrow().counters;
            assert_eq!(c.normal_pages + c.zero_pages, 40 + 3);
            assert_eq!(c.zero_pages, 14 + 1);
            assert_eq!(c.dirty_syncs, 3);
        }
        let mut back = vec![0xffu8; mem.len()];
        {
            let mut st = RamState::for_load(vec![("pc.ram".into(), &mut back[..])], PS);
            let mut reg = Registry::new("m");
            reg.register_iterative("ram", 0, 4, &mut st);
            load_state(&mut reg, &mut &out[..]).unwrap();
        }
        assert!(back == mem);
        // The incoming loader gives the same RAM (zero pages over non-zero data too).
        let mut back2 = vec![0xffu8; mem.len()];
        {
            let mut st = IncomingRam::new("pc.ram", &mut back2, PS);
            let mut reg = Registry::new("m");
            reg.register_iterative("ram", 0, 4, &mut st);
            load_state(&mut reg, &mut &out[..]).unwrap();
        }
        assert!(back2 == mem);
        let mut small = vec![0u8; 4096];
        let mut st = IncomingRam::new("pc.ram", &mut small, PS);
        let mut reg = Registry::new("m");
        reg.register_iterative("ram", 0, 4, &mut st);
        let e = load_state(&mut reg, &mut &out[..]).unwrap_err();
        assert!(e.to_string().contains("Length mismatch"), "{e}");
        mem[0] = 1;
        assert!(back != mem);
    }

    #[test]
    fn guest_memory_untouched_pages_go_out_as_zero_and_load_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 * 4096)]).unwrap();
        mem.write_slice(&[7u8; 10], GuestAddress(3 * 4096 + 5))
            .unwrap();
        mem.write_slice(&[9u8; 4096], GuestAddress(200 * 4096))
            .unwrap();
        // Touched but zero: read and found zero.
        mem.write_slice(&[0u8; 1], GuestAddress(100 * 4096))
            .unwrap();
        let mut out = Vec::new();
        let cell = RefCell::new(LiveRam::new(&mem, "pc.ram", PS));
        assert!(cell.borrow().pagemap.is_some());
        {
            let mut entry = LiveRamEntry(&cell);
            let mut reg = Registry::new("m");
            reg.register_iterative("ram", 0, 4, &mut entry);
            let mut s = SaveSession::begin(&mut reg, &mut out).unwrap();
            while !s.iterate().unwrap() {}
            s.complete().unwrap();
        }
        let c = cell.borrow().counters;
        assert_eq!((c.normal_pages, c.zero_pages), (2, 254));
        // Into fresh (untouched) memory with the skip, and into dirty memory without.
        for skip in [true, false] {
            let mut buf = if skip {
                vec![0u8; 257 * 4096]
            } else {
                vec![0x55u8; 257 * 4096]
            };
            // Page-aligned, as guest RAM is.
            let off = buf.as_ptr().align_offset(4096);
            let back = &mut buf[off..off + 256 * 4096];
            {
                let mut st = IncomingRam::new("pc.ram", back, PS);
                if skip {
                    st = st.skip_untouched();
                    assert!(st.untouched.is_some());
                }
                let mut reg = Registry::new("m");
                reg.register_iterative("ram", 0, 4, &mut st);
                load_state(&mut reg, &mut &out[..]).unwrap();
            }
            let mut want = vec![0u8; 256 * 4096];
            mem.read_slice(&mut want, GuestAddress(0)).unwrap();
            assert!(buf[off..off + 256 * 4096] == want[..], "skip {skip}");
        }
    }
}
