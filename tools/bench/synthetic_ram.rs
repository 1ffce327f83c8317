//! Synthetic guest RAM for the benchmarks (`decode` and the `perf` harness's inspect case):
//! generated page by page, so no GiB buffer is needed; 1 page in 8 is zero, the rest carry a
//! counter pattern.

use vmsnap::migration::ram::{RamBlockInfo, RamWriter};
use vmsnap::migration::savevm::{IterativeState, Sink, Source};

/// RAM generated page by page, so the benchmark needs no GiB buffer: 1 page in 8 is zero,
/// the rest carry a counter pattern.
pub struct SyntheticRam {
    len: u64,
    next: u64,
    w: Option<RamWriter>,
    page: Vec<u8>,
}

impl IterativeState for SyntheticRam {
    fn save_setup(&mut self, f: &mut Sink<'_>) -> Result<(), String> {
        let mut w = RamWriter::new(4096, false).map_err(|e| e.to_string())?;
        let blocks = [RamBlockInfo {
            idstr: "pc.ram".into(),
            used_length: self.len,
            mr_addr: None,
        }];
        w.write_mem_size(f, &blocks).map_err(|e| e.to_string())?;
        w.write_eos(f).map_err(|e| e.to_string())?;
        self.w = Some(w);
        Ok(())
    }

    fn save_iterate(&mut self, f: &mut Sink<'_>) -> Result<bool, String> {
        let w = self.w.as_mut().ok_or("no setup")?;
        let round_end = (self.next + (256 << 20)).min(self.len);
        while self.next < round_end {
            let n = self.next / 4096;
            if n % 8 == 7 {
                self.page.fill(0);
            } else {
                for (i, c) in self.page.chunks_mut(8).enumerate() {
                    c.copy_from_slice(&(n * 512 + i as u64).to_le_bytes());
                }
            }
            w.write_page(f, "pc.ram", self.next, &self.page)
                .map_err(|e| e.to_string())?;
            self.next += 4096;
        }
        w.write_eos(f).map_err(|e| e.to_string())?;
        Ok(self.next >= self.len)
    }

    fn save_complete(&mut self, f: &mut Sink<'_>) -> Result<(), String> {
        let w = self.w.as_mut().ok_or("no setup")?;
        w.write_eos(f).map_err(|e| e.to_string())
    }

    fn load(&mut self, _r: &mut Source<'_>) -> vmsnap::migration::stream::Result<()> {
        Ok(())
    }
}

impl SyntheticRam {
    /// `len` bytes of RAM (a multiple of 4 KiB).
    pub fn new(len: u64) -> Self {
        SyntheticRam {
            len,
            next: 0,
            w: None,
            page: vec![0; 4096],
        }
    }
}
