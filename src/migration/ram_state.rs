//! Guest RAM as a save-state entry: the "ram" section's setup / iterate / complete on save
//! and its loading into the VMM's memory, one slice per RAM block, without copies.
//!
//! A third mode, [`RamState::for_check`], parses and bounds-checks the RAM records without
//! storing any page (their data is dropped) and records which pages the stream covers: loadvm
//! validates a whole stream with it before loading it in place.

use super::protocol::RAM_VERSION;
use super::ram::{RamBlockInfo, RamRecord, RamWriter};
use super::savevm::{handler_err, IterativeState, Sink, Source};
use super::stream::{Event, Result};

/// Guest RAM saved or loaded as QEMU's "ram" section (version 4): the VMM passes its
/// memory as one slice per RAM block, without copies.
#[derive(Debug)]
pub struct RamState<'m> {
    blocks: Vec<(String, RamMem<'m>)>,
    page_size: u64,
    next: (usize, u64),
    writer: Option<RamWriter>,
    /// Pages to send per iterate round (0 = all at once).
    pub pages_per_round: u64,
    /// Check mode: where page data is read to and dropped.
    scratch: Vec<u8>,
    lz4: bool,
    recorder: Option<super::page_index::PageRecorder>,
}

#[derive(Debug)]
enum RamMem<'m> {
    Shared(&'m [u8]),
    Exclusive(&'m mut [u8]),
    /// Check mode: the block's length and a bitmap of the pages seen (one bit per page).
    Absent {
        len: u64,
        seen: Vec<u64>,
    },
}

impl RamMem<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            RamMem::Shared(b) => b,
            RamMem::Exclusive(b) => b,
            RamMem::Absent { .. } => &[],
        }
    }

    fn len(&self) -> u64 {
        match self {
            RamMem::Absent { len, .. } => *len,
            other => other.bytes().len() as u64,
        }
    }
}

impl<'m> RamState<'m> {
    /// RAM to be saved: `(idstr, memory)` per block.
    pub fn for_save(blocks: Vec<(String, &'m [u8])>, page_size: u64) -> Self {
        Self::build(
            blocks
                .into_iter()
                .map(|(n, b)| (n, RamMem::Shared(b)))
                .collect(),
            page_size,
        )
    }

    /// RAM to be loaded into: `(idstr, memory)` per block.
    pub fn for_load(blocks: Vec<(String, &'m mut [u8])>, page_size: u64) -> Self {
        Self::build(
            blocks
                .into_iter()
                .map(|(n, b)| (n, RamMem::Exclusive(b)))
                .collect(),
            page_size,
        )
    }

    /// RAM to be checked only: `(idstr, length)` per block. Loading parses every record and
    /// checks it against the blocks, drops page data and records which pages were present
    /// (see [`RamState::all_pages_seen`]).
    pub fn for_check(blocks: Vec<(String, u64)>, page_size: u64) -> RamState<'static> {
        let ps = page_size.max(1);
        RamState::build(
            blocks
                .into_iter()
                .map(|(n, len)| {
                    // One bit per page; bounded by the RAM size the caller has.
                    let words = usize::try_from((len / ps).div_ceil(64)).unwrap_or(0);
                    (
                        n,
                        RamMem::Absent {
                            len,
                            seen: vec![0; words],
                        },
                    )
                })
                .collect(),
            page_size,
        )
    }

    /// In check mode: true if the stream loaded so far had a page (or zero page) for every
    /// page of every block. Always true in the other modes.
    pub fn all_pages_seen(&self) -> bool {
        self.blocks.iter().all(|(_, m)| match m {
            RamMem::Absent { len, seen } => {
                let pages = len / self.page_size.max(1);
                (0..pages).all(|p| {
                    seen.get((p / 64) as usize)
                        .is_some_and(|w| w & (1 << (p % 64)) != 0)
                })
            }
            _ => true,
        })
    }

    /// Check mode: marks the page at `addr` of `block` as seen after checking its bounds.
    /// Returns false if the block is not in check mode.
    fn mark_seen(&mut self, block: &str, addr: u64) -> std::result::Result<bool, String> {
        let ps = self.page_size;
        let Some((_, mem)) = self.blocks.iter_mut().find(|(n, _)| n == block) else {
            return Err(format!("cannot load into block '{block}'"));
        };
        let RamMem::Absent { len, seen } = mem else {
            return Ok(false);
        };
        if addr.checked_add(ps).map_or(true, |end| end > *len) {
            return Err(format!("page {addr:#x} outside '{block}'"));
        }
        let p = addr / ps.max(1);
        if let Some(w) = seen.get_mut((p / 64) as usize) {
            *w |= 1 << (p % 64);
        }
        Ok(true)
    }

    fn build(blocks: Vec<(String, RamMem<'m>)>, page_size: u64) -> Self {
        RamState {
            blocks,
            page_size,
            next: (0, 0),
            writer: None,
            pages_per_round: 0,
            scratch: Vec::new(),
            lz4: false,
            recorder: None,
        }
    }

    /// Saves pages LZ4-compressed (see [`RamWriter::set_lz4`]); the registry must announce
    /// [`super::ram::LZ4_CAPABILITY`]. Loading needs nothing: the stream says so.
    pub fn set_lz4(&mut self, on: bool) {
        self.lz4 = on;
    }

    /// Records where each saved page lands in the stream (see [`super::page_index`]).
    pub fn set_recorder(&mut self, recorder: super::page_index::PageRecorder) {
        self.recorder = Some(recorder);
    }

    fn page_mut(&mut self, block: &str, addr: u64) -> std::result::Result<&mut [u8], String> {
        let ps = self.page_size as usize;
        let Some((_, RamMem::Exclusive(mem))) = self.blocks.iter_mut().find(|(n, _)| n == block)
        else {
            return Err(format!("cannot load into block '{block}'"));
        };
        let a = usize::try_from(addr).unwrap_or(usize::MAX);
        a.checked_add(ps)
            .and_then(|end| mem.get_mut(a..end))
            .ok_or_else(|| format!("page {addr:#x} outside '{block}'"))
    }

    /// The RAM section's idstr and version.
    pub const IDSTR: &'static str = "ram";
    /// RAM section version.
    pub const VERSION: u32 = RAM_VERSION;
}

impl IterativeState for RamState<'_> {
    fn save_setup(&mut self, f: &mut Sink<'_>) -> std::result::Result<(), String> {
        let mut w = RamWriter::new(self.page_size, false).map_err(|e| e.to_string())?;
        w.set_lz4(self.lz4);
        w.set_recorder(self.recorder.clone());
        let infos: Vec<RamBlockInfo> = self
            .blocks
            .iter()
            .map(|(n, m)| RamBlockInfo {
                idstr: n.clone(),
                used_length: m.bytes().len() as u64,
                mr_addr: None,
            })
            .collect();
        w.write_mem_size(f, &infos).map_err(|e| e.to_string())?;
        w.write_eos(f).map_err(|e| e.to_string())?;
        self.writer = Some(w);
        self.next = (0, 0);
        Ok(())
    }

    fn save_iterate(&mut self, f: &mut Sink<'_>) -> std::result::Result<bool, String> {
        let w = self.writer.as_mut().ok_or("RAM iterate before setup")?;
        let mut sent = 0u64;
        while let Some((name, mem)) = self.blocks.get(self.next.0) {
            let bytes = mem.bytes();
            let ps = self.page_size as usize;
            let off = self.next.1 as usize;
            if off + ps > bytes.len() {
                self.next = (self.next.0 + 1, 0);
                continue;
            }
            w.write_page(f, name, off as u64, &bytes[off..off + ps])
                .map_err(|e| e.to_string())?;
            self.next.1 += self.page_size;
            sent += 1;
            if self.pages_per_round != 0 && sent >= self.pages_per_round {
                break;
            }
        }
        w.write_eos(f).map_err(|e| e.to_string())?;
        Ok(self.next.0 >= self.blocks.len())
    }

    fn save_complete(&mut self, f: &mut Sink<'_>) -> std::result::Result<(), String> {
        let w = self.writer.as_mut().ok_or("RAM complete before setup")?;
        w.write_eos(f).map_err(|e| e.to_string())
    }

    fn load(&mut self, r: &mut Source<'_>) -> Result<()> {
        loop {
            let at = r.position();
            let err = |m: String| handler_err(at, Self::IDSTR, m);
            match r.next_event()? {
                Event::Ram { record, .. } => match record {
                    RamRecord::MemSize { blocks, .. } => {
                        for b in blocks {
                            let ours = self.blocks.iter().find(|(n, _)| n == &b.idstr);
                            match ours {
                                None => {
                                    return Err(err(format!("Unknown ramblock \"{}\"", b.idstr)))
                                }
                                Some((_, m)) if m.len() != b.used_length => {
                                    return Err(err(format!(
                                        "Length mismatch: {}: {:#x} in != {:#x}",
                                        b.idstr,
                                        b.used_length,
                                        m.len()
                                    )))
                                }
                                Some(_) => {}
                            }
                        }
                    }
                    RamRecord::Page { block, addr, .. } => {
                        if self.mark_seen(&block, addr).map_err(err)? {
                            // Check mode: read into a scratch page (a cached 4 KiB copy is
                            // cheaper than the reader's skip, which refills its buffer).
                            let ps = self.page_size as usize;
                            self.scratch.resize(ps, 0);
                            r.read_page_into(&mut self.scratch)?;
                        } else {
                            let dst = self.page_mut(&block, addr).map_err(err)?;
                            r.read_page_into(dst)?;
                        }
                    }
                    RamRecord::Zero {
                        block, addr, fill, ..
                    } => {
                        if !self.mark_seen(&block, addr).map_err(err)? {
                            let dst = self.page_mut(&block, addr).map_err(err)?;
                            // Guest pages are mostly zero already: skip the write (and the
                            // copy-on-write fault it may cause) when it changes nothing.
                            if !(fill == 0 && super::ram::is_zero(dst)) {
                                dst.fill(fill);
                            }
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
    use crate::migration::analyze::{analyze, AnalyzeOptions};
    use crate::migration::savevm::{save_state, Registry};

    #[test]
    fn check_mode_validates_and_reports_coverage() {
        let mut ram = vec![0u8; 8 * 4096];
        ram[3 * 4096 + 5] = 9;
        let mut out = Vec::new();
        {
            let mut mem = RamState::for_save(vec![("r".into(), &ram[..])], 4096);
            mem.pages_per_round = 3;
            let mut reg = Registry::new("m");
            reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
            save_state(&mut reg, &mut out).unwrap();
        }
        let check = |len: u64, stream: &[u8]| {
            let mut st = RamState::for_check(vec![("r".into(), len)], 4096);
            let r = {
                let mut reg = Registry::new("m");
                reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut st);
                crate::migration::savevm::load_state(&mut reg, &mut &stream[..])
            };
            (r, st.all_pages_seen())
        };
        let (r, all) = check(8 * 4096, &out);
        r.unwrap();
        assert!(all);
        let (r, _) = check(16 * 4096, &out);
        assert!(r.unwrap_err().to_string().contains("Length mismatch"));
        // Nothing loaded: a fresh check state has seen nothing.
        let st = RamState::for_check(vec![("r".into(), 4096)], 4096);
        assert!(!st.all_pages_seen());
        // Loading in place still works and writes the nonzero page.
        let mut back = vec![0u8; 8 * 4096];
        {
            let mut st = RamState::for_load(vec![("r".into(), &mut back[..])], 4096);
            let mut reg = Registry::new("m");
            reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut st);
            crate::migration::savevm::load_state(&mut reg, &mut &out[..]).unwrap();
        }
        assert!(back == ram);
    }

    #[test]
    fn rounds_split_pages_into_parts_and_zero_pages_are_detected() {
        let mut ram = vec![0u8; 10 * 4096];
        for (n, p) in ram.chunks_mut(4096).enumerate() {
            if n % 2 == 0 {
                p[100] = 1;
            }
        }
        let mut out = Vec::new();
        {
            let mut mem = RamState::for_save(vec![("r".into(), &ram[..])], 4096);
            mem.pages_per_round = 3;
            let mut reg = Registry::new("m");
            reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
            save_state(&mut reg, &mut out).unwrap();
        }
        let a = analyze(&out[..], &AnalyzeOptions::default()).unwrap();
        assert!(a.error.is_none());
        let kinds: Vec<&str> = a.rows.iter().map(|r| r.kind).collect();
        // START, 4 PARTs of ≤ 3 pages, END.
        assert_eq!(kinds.iter().filter(|k| **k == "PART").count(), 4);
        assert_eq!(a.ram_blocks[0].1.pages, 5);
        assert_eq!(a.ram_blocks[0].1.zero_pages, 5);
    }
}
