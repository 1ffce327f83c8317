//! The "ram" section (version 4, `migration/ram.c`): block list, pages, zero pages, end
//! markers.
//!
//! Every record starts with a be64 whose low bits are flags and whose high bits are the page's
//! offset inside its RAM block (or, for MEM_SIZE, the total RAM size). A record that is not
//! CONTINUE names its block (one-byte length + idstr). PAGE carries one target page of data;
//! ZERO carries one fill byte.

use std::io::{Read, Write};

use super::protocol::ram_flags as fl;
use super::qemu_file::{QemuFileError, QemuFileReader, QemuFileWriter};

/// Largest page size we accept (flags live below the page size, and QEMU targets use ≤ 64 KiB).
pub const MAX_PAGE_SIZE: u64 = 64 * 1024;

/// Errors of the RAM section codec.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The stream ended or failed.
    #[error(transparent)]
    File(#[from] QemuFileError),
    /// A feature the decoder recognises but does not decode.
    #[error("RAM record at {offset:#x} uses {name} (flags {flags:#x}), which is not supported")]
    Unsupported {
        /// Record offset.
        offset: u64,
        /// QEMU's flag name.
        name: &'static str,
        /// The flags.
        flags: u64,
    },
    /// Flags we do not know.
    #[error("unknown RAM flags {flags:#x} at {offset:#x}")]
    UnknownFlags {
        /// Record offset.
        offset: u64,
        /// The unknown bits.
        flags: u64,
    },
    /// CONTINUE with no block named before.
    #[error("RAM record at {offset:#x} continues a block, but no block was named before")]
    NoPreviousBlock {
        /// Record offset.
        offset: u64,
    },
    /// A page names a block the MEM_SIZE list did not announce.
    #[error("RAM record at {offset:#x} names unknown block '{block}'")]
    UnknownBlock {
        /// Record offset.
        offset: u64,
        /// The idstr.
        block: String,
    },
    /// A page lies beyond the end of its block.
    #[error("RAM page {addr:#x} at {offset:#x} is beyond block '{block}' of {len:#x} bytes")]
    PageOutOfBlock {
        /// Record offset.
        offset: u64,
        /// Block idstr.
        block: String,
        /// Page offset in the block.
        addr: u64,
        /// Block length.
        len: u64,
    },
    /// The block list does not add up to the announced total.
    #[error("RAM block list at {offset:#x}: block '{block}' of {len:#x} bytes exceeds the {left:#x} bytes left of the total")]
    BadBlockList {
        /// Offset of the block entry.
        offset: u64,
        /// Block idstr.
        block: String,
        /// Its length.
        len: u64,
        /// Bytes of the announced total not yet accounted for.
        left: u64,
    },
    /// A page size we cannot use.
    #[error("invalid target page size {0:#x}")]
    BadPageSize(u64),
    /// Saving: page data of the wrong length.
    #[error("page of block '{block}' at {addr:#x} has {len} bytes, the page size is {page_size}")]
    BadPageLength {
        /// Block.
        block: String,
        /// Page offset.
        addr: u64,
        /// Data length given.
        len: usize,
        /// Page size.
        page_size: u64,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, RamError>;

/// One RAM block as announced by MEM_SIZE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// Block idstr (e.g. `pc.ram`, `ram0`, `pc.bios`).
    pub idstr: String,
    /// Used length in bytes.
    pub used_length: u64,
    /// Guest address of the memory region (only with the x-ignore-shared capability).
    pub mr_addr: Option<u64>,
}

/// One RAM record. Page data is not part of the record: see [`RamReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamRecord {
    /// The block list; `total` is the sum of the blocks' lengths.
    MemSize {
        /// Total RAM bytes.
        total: u64,
        /// Extra flag bits sent with MEM_SIZE (normally 0).
        flags: u64,
        /// The blocks.
        blocks: Vec<RamBlockInfo>,
    },
    /// A page filled with one byte (QEMU only sends 0).
    Zero {
        /// Block idstr.
        block: String,
        /// Whether the block name was omitted (CONTINUE).
        cont: bool,
        /// Page offset in the block.
        addr: u64,
        /// Fill byte.
        fill: u8,
    },
    /// A full page; its data follows the record in the stream.
    Page {
        /// Block idstr.
        block: String,
        /// Whether the block name was omitted (CONTINUE).
        cont: bool,
        /// Page offset in the block.
        addr: u64,
    },
    /// Multifd flush marker (no payload).
    MultifdFlush,
    /// End of this part of the section.
    Eos,
}

/// Decodes RAM records; remembers the block list and the last block named.
#[derive(Debug, Clone)]
pub struct RamReader {
    page_size: u64,
    ignore_shared: bool,
    blocks: Vec<RamBlockInfo>,
    last_block: Option<usize>,
}

impl Default for RamReader {
    /// 4 KiB pages, no x-ignore-shared.
    fn default() -> Self {
        RamReader {
            page_size: 4096,
            ignore_shared: false,
            blocks: Vec::new(),
            last_block: None,
        }
    }
}

impl RamReader {
    /// A reader for pages of `page_size` bytes. `ignore_shared` is the x-ignore-shared
    /// capability, which adds each block's guest address to the block list.
    pub fn new(page_size: u64, ignore_shared: bool) -> Result<Self> {
        check_page_size(page_size)?;
        Ok(RamReader {
            page_size,
            ignore_shared,
            blocks: Vec::new(),
            last_block: None,
        })
    }

    /// Target page size in use.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Changes the page size (e.g. once the block list shows it).
    pub fn set_page_size(&mut self, page_size: u64) -> Result<()> {
        check_page_size(page_size)?;
        self.page_size = page_size;
        Ok(())
    }

    /// Blocks announced so far.
    pub fn blocks(&self) -> &[RamBlockInfo] {
        &self.blocks
    }

    /// Reads one record header. After a `Page`, exactly `page_size` bytes of data follow and
    /// must be consumed by the caller before the next call.
    pub fn read_record<R: Read>(&mut self, f: &mut QemuFileReader<R>) -> Result<RamRecord> {
        let offset = f.position();
        let word = f.get_be64()?;
        // Flags always fit below 0x400, and pages are at least 1 KiB: this split is exact
        // whatever the page size.
        let flags = word & 0x3ff;
        let addr = word & !0x3ff;
        let named = |flags: u64| {
            if flags & fl::XBZRLE != 0 {
                Some("XBZRLE")
            } else if flags & fl::COMPRESS_PAGE != 0 {
                Some("COMPRESS_PAGE (the removed compress capability)")
            } else if flags & fl::HOOK != 0 {
                Some("HOOK (RDMA)")
            } else {
                None
            }
        };
        if let Some(name) = named(flags) {
            return Err(RamError::Unsupported {
                offset,
                name,
                flags,
            });
        }
        if flags & !fl::KNOWN != 0 || flags & 1 != 0 {
            return Err(RamError::UnknownFlags { offset, flags });
        }
        if flags & fl::MEM_SIZE != 0 {
            let blocks = self.read_block_list(f, addr)?;
            self.blocks = blocks.clone();
            self.last_block = None;
            return Ok(RamRecord::MemSize {
                total: addr,
                flags: flags & !fl::MEM_SIZE,
                blocks,
            });
        }
        let cont = flags & fl::CONTINUE != 0;
        let kind = flags & !fl::CONTINUE;
        match kind {
            fl::ZERO | fl::PAGE => {
                let block = self.block_for(f, offset, cont)?;
                let info = &self.blocks[block];
                if addr
                    .checked_add(self.page_size)
                    .map_or(true, |end| end > info.used_length)
                {
                    return Err(RamError::PageOutOfBlock {
                        offset,
                        block: info.idstr.clone(),
                        addr,
                        len: info.used_length,
                    });
                }
                let block = info.idstr.clone();
                if kind == fl::ZERO {
                    let fill = f.get_u8()?;
                    Ok(RamRecord::Zero {
                        block,
                        cont,
                        addr,
                        fill,
                    })
                } else {
                    Ok(RamRecord::Page { block, cont, addr })
                }
            }
            fl::EOS if !cont && addr == 0 => Ok(RamRecord::Eos),
            fl::MULTIFD_FLUSH if !cont && addr == 0 => Ok(RamRecord::MultifdFlush),
            _ => Err(RamError::UnknownFlags { offset, flags }),
        }
    }

    fn block_for<R: Read>(
        &mut self,
        f: &mut QemuFileReader<R>,
        offset: u64,
        cont: bool,
    ) -> Result<usize> {
        if cont {
            return self.last_block.ok_or(RamError::NoPreviousBlock { offset });
        }
        let id = f.get_counted_string()?;
        let idx = self
            .blocks
            .iter()
            .position(|b| b.idstr == id)
            .ok_or(RamError::UnknownBlock { offset, block: id })?;
        self.last_block = Some(idx);
        Ok(idx)
    }

    fn read_block_list<R: Read>(
        &mut self,
        f: &mut QemuFileReader<R>,
        total: u64,
    ) -> Result<Vec<RamBlockInfo>> {
        let mut left = total;
        let mut blocks = Vec::new();
        while left > 0 {
            let at = f.position();
            let idstr = f.get_counted_string()?;
            let used_length = f.get_be64()?;
            let mr_addr = if self.ignore_shared {
                Some(f.get_be64()?)
            } else {
                None
            };
            if used_length > left {
                return Err(RamError::BadBlockList {
                    offset: at,
                    block: idstr,
                    len: used_length,
                    left,
                });
            }
            left -= used_length;
            blocks.push(RamBlockInfo {
                idstr,
                used_length,
                mr_addr,
            });
        }
        Ok(blocks)
    }
}

fn check_page_size(p: u64) -> Result<()> {
    if p.is_power_of_two() && (1024..=MAX_PAGE_SIZE).contains(&p) {
        Ok(())
    } else {
        Err(RamError::BadPageSize(p))
    }
}

/// The page size to assume when the stream does not state it before its RAM (it only does so
/// in the vmdesc at the very end): 4 KiB, the page size of x86 and most targets, unless some
/// block length is not a multiple of it; then the largest power of two (≥ 1 KiB) dividing
/// every block length.
pub fn infer_page_size(blocks: &[RamBlockInfo]) -> u64 {
    let mut p = 4096;
    for b in blocks {
        while p > 1024 && b.used_length % p != 0 {
            p /= 2;
        }
    }
    p
}

/// Encodes RAM records the way QEMU's `ram.c` does (CONTINUE when the block repeats, zero
/// pages detected and sent as ZERO with fill 0).
#[derive(Debug, Clone)]
pub struct RamWriter {
    page_size: u64,
    ignore_shared: bool,
    last_block: Option<String>,
}

impl RamWriter {
    /// A writer for pages of `page_size` bytes.
    pub fn new(page_size: u64, ignore_shared: bool) -> Result<Self> {
        check_page_size(page_size)?;
        Ok(RamWriter {
            page_size,
            ignore_shared,
            last_block: None,
        })
    }

    /// Writes the MEM_SIZE record and block list.
    pub fn write_mem_size<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        blocks: &[RamBlockInfo],
    ) -> Result<()> {
        let total: u64 = blocks.iter().map(|b| b.used_length).sum();
        f.put_be64(total | fl::MEM_SIZE)?;
        for b in blocks {
            f.put_counted_string(&b.idstr)?;
            f.put_be64(b.used_length)?;
            if self.ignore_shared {
                f.put_be64(b.mr_addr.unwrap_or(0))?;
            }
        }
        self.last_block = None;
        Ok(())
    }

    fn header<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        block: &str,
        addr: u64,
        flags: u64,
        force_name: bool,
    ) -> Result<()> {
        let cont = !force_name && self.last_block.as_deref() == Some(block);
        f.put_be64(addr | flags | if cont { fl::CONTINUE } else { 0 })?;
        if !cont {
            f.put_counted_string(block)?;
            self.last_block = Some(block.to_string());
        }
        Ok(())
    }

    /// Writes one page: as ZERO if it is all zero, else as PAGE with its data.
    pub fn write_page<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        block: &str,
        addr: u64,
        data: &[u8],
    ) -> Result<()> {
        if data.len() as u64 != self.page_size {
            return Err(RamError::BadPageLength {
                block: block.to_string(),
                addr,
                len: data.len(),
                page_size: self.page_size,
            });
        }
        if is_zero(data) {
            self.header(f, block, addr, fl::ZERO, false)?;
            f.put_u8(0)?;
        } else {
            self.header(f, block, addr, fl::PAGE, false)?;
            f.put_buffer(data)?;
        }
        Ok(())
    }

    /// Writes a record exactly as given (for re-encoding a decoded stream). For `Page`,
    /// `data` is the page's contents.
    pub fn write_record<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        rec: &RamRecord,
        data: &[u8],
    ) -> Result<()> {
        match rec {
            RamRecord::MemSize {
                total,
                flags,
                blocks,
            } => {
                f.put_be64(total | flags | fl::MEM_SIZE)?;
                for b in blocks {
                    f.put_counted_string(&b.idstr)?;
                    f.put_be64(b.used_length)?;
                    if let Some(a) = b.mr_addr {
                        f.put_be64(a)?;
                    }
                }
                self.last_block = None;
            }
            RamRecord::Zero {
                block,
                cont,
                addr,
                fill,
            } => {
                self.write_named(f, block, *cont, *addr, fl::ZERO)?;
                f.put_u8(*fill)?;
            }
            RamRecord::Page { block, cont, addr } => {
                self.write_named(f, block, *cont, *addr, fl::PAGE)?;
                f.put_buffer(data)?;
            }
            RamRecord::MultifdFlush => f.put_be64(fl::MULTIFD_FLUSH)?,
            RamRecord::Eos => f.put_be64(fl::EOS)?,
        }
        Ok(())
    }

    fn write_named<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        block: &str,
        cont: bool,
        addr: u64,
        flag: u64,
    ) -> Result<()> {
        f.put_be64(addr | flag | if cont { fl::CONTINUE } else { 0 })?;
        if !cont {
            f.put_counted_string(block)?;
        }
        self.last_block = Some(block.to_string());
        Ok(())
    }

    /// Writes the end-of-section marker.
    pub fn write_eos<W: Write>(&mut self, f: &mut QemuFileWriter<W>) -> Result<()> {
        f.put_be64(fl::EOS)?;
        Ok(())
    }
}

/// True if every byte is zero. Data with a nonzero byte near the start (most non-zero
/// pages) is rejected after one word; the rest is OR-folded 64 bytes at a time, a loop the
/// compiler vectorises.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, rest) = data.split_at(data.len().min(8));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    let mut blocks = rest.chunks_exact(64);
    for block in blocks.by_ref() {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks() -> Vec<RamBlockInfo> {
        vec![
            RamBlockInfo {
                idstr: "ram0".into(),
                used_length: 0x4000,
                mr_addr: None,
            },
            RamBlockInfo {
                idstr: "rom".into(),
                used_length: 0x1000,
                mr_addr: None,
            },
        ]
    }

    #[test]
    fn write_then_read_pages_zero_pages_and_continue() {
        let mut w = QemuFileWriter::new(Vec::new());
        let mut rw = RamWriter::new(4096, false).unwrap();
        rw.write_mem_size(&mut w, &blocks()).unwrap();
        let page = vec![0x5au8; 4096];
        rw.write_page(&mut w, "ram0", 0, &page).unwrap();
        rw.write_page(&mut w, "ram0", 0x1000, &[0u8; 4096]).unwrap();
        rw.write_page(&mut w, "rom", 0, &page).unwrap();
        rw.write_eos(&mut w).unwrap();
        let bytes = w.into_inner().unwrap();
        assert_eq!(infer_page_size(&blocks()), 4096);
        let odd = [RamBlockInfo {
            idstr: "x".into(),
            used_length: 0x800,
            mr_addr: None,
        }];
        assert_eq!(infer_page_size(&odd), 2048);

        let mut r = QemuFileReader::new(&bytes[..]);
        let mut rr = RamReader::new(4096, false).unwrap();
        assert!(matches!(
            rr.read_record(&mut r).unwrap(),
            RamRecord::MemSize { total: 0x5000, .. }
        ));
        assert_eq!(
            rr.read_record(&mut r).unwrap(),
            RamRecord::Page {
                block: "ram0".into(),
                cont: false,
                addr: 0
            }
        );
        let mut data = vec![0u8; 4096];
        r.read_exact(&mut data).unwrap();
        assert_eq!(data, page);
        assert_eq!(
            rr.read_record(&mut r).unwrap(),
            RamRecord::Zero {
                block: "ram0".into(),
                cont: true,
                addr: 0x1000,
                fill: 0
            }
        );
        assert!(matches!(
            rr.read_record(&mut r).unwrap(),
            RamRecord::Page { cont: false, .. }
        ));
        r.skip(4096).unwrap();
        assert_eq!(rr.read_record(&mut r).unwrap(), RamRecord::Eos);
    }

    #[test]
    fn zero_detection_finds_any_nonzero_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[0u8; 77]));
        for len in [1usize, 7, 8, 9, 72, 77, 4096] {
            for at in [0, len / 2, len - 1] {
                let mut d = vec![0u8; len];
                d[at] = 0x80;
                assert!(!is_zero(&d), "len {len} byte {at}");
            }
        }
    }

    #[test]
    fn unsupported_flags_are_named() {
        for (flags, name) in [
            (0x40u64, "XBZRLE"),
            (0x100, "COMPRESS_PAGE"),
            (0x80, "HOOK"),
        ] {
            let bytes = (0x1000 | flags).to_be_bytes();
            let mut rr = RamReader::new(4096, false).unwrap();
            let err = rr
                .read_record(&mut QemuFileReader::new(&bytes[..]))
                .unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
        let bytes = 0x1028u64.to_be_bytes();
        let mut rr = RamReader::new(4096, false).unwrap();
        assert!(matches!(
            rr.read_record(&mut QemuFileReader::new(&bytes[..])),
            Err(RamError::NoPreviousBlock { offset: 0 })
        ));
    }

    #[test]
    fn pages_outside_blocks_are_rejected() {
        let mut w = QemuFileWriter::new(Vec::new());
        let mut rw = RamWriter::new(4096, false).unwrap();
        rw.write_mem_size(&mut w, &blocks()).unwrap();
        w.put_be64(0x1000 | fl::ZERO).unwrap();
        w.put_counted_string("rom").unwrap();
        w.put_u8(0).unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r = QemuFileReader::new(&bytes[..]);
        let mut rr = RamReader::new(4096, false).unwrap();
        rr.read_record(&mut r).unwrap();
        assert!(matches!(
            rr.read_record(&mut r),
            Err(RamError::PageOutOfBlock { addr: 0x1000, .. })
        ));
    }
}
