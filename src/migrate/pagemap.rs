//! Which pages of anonymous memory were never touched, from `/proc/self/pagemap`: a page
//! that is neither present nor swapped out has never been written, so it reads as zero.
//! Live migration uses this to send (source) and skip (destination) such pages without
//! reading them, which would fault each one in.
//!
//! Only valid for private anonymous mappings (guest RAM): a file-backed page that is not
//! present is not zero.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Host page size the pagemap is indexed by.
const HOST_PAGE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    buf: Vec<u8>,
}

impl Pagemap {
    /// Opens the calling process's pagemap (None where there is none).
    pub fn open() -> Option<Pagemap> {
        File::open("/proc/self/pagemap").ok().map(|file| Pagemap {
            file,
            buf: Vec::new(),
        })
    }

    /// Bit i of the result is set when the host page at `addr + i × 4096` was never touched;
    /// `count` pages from page-aligned `addr`. None if the pagemap cannot be read.
    pub fn untouched(&mut self, addr: u64, count: usize) -> Option<Vec<u64>> {
        if addr % HOST_PAGE != 0 {
            return None;
        }
        let mut bits = vec![0u64; count.div_ceil(64)];
        // In pieces of 64 Ki pages (512 KiB of entries).
        const PIECE: usize = 64 * 1024;
        let mut done = 0usize;
        while done < count {
            let n = (count - done).min(PIECE);
            self.buf.resize(n * 8, 0);
            let at = (addr / HOST_PAGE + done as u64) * 8;
            self.file.read_exact_at(&mut self.buf, at).ok()?;
            for (i, e) in self.buf.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if u64::from_ne_bytes(w) & (PRESENT | SWAPPED) == 0 {
                    let p = done + i;
                    bits[p / 64] |= 1 << (p % 64);
                }
            }
            done += n;
        }
        Some(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_pages_are_told_apart_from_untouched_ones() {
        let Some(mut pm) = Pagemap::open() else {
            eprintln!("SKIPPED: no /proc/self/pagemap");
            return;
        };
        // A fresh anonymous mapping of its own: a heap allocation may reuse memory another
        // test thread touched and freed (glibc serves large requests from a big free top
        // chunk too), which made this test depend on what ran before it.
        use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
        let pages = 9000;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), pages * 4096)]).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        mem.write_slice(&[1], GuestAddress(5 * 4096)).unwrap();
        mem.write_slice(&[1], GuestAddress(70 * 4096 + 9)).unwrap();
        let bits = pm.untouched(base, pages).unwrap();
        assert_eq!(bits.len(), 141);
        assert_eq!(bits[0] & (1 << 5), 0);
        assert_eq!(bits[1] & (1 << 6), 0);
        assert_ne!(bits[0] & (1 << 4), 0);
        assert_ne!(bits[140] & (1 << 39), 0);
        assert!(pm.untouched(base + 1, 1).is_none());
    }
}
