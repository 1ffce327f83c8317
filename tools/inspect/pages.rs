//! Where every RAM page of a stream is: one forward pass records, per RAM block and page, the
//! stream offset of the page's body (or its fill byte), without reading the bodies. `--diff`
//! then compares pages by reading the two bodies at those offsets, and
//! `--dump-guest-memory` copies them into the core file; nothing goes through JSON.
//!
//! A page sent more than once (live migration) keeps its last copy, as a loader would.

use std::io::Read;

use vmsnap::migration::ram::RamHeader;
use vmsnap::migration::stream::{Event, Item, StreamError, StreamReader};

/// Largest RAM block indexed (64 GiB): bounds the index a stream can make us allocate
/// (8 bytes per page, so at most 128 MiB for 4 KiB pages).
pub const MAX_BLOCK: u64 = 64 << 30;

/// Failures building or reading the index.
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    /// The stream does not decode.
    #[error("decoding stopped: {0}")]
    Stream(#[from] StreamError),
    /// A block larger than [`MAX_BLOCK`].
    #[error(
        "RAM block '{name}' is {len:#x} bytes, more than the {MAX_BLOCK:#x} this tool indexes"
    )]
    TooLarge { name: String, len: u64 },
    /// A page beyond its block's announced length.
    #[error("RAM block '{name}': page at {addr:#x} is beyond the block's length {len:#x}")]
    BeyondBlock { name: String, addr: u64, len: u64 },
    /// Reading a page body back failed.
    #[error("reading the page body at stream offset {at:#x}: {source}")]
    Read {
        at: u64,
        #[source]
        source: std::io::Error,
    },
    /// An LZ4 page body the packed index cannot hold (offset ≥ 1 TiB or length ≥ 4 MiB).
    #[error("LZ4 page body at stream offset {at:#x} ({len:#x} bytes) is out of the index's range")]
    Lz4Range { at: u64, len: u64 },
    /// An LZ4 page body does not decompress to one page.
    #[error("LZ4 page body at stream offset {at:#x} does not decompress to one page")]
    Lz4 { at: u64 },
}

/// Where a page is, packed in 8 bytes: 0 = never sent; tag 0b10 = fill byte; tag 0b01 = LZ4
/// body (length in bits 40..62, offset below); tag 0b00 = raw body at offset `value - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Not in the stream (reads as zeros).
    Absent,
    /// Every byte of the page is this one.
    Fill(u8),
    /// The page body, raw, at this stream offset.
    Raw(u64),
    /// The page body, LZ4-compressed (vmsnap's `x-vmsnap-lz4`), `len` bytes at `at`.
    Lz4 { at: u64, len: u64 },
}

const TAG_FILL: u64 = 1 << 63;
const TAG_LZ4: u64 = 1 << 62;
const LZ4_OFF_BITS: u32 = 40;

fn pack(l: Loc) -> u64 {
    match l {
        Loc::Absent => 0,
        Loc::Fill(b) => TAG_FILL | u64::from(b),
        Loc::Raw(at) => at + 1,
        Loc::Lz4 { at, len } => TAG_LZ4 | (len << LZ4_OFF_BITS) | at,
    }
}

fn unpack(v: u64) -> Loc {
    if v == 0 {
        Loc::Absent
    } else if v & TAG_FILL != 0 {
        Loc::Fill(v as u8)
    } else if v & TAG_LZ4 != 0 {
        Loc::Lz4 {
            at: v & ((1 << LZ4_OFF_BITS) - 1),
            len: (v & !TAG_LZ4) >> LZ4_OFF_BITS,
        }
    } else {
        Loc::Raw(v - 1)
    }
}

/// The pages of one RAM block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Block name (idstr).
    pub name: String,
    /// Length from MEM_SIZE.
    pub len: u64,
    /// Packed [`Loc`] per page, grown as pages arrive.
    locs: Vec<u64>,
}

impl Block {
    /// Where page `n` is.
    pub fn loc(&self, n: u64) -> Loc {
        usize::try_from(n)
            .ok()
            .and_then(|i| self.locs.get(i))
            .map_or(Loc::Absent, |&v| unpack(v))
    }

    /// Number of pages of the block.
    pub fn page_count(&self, page_size: u64) -> u64 {
        self.len.div_ceil(page_size)
    }
}

/// Page locations of a whole stream.
#[derive(Debug, Clone, Default)]
pub struct PageIndex {
    /// Target page size.
    pub page_size: u64,
    /// Blocks in the stream's block-list order.
    pub blocks: Vec<Block>,
}

impl PageIndex {
    /// The block called `name`.
    pub fn block(&self, name: &str) -> Option<&Block> {
        self.blocks.iter().find(|b| b.name == name)
    }
}

/// Walks the stream once (seeking over page bodies when `r` was made seekable) and records
/// every page's location.
pub fn index<R: Read>(mut r: StreamReader<R>, page_size: u64) -> Result<PageIndex, PagesError> {
    r.set_page_size(page_size)?;
    let mut idx = PageIndex {
        page_size,
        blocks: Vec::new(),
    };
    // Reader block index → index in idx.blocks.
    let mut map: Vec<usize> = Vec::new();
    loop {
        let (block, addr, loc) = match r.next_item()? {
            Item::Other(Event::End) => break,
            Item::Other(_) => continue,
            Item::Ram { header, .. } => match header {
                RamHeader::MemSize { .. } => {
                    map.clear();
                    for b in r.ram_blocks() {
                        if b.used_length > MAX_BLOCK {
                            return Err(PagesError::TooLarge {
                                name: b.idstr.clone(),
                                len: b.used_length,
                            });
                        }
                        let i = match idx.blocks.iter().position(|x| x.name == b.idstr) {
                            Some(i) => i,
                            None => {
                                idx.blocks.push(Block {
                                    name: b.idstr.clone(),
                                    len: 0,
                                    locs: Vec::new(),
                                });
                                idx.blocks.len() - 1
                            }
                        };
                        idx.blocks[i].len = b.used_length;
                        map.push(i);
                    }
                    continue;
                }
                RamHeader::Zero {
                    block, addr, fill, ..
                } => (block, addr, Loc::Fill(fill)),
                RamHeader::Page { block, addr, .. } => {
                    let at = r.position();
                    let loc = match r.page_compressed_len() {
                        Some(len) if at < 1 << LZ4_OFF_BITS && len < 1 << 22 => {
                            Loc::Lz4 { at, len }
                        }
                        Some(len) => return Err(PagesError::Lz4Range { at, len }),
                        None => Loc::Raw(at),
                    };
                    (block, addr, loc)
                }
                RamHeader::MultifdFlush | RamHeader::Eos => continue,
            },
        };
        let Some(b) = map.get(block).and_then(|&i| idx.blocks.get_mut(i)) else {
            continue;
        };
        if addr >= b.len {
            return Err(PagesError::BeyondBlock {
                name: b.name.clone(),
                addr,
                len: b.len,
            });
        }
        let n = (addr / page_size) as usize;
        if b.locs.len() <= n {
            b.locs.resize(n + 1, 0);
        }
        b.locs[n] = pack(loc);
    }
    Ok(idx)
}

/// Positioned reads of stream bytes (a stream file, or a snapshot's VM state).
pub trait ReadAt {
    /// Fills `buf` from stream offset `pos`.
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// Reads pages of one stream by their [`Loc`].
pub struct PageReader<'a> {
    src: &'a mut dyn ReadAt,
    packed: Vec<u8>,
}

impl std::fmt::Debug for PageReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageReader").finish_non_exhaustive()
    }
}

impl<'a> PageReader<'a> {
    /// A reader over `src`.
    pub fn new(src: &'a mut dyn ReadAt) -> Self {
        PageReader {
            src,
            packed: Vec::new(),
        }
    }

    /// Puts the page at `loc` into `out` (one page long).
    pub fn read(&mut self, loc: Loc, out: &mut [u8]) -> Result<(), PagesError> {
        match loc {
            Loc::Absent => out.fill(0),
            Loc::Fill(b) => out.fill(b),
            Loc::Raw(at) => self
                .src
                .read_at(at, out)
                .map_err(|source| PagesError::Read { at, source })?,
            Loc::Lz4 { at, len } => {
                self.packed.resize(len as usize, 0);
                self.src
                    .read_at(at, &mut self.packed)
                    .map_err(|source| PagesError::Read { at, source })?;
                match lz4_flex::block::decompress_into(&self.packed, out) {
                    Ok(n) if n == out.len() => {}
                    _ => return Err(PagesError::Lz4 { at }),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_pack_and_unpack() {
        for l in [
            Loc::Absent,
            Loc::Fill(0),
            Loc::Fill(0xff),
            Loc::Raw(0),
            Loc::Raw((1 << 61) + 5),
            Loc::Lz4 {
                at: (1 << 40) - 1,
                len: 4096,
            },
        ] {
            assert_eq!(unpack(pack(l)), l);
        }
    }
}
