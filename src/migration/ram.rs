//! The "ram" section (version 4, `migration/ram.c`): block list, pages, zero pages, end
//! markers.
//!
//! Every record starts with a be64 whose low bits are flags and whose high bits are the page's
//! offset inside its RAM block (or, for MEM_SIZE, the total RAM size). A record that is not
//! CONTINUE names its block (one-byte length + idstr). PAGE carries one target page of data;
//! ZERO carries one fill byte.
//!
//! vmsnap adds one opt-in record, [`RAM_SAVE_FLAG_LZ4`]: a page compressed with LZ4 (block
//! format), allowed only in streams whose configuration announces [`LZ4_CAPABILITY`]
//! (`formats/migration-stream.md` §6.1). QEMU refuses such streams at the configuration
//! ("Received unknown capability"); our reader refuses LZ4 records a stream did not announce.

use std::io::{Read, Write};

use super::protocol::ram_flags as fl;
use super::qemu_file::{QemuFileError, QemuFileReader, QemuFileWriter};

/// vmsnap's compressed-page record: be64 (offset | 0x01 [| CONTINUE]), the idstr unless
/// CONTINUE, be16 `len`, then `len` bytes of one LZ4 block that decompresses to exactly one
/// page (`1 <= len < page size`). 0x01 is QEMU's `RAM_SAVE_FLAG_FULL`, obsolete and never
/// sent since QEMU 1.x, and the only free bit below 0x400 (which 1 KiB-page targets need);
/// it means LZ4 only in streams that announce [`LZ4_CAPABILITY`].
pub const RAM_SAVE_FLAG_LZ4: u64 = 0x01;

/// The capability name, in the configuration section's capability list, that allows
/// [`RAM_SAVE_FLAG_LZ4`] records.
pub const LZ4_CAPABILITY: &str = "x-vmsnap-lz4";

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
    /// An LZ4 record in a stream that did not announce the capability.
    #[error("RAM record at {offset:#x} is an LZ4 page (flags {flags:#x}), but the stream's configuration does not announce the {LZ4_CAPABILITY} capability")]
    Lz4NotAnnounced {
        /// Record offset.
        offset: u64,
        /// The flags.
        flags: u64,
    },
    /// An LZ4 record whose compressed length is impossible.
    #[error("LZ4 page at {offset:#x} has a compressed length of {len:#x}, which must be between 1 and the page size {page_size:#x} (exclusive)")]
    BadCompressedLength {
        /// Record offset.
        offset: u64,
        /// The length field.
        len: u64,
        /// Page size.
        page_size: u64,
    },
    /// An LZ4 page body that does not decompress to exactly one page.
    #[error("LZ4 page body at {offset:#x} ({len:#x} bytes) does not decompress to one page of {page_size:#x} bytes: {reason}")]
    Lz4Decode {
        /// Offset of the compressed bytes.
        offset: u64,
        /// Compressed length.
        len: usize,
        /// Page size.
        page_size: u64,
        /// What the decompressor reported.
        reason: String,
    },
    /// An XBZRLE record with an encoding byte other than QEMU's only one.
    #[error(
        "Failed to load XBZRLE page - wrong compression! (encoding {encoding:#x} at {offset:#x})"
    )]
    XbzrleEncoding {
        /// Record offset.
        offset: u64,
        /// The encoding byte.
        encoding: u8,
    },
    /// An XBZRLE record longer than a page.
    #[error("Failed to load XBZRLE page - len overflow! ({len:#x} bytes at {offset:#x}, page size {page_size:#x})")]
    XbzrleLength {
        /// Record offset.
        offset: u64,
        /// The length field.
        len: u64,
        /// Page size.
        page_size: u64,
    },
    /// XBZRLE data that does not apply to a page.
    #[error("Failed to load XBZRLE page - decode error! (record data at {offset:#x}: {source})")]
    XbzrleDecode {
        /// Offset of the encoded data.
        offset: u64,
        /// What was wrong.
        source: super::xbzrle::XbzrleError,
    },
    /// An XBZRLE page asked for without the page's previous contents to apply it to.
    #[error("XBZRLE page at {offset:#x} is a delta against the previous copy of the page, which this reader does not keep")]
    XbzrleWithoutBase {
        /// Offset of the encoded data.
        offset: u64,
    },
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

/// A RAM record as [`RamReader::read_header`] returns it: like [`RamRecord`], but the block
/// is an index into [`RamReader::blocks`] and the block list stays in the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamHeader {
    /// The block list (now in [`RamReader::blocks`]).
    MemSize {
        /// Total RAM bytes.
        total: u64,
        /// Extra flag bits sent with MEM_SIZE (normally 0).
        flags: u64,
    },
    /// A page filled with one byte.
    Zero {
        /// Block index.
        block: usize,
        /// Whether the block name was omitted (CONTINUE).
        cont: bool,
        /// Page offset in the block.
        addr: u64,
        /// Fill byte.
        fill: u8,
    },
    /// A page whose data follows (raw, or LZ4: [`RamReader::compressed_len`]).
    Page {
        /// Block index.
        block: usize,
        /// Whether the block name was omitted (CONTINUE).
        cont: bool,
        /// Page offset in the block.
        addr: u64,
    },
    /// Multifd flush marker.
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
    lz4: bool,
    compressed: Option<usize>,
    xbzrle: Option<usize>,
}

impl Default for RamReader {
    /// 4 KiB pages, no x-ignore-shared, no LZ4.
    fn default() -> Self {
        RamReader {
            page_size: 4096,
            ignore_shared: false,
            blocks: Vec::new(),
            last_block: None,
            lz4: false,
            compressed: None,
            xbzrle: None,
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
            lz4: false,
            compressed: None,
            xbzrle: None,
        })
    }

    /// Accepts [`RAM_SAVE_FLAG_LZ4`] records (the stream announced [`LZ4_CAPABILITY`]).
    pub fn set_lz4(&mut self, on: bool) {
        self.lz4 = on;
    }

    /// Whether LZ4 records are accepted.
    pub fn lz4(&self) -> bool {
        self.lz4
    }

    /// For the `Page` just returned by [`Self::read_record`]: `Some(len)` when its body is
    /// `len` bytes of LZ4 data rather than `page_size` raw bytes.
    pub fn compressed_len(&self) -> Option<usize> {
        self.compressed
    }

    /// For the `Page` just returned by [`Self::read_record`]: `Some(len)` when its body is
    /// `len` bytes of XBZRLE data ([`super::xbzrle`]) to apply to the page's previous copy.
    pub fn xbzrle_len(&self) -> Option<usize> {
        self.xbzrle
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

    /// Reads one record header. After a `Page`, exactly `page_size` bytes of data follow (or,
    /// when [`Self::compressed_len`] or [`Self::xbzrle_len`] says so, that many bytes of LZ4
    /// or XBZRLE data) and must be
    /// consumed by the caller before the next call.
    pub fn read_record<R: Read>(&mut self, f: &mut QemuFileReader<R>) -> Result<RamRecord> {
        let h = self.read_header(f)?;
        Ok(self.record(h))
    }

    /// The owned record of a header just read (block names and the block list copied).
    pub fn record(&self, h: RamHeader) -> RamRecord {
        let name = |b: usize| {
            self.blocks
                .get(b)
                .map(|i| i.idstr.clone())
                .unwrap_or_default()
        };
        match h {
            RamHeader::MemSize { total, flags } => RamRecord::MemSize {
                total,
                flags,
                blocks: self.blocks.clone(),
            },
            RamHeader::Zero {
                block,
                cont,
                addr,
                fill,
            } => RamRecord::Zero {
                block: name(block),
                cont,
                addr,
                fill,
            },
            RamHeader::Page { block, cont, addr } => RamRecord::Page {
                block: name(block),
                cont,
                addr,
            },
            RamHeader::MultifdFlush => RamRecord::MultifdFlush,
            RamHeader::Eos => RamRecord::Eos,
        }
    }

    /// [`Self::read_record`] without copying names: the block is an index into
    /// [`Self::blocks`] (for readers that go through millions of pages).
    pub fn read_header<R: Read>(&mut self, f: &mut QemuFileReader<R>) -> Result<RamHeader> {
        self.compressed = None;
        self.xbzrle = None;
        let offset = f.position();
        let word = f.get_be64()?;
        // Flags always fit below 0x400, and pages are at least 1 KiB: this split is exact
        // whatever the page size.
        let flags = word & 0x3ff;
        let addr = word & !0x3ff;
        if flags & (fl::COMPRESS_PAGE | fl::HOOK) != 0 {
            let name = if flags & fl::COMPRESS_PAGE != 0 {
                "COMPRESS_PAGE (the removed compress capability)"
            } else {
                "HOOK (RDMA)"
            };
            return Err(RamError::Unsupported {
                offset,
                name,
                flags,
            });
        }
        if flags & RAM_SAVE_FLAG_LZ4 != 0 && !self.lz4 {
            return Err(RamError::Lz4NotAnnounced { offset, flags });
        }
        if flags & !(fl::KNOWN | RAM_SAVE_FLAG_LZ4) != 0 {
            return Err(RamError::UnknownFlags { offset, flags });
        }
        if flags & fl::MEM_SIZE != 0 {
            self.blocks = self.read_block_list(f, addr)?;
            self.last_block = None;
            return Ok(RamHeader::MemSize {
                total: addr,
                flags: flags & !fl::MEM_SIZE,
            });
        }
        let cont = flags & fl::CONTINUE != 0;
        let kind = flags & !fl::CONTINUE;
        match kind {
            fl::ZERO | fl::PAGE | RAM_SAVE_FLAG_LZ4 | fl::XBZRLE => {
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
                if kind == fl::ZERO {
                    let fill = f.get_u8()?;
                    return Ok(RamHeader::Zero {
                        block,
                        cont,
                        addr,
                        fill,
                    });
                }
                if kind == RAM_SAVE_FLAG_LZ4 {
                    let len = f.get_be16()?;
                    if len == 0 || u64::from(len) >= self.page_size {
                        return Err(RamError::BadCompressedLength {
                            offset,
                            len: u64::from(len),
                            page_size: self.page_size,
                        });
                    }
                    self.compressed = Some(usize::from(len));
                }
                if kind == fl::XBZRLE {
                    self.xbzrle = Some(self.read_xbzrle_header(f, offset)?);
                }
                Ok(RamHeader::Page { block, cont, addr })
            }
            fl::EOS if !cont && addr == 0 => Ok(RamHeader::Eos),
            fl::MULTIFD_FLUSH if !cont && addr == 0 => Ok(RamHeader::MultifdFlush),
            _ => Err(RamError::UnknownFlags { offset, flags }),
        }
    }

    /// The encoding byte and length of an XBZRLE record (QEMU's `load_xbzrle` checks).
    fn read_xbzrle_header<R: Read>(
        &mut self,
        f: &mut QemuFileReader<R>,
        offset: u64,
    ) -> Result<usize> {
        let encoding = f.get_u8()?;
        if encoding != super::xbzrle::ENCODING_FLAG_XBZRLE {
            return Err(RamError::XbzrleEncoding { offset, encoding });
        }
        let len = f.get_be16()?;
        if u64::from(len) > self.page_size {
            return Err(RamError::XbzrleLength {
                offset,
                len: u64::from(len),
                page_size: self.page_size,
            });
        }
        Ok(usize::from(len))
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
    lz4: bool,
    packed: Vec<u8>,
    recorder: Option<super::page_index::PageRecorder>,
}

impl RamWriter {
    /// A writer for pages of `page_size` bytes.
    pub fn new(page_size: u64, ignore_shared: bool) -> Result<Self> {
        check_page_size(page_size)?;
        Ok(RamWriter {
            page_size,
            ignore_shared,
            last_block: None,
            lz4: false,
            packed: Vec::new(),
            recorder: None,
        })
    }

    /// Records where each page written by [`RamWriter::write_page`] lands in the stream
    /// (its last copy), for a page index.
    pub fn set_recorder(&mut self, recorder: Option<super::page_index::PageRecorder>) {
        self.recorder = recorder;
    }

    /// The next page record names its block even if the one before was of the same block
    /// (no CONTINUE flag), so that the stream can be read from there on.
    pub fn name_next_block(&mut self) {
        self.last_block = None;
    }

    /// Sends pages with data as [`RAM_SAVE_FLAG_LZ4`] records when that makes them smaller
    /// (off by default). The stream must announce [`LZ4_CAPABILITY`] in its configuration.
    pub fn set_lz4(&mut self, on: bool) {
        self.lz4 = on;
    }

    /// Whether pages are compressed.
    pub fn lz4(&self) -> bool {
        self.lz4
    }

    /// Writes one page with data: an LZ4 record if its compressed form plus the 2-byte length
    /// is smaller than the page, else a PAGE record.
    fn write_lz4_page<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        block: &str,
        addr: u64,
        data: &[u8],
    ) -> Result<()> {
        self.packed
            .resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
        let packed = if looks_random(data) {
            None
        } else {
            lz4_flex::block::compress_into(data, &mut self.packed)
                .ok()
                .filter(|n| n + 2 < data.len())
                .and_then(|n| u16::try_from(n).ok())
        };
        match packed {
            Some(n) => {
                self.header(f, block, addr, RAM_SAVE_FLAG_LZ4, false)?;
                f.put_be16(n)?;
                f.put_buffer(&self.packed[..usize::from(n)])?;
            }
            None => {
                self.header(f, block, addr, fl::PAGE, false)?;
                f.put_buffer(data)?;
            }
        }
        Ok(())
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
            if let Some(r) = &self.recorder {
                r.page(block, addr, None);
            }
        } else if self.lz4 {
            self.write_lz4_page(f, block, addr, data)?;
            if let Some(r) = &self.recorder {
                r.page_unindexable(block);
            }
        } else {
            self.header(f, block, addr, fl::PAGE, false)?;
            if let Some(r) = &self.recorder {
                r.page(block, addr, Some(f.position()));
            }
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
            RamRecord::Page { block, cont, addr } if self.lz4 => {
                // Re-encoding a stream of ours: the same choice as when it was written (the
                // block is named again exactly where the record named it).
                if !*cont {
                    self.last_block = None;
                }
                self.write_lz4_page(f, block, *addr, data)?;
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

    /// Writes one page as an XBZRLE record whose data is `encoded` (from
    /// [`super::xbzrle::encode`], at most one page long).
    pub fn write_xbzrle_page<W: Write>(
        &mut self,
        f: &mut QemuFileWriter<W>,
        block: &str,
        addr: u64,
        encoded: &[u8],
    ) -> Result<()> {
        let len = u16::try_from(encoded.len())
            .ok()
            .filter(|&n| u64::from(n) <= self.page_size)
            .ok_or_else(|| RamError::BadPageLength {
                block: block.to_string(),
                addr,
                len: encoded.len(),
                page_size: self.page_size,
            })?;
        self.header(f, block, addr, fl::XBZRLE, false)?;
        f.put_u8(super::xbzrle::ENCODING_FLAG_XBZRLE)?;
        f.put_be16(len)?;
        f.put_buffer(encoded)?;
        if let Some(r) = &self.recorder {
            r.page_unindexable(block);
        }
        Ok(())
    }

    /// Writes the end-of-section marker.
    pub fn write_eos<W: Write>(&mut self, f: &mut QemuFileWriter<W>) -> Result<()> {
        f.put_be64(fl::EOS)?;
        Ok(())
    }
}

/// Whether a page looks like random data, which LZ4 cannot shrink: 512 bytes sampled across
/// it take more than 200 distinct values (random bytes take about 221, text well under 100,
/// machine code about 150). Spares the compressor a futile pass; a wrong guess only costs
/// ratio, never correctness.
fn looks_random(data: &[u8]) -> bool {
    let step = (data.len() / 512).max(1);
    let mut seen = [0u64; 4];
    for &b in data.iter().step_by(step) {
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum::<u32>() > 200
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
        for (flags, name) in [(0x100u64, "COMPRESS_PAGE"), (0x80, "HOOK")] {
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
    fn lz4_pages_only_when_smaller_and_only_when_announced() {
        let mut w = QemuFileWriter::new(Vec::new());
        let mut rw = RamWriter::new(4096, false).unwrap();
        rw.set_lz4(true);
        rw.write_mem_size(&mut w, &blocks()).unwrap();
        let text: Vec<u8> = b"hello RAM ".iter().copied().cycle().take(4096).collect();
        let mut x = 1u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        rw.write_page(&mut w, "ram0", 0, &text).unwrap();
        rw.write_page(&mut w, "ram0", 0x1000, &noise).unwrap();
        let bytes = w.into_inner().unwrap();

        let mut r = QemuFileReader::new(&bytes[..]);
        let mut rr = RamReader::new(4096, false).unwrap();
        rr.set_lz4(true);
        rr.read_record(&mut r).unwrap();
        assert_eq!(
            rr.read_record(&mut r).unwrap(),
            RamRecord::Page {
                block: "ram0".into(),
                cont: false,
                addr: 0
            }
        );
        let len = rr.compressed_len().unwrap();
        assert!(len < 100, "{len}");
        let packed = r.get_vec(len).unwrap();
        assert_eq!(lz4_flex::block::decompress(&packed, 4096).unwrap(), text);
        assert!(looks_random(&noise));
        assert!(!looks_random(&text));
        assert!(!looks_random(&[0u8; 4096]));
        // Random data does not shrink: a plain PAGE.
        assert!(matches!(
            rr.read_record(&mut r).unwrap(),
            RamRecord::Page { cont: true, .. }
        ));
        assert_eq!(rr.compressed_len(), None);

        let mut r = QemuFileReader::new(&bytes[..]);
        let mut rr = RamReader::new(4096, false).unwrap();
        rr.read_record(&mut r).unwrap();
        assert!(matches!(
            rr.read_record(&mut r),
            Err(RamError::Lz4NotAnnounced { flags: 0x01, .. })
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
