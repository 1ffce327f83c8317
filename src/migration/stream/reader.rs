//! The pull parser: one record per call, device bodies decoded or captured up to their footer.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use super::{ErrorKind, Event, Item, Result, SectionInfo, StreamError};
use crate::migration::configuration::configuration_vmsd;
use crate::migration::protocol::{
    CommandKind, SectionType, FILE_MAGIC, FILE_VERSION, FILE_VERSION_COMPAT, RAM_VERSION,
};
use crate::migration::qemu_file::{QemuFileError, QemuFileReader};
use crate::migration::ram::{
    infer_page_size, RamBlockInfo, RamError, RamHeader, RamReader, LZ4_CAPABILITY,
};
use crate::migration::value::Value;
use crate::migration::vmdesc::{VmDesc, MAX_VMDESC_BYTES};
use crate::migration::vmstate::VMStateDescription;

/// Largest device body captured without a description.
pub const MAX_CAPTURE: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Top,
    Body(u32),
    AfterEof,
    Done,
}

/// How a device body is decoded.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The description.
    pub vmsd: Arc<VMStateDescription>,
    /// Check the section's version against the description (loader) instead of decoding at
    /// the description's own version (vmdesc).
    pub check_version: bool,
}

/// Pull parser over a migration stream.
#[derive(Debug)]
pub struct StreamReader<R> {
    f: QemuFileReader<R>,
    state: State,
    sections: HashMap<u32, SectionInfo>,
    /// Id of the RAM section (spares a map lookup per RAM record).
    ram_section: Option<u32>,
    last_section: Option<u32>,
    ram: RamReader,
    page_size_known: bool,
    pending_page: u64,
    /// The pending page body is LZ4 data (`pending_page` compressed bytes).
    pending_lz4: bool,
    /// The pending page body is XBZRLE data (`pending_page` encoded bytes).
    pending_xbzrle: bool,
    packed: Vec<u8>,
    page: Vec<u8>,
    page_valid: bool,
    decoders: HashMap<(String, u32), Decoder>,
    /// Moves the source forward without reading (set for seekable sources).
    seek_forward: Option<fn(&mut R, u64) -> io::Result<()>>,
}

/// Seeks `src` forward by `n` bytes.
fn seek_forward<R: Seek>(src: &mut R, n: u64) -> io::Result<()> {
    let n = i64::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    src.seek(SeekFrom::Current(n)).map(drop)
}

impl<R: Read + Seek> StreamReader<R> {
    /// A reader over a seekable source, positioned at its current offset (the stream's
    /// start): page bodies nobody asks for are seeked over instead of read. A source whose
    /// forward seek past its end fails with [`io::ErrorKind::UnexpectedEof`] reports a
    /// truncated stream where it happens.
    ///
    /// This pays only when the source's reads return little at a time (the inspector's
    /// mapped file returns ≤ 64 bytes per read): after each seek the reader refills its buffer
    /// with one `read`, and a plain `File` would then read 64 KiB to use 9 bytes.
    pub fn new_seekable(src: R) -> Self {
        let mut r = Self::new(src);
        r.seek_forward = Some(seek_forward::<R>);
        r
    }
}

impl<R: Read> StreamReader<R> {
    /// A reader over `src`, positioned at the stream's start.
    pub fn new(src: R) -> Self {
        Self::from_reader(QemuFileReader::new(src))
    }

    /// A reader over an existing buffered reader.
    pub fn from_reader(f: QemuFileReader<R>) -> Self {
        StreamReader {
            f,
            state: State::Header,
            sections: HashMap::new(),
            ram_section: None,
            last_section: None,
            // 4 KiB until the stream says otherwise.
            ram: RamReader::default(),
            page_size_known: false,
            pending_page: 0,
            pending_lz4: false,
            pending_xbzrle: false,
            packed: Vec::new(),
            page: Vec::new(),
            page_valid: false,
            decoders: HashMap::new(),
            seek_forward: None,
        }
    }

    /// Fixes the target page size instead of inferring it from the RAM block list.
    pub fn set_page_size(&mut self, page_size: u64) -> Result<()> {
        self.ram
            .set_page_size(page_size)
            .map_err(|e| self.err(ErrorKind::Ram(e)))?;
        self.page_size_known = true;
        Ok(())
    }

    /// Decodes the body of section `idstr`/`instance_id` with `decoder`.
    pub fn add_decoder(&mut self, idstr: &str, instance_id: u32, decoder: Decoder) {
        self.decoders
            .insert((idstr.to_string(), instance_id), decoder);
    }

    /// Decodes every device of `vmdesc` by its description, and takes its page size.
    pub fn use_vmdesc(&mut self, vmdesc: &VmDesc) -> Result<()> {
        for d in &vmdesc.devices {
            self.add_decoder(
                &d.name,
                d.instance_id,
                Decoder {
                    vmsd: d.vmsd.clone(),
                    check_version: false,
                },
            );
        }
        self.set_page_size(vmdesc.page_size)
    }

    /// The byte reader, for a handler that reads its own section's body (a format of our
    /// own, such as `vmsnap-block`): the next record after the body is the footer.
    pub fn body_reader(&mut self) -> &mut QemuFileReader<R> {
        if let State::Body(id) = self.state {
            self.last_section = Some(id);
            self.state = State::Top;
        }
        &mut self.f
    }

    /// Current stream offset.
    pub fn position(&self) -> u64 {
        self.f.position()
    }

    /// Target page size in use.
    pub fn page_size(&self) -> u64 {
        self.ram.page_size()
    }

    /// The section being decoded, if any.
    pub fn current_section(&self) -> Option<&SectionInfo> {
        match self.state {
            State::Body(id) => self.sections.get(&id),
            _ => self.last_section.and_then(|id| self.sections.get(&id)),
        }
    }

    fn err(&self, kind: ErrorKind) -> StreamError {
        StreamError {
            offset: self.f.position(),
            section: self.current_section().map(SectionInfo::label),
            kind: Box::new(kind),
        }
    }

    fn err_at(&self, offset: u64, kind: ErrorKind) -> StreamError {
        StreamError {
            offset,
            section: self.current_section().map(SectionInfo::label),
            kind: Box::new(kind),
        }
    }

    /// The data of the page announced by the last `Ram` event (decompressed if it was sent
    /// as LZ4). An XBZRLE page is an error here: it needs the page's previous contents
    /// ([`Self::read_page_into`]).
    pub fn page_data(&mut self) -> Result<&[u8]> {
        if self.pending_xbzrle {
            let at = self.f.position();
            return Err(self.err(ErrorKind::Ram(RamError::XbzrleWithoutBase { offset: at })));
        }
        if !self.page_valid {
            let mut page = std::mem::take(&mut self.page);
            page.resize(self.ram.page_size() as usize, 0);
            let r = self.read_pending_into(&mut page);
            self.page = page;
            r?;
            self.page_valid = true;
        }
        Ok(&self.page)
    }

    /// Reads the pending page straight into `dst` (which must be one page long; LZ4 pages are
    /// decompressed into it). For an XBZRLE page ([`Self::page_xbzrle_len`]) `dst` must hold
    /// the page's previous contents: the delta is applied to it in place.
    pub fn read_page_into(&mut self, dst: &mut [u8]) -> Result<()> {
        if self.pending_xbzrle {
            return self.apply_xbzrle(dst);
        }
        if self.page_valid {
            let n = dst.len().min(self.page.len());
            dst[..n].copy_from_slice(&self.page[..n]);
            return Ok(());
        }
        if self.pending_lz4 && dst.len() as u64 != self.ram.page_size() {
            self.page_data()?;
            let n = dst.len().min(self.page.len());
            dst[..n].copy_from_slice(&self.page[..n]);
            return Ok(());
        }
        self.read_pending_into(dst)
    }

    /// For the page announced by the last `Ram` event: `Some(len)` when it was sent as `len`
    /// bytes of LZ4 data (vmsnap's opt-in compression).
    pub fn page_compressed_len(&self) -> Option<u64> {
        self.ram.compressed_len().map(|n| n as u64)
    }

    /// For the page announced by the last `Ram` event: `Some(len)` when it was sent as `len`
    /// bytes of XBZRLE data (a delta against the page's previous copy).
    pub fn page_xbzrle_len(&self) -> Option<u64> {
        self.ram.xbzrle_len().map(|n| n as u64)
    }

    /// Consumes the pending XBZRLE body and applies it to `page` (one page long).
    fn apply_xbzrle(&mut self, page: &mut [u8]) -> Result<()> {
        let (at, _) = self.read_packed()?;
        let page_size = self.ram.page_size();
        if page.len() as u64 != page_size {
            return Err(self.err_at(
                at,
                ErrorKind::Ram(RamError::BadPageLength {
                    block: String::new(),
                    addr: 0,
                    len: page.len(),
                    page_size,
                }),
            ));
        }
        crate::migration::xbzrle::decode(&self.packed, page).map_err(|source| {
            self.err_at(
                at,
                ErrorKind::Ram(RamError::XbzrleDecode { offset: at, source }),
            )
        })?;
        Ok(())
    }

    /// Reads the pending encoded (LZ4 or XBZRLE) page body into `packed`; returns its stream
    /// offset and length.
    fn read_packed(&mut self) -> Result<(u64, usize)> {
        let at = self.f.position();
        let len = self.pending_page as usize;
        self.packed.resize(len, 0);
        self.f
            .read_exact(&mut self.packed)
            .map_err(|e| self.err(e.into()))?;
        self.pending_page = 0;
        self.pending_lz4 = false;
        self.pending_xbzrle = false;
        Ok((at, len))
    }

    /// Consumes the pending page body into `dst`: raw bytes, or LZ4 data decompressed into a
    /// `dst` of exactly one page.
    fn read_pending_into(&mut self, dst: &mut [u8]) -> Result<()> {
        if !self.pending_lz4 {
            let n = dst.len().min(self.pending_page as usize);
            self.f
                .read_exact(&mut dst[..n])
                .map_err(|e| self.err(e.into()))?;
            self.pending_page -= n as u64;
            return Ok(());
        }
        let (at, len) = self.read_packed()?;
        let page_size = self.ram.page_size();
        let reason = match lz4_flex::block::decompress_into(&self.packed, dst) {
            Ok(n) if n as u64 == page_size => return Ok(()),
            Ok(n) => format!("it gives {n:#x} bytes"),
            Err(e) => e.to_string(),
        };
        Err(self.err_at(
            at,
            ErrorKind::Ram(RamError::Lz4Decode {
                offset: at,
                len,
                page_size,
                reason,
            }),
        ))
    }

    /// Reads the next record.
    pub fn next_event(&mut self) -> Result<Event> {
        Ok(match self.next_item()? {
            Item::Ram { offset, header } => Event::Ram {
                offset,
                record: self.ram.record(header),
            },
            Item::Other(ev) => ev,
        })
    }

    /// Reads the next record like [`Self::next_event`], but gives RAM records as
    /// [`RamHeader`]s (block names by index into [`Self::ram_blocks`], nothing allocated):
    /// the inspector's way through millions of pages.
    pub fn next_item(&mut self) -> Result<Item> {
        if self.pending_page > 0 {
            let n = self.pending_page;
            let r = match self.seek_forward {
                Some(seek) => self.f.skip_with(n, seek),
                None => self.f.skip(n),
            };
            r.map_err(|e| self.err(e.into()))?;
            self.pending_page = 0;
        }
        self.pending_lz4 = false;
        self.pending_xbzrle = false;
        self.page_valid = false;
        let ev = match self.state {
            State::Header => self.read_header(),
            State::Top => self.read_top(),
            State::Body(id) if self.ram_section == Some(id) => return self.read_ram(),
            State::Body(id) => self.read_body(id),
            State::AfterEof => self.read_after_eof(),
            State::Done => Ok(Event::End),
        };
        ev.map(Item::Other)
    }

    /// RAM blocks announced by the stream so far (what [`RamHeader`] block indices refer to).
    pub fn ram_blocks(&self) -> &[RamBlockInfo] {
        self.ram.blocks()
    }

    fn read_header(&mut self) -> Result<Event> {
        let magic = self.f.get_be32().map_err(|e| self.err(e.into()))?;
        if magic != FILE_MAGIC {
            return Err(self.err_at(0, ErrorKind::BadMagic(magic)));
        }
        let version = self.f.get_be32().map_err(|e| self.err(e.into()))?;
        if version == FILE_VERSION_COMPAT {
            return Err(self.err_at(4, ErrorKind::ObsoleteVersion));
        }
        if version != FILE_VERSION {
            return Err(self.err_at(4, ErrorKind::UnsupportedVersion(version)));
        }
        self.state = State::Top;
        Ok(Event::Header { version })
    }

    fn read_top(&mut self) -> Result<Event> {
        let offset = self.f.position();
        let byte = self.f.get_u8().map_err(|e| self.err(e.into()))?;
        let ty = SectionType::try_from(byte)
            .map_err(|b| self.err_at(offset, ErrorKind::UnknownRecordType(b)))?;
        let io = |s: &Self, e: QemuFileError| s.err(e.into());
        match ty {
            SectionType::Configuration => {
                let value = configuration_vmsd()
                    .decode(&mut self.f, 1)
                    .map_err(|e| self.err(e.into()))?;
                self.apply_configuration(&value)?;
                Ok(Event::Configuration { offset, value })
            }
            SectionType::Start | SectionType::Full => {
                let section_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let idstr = self.f.get_counted_string().map_err(|e| io(self, e))?;
                let instance_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let version_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let info = SectionInfo {
                    section_id,
                    idstr,
                    instance_id,
                    version_id,
                };
                if info.is_ram() {
                    self.ram_section = Some(section_id);
                } else if self.ram_section == Some(section_id) {
                    self.ram_section = None;
                }
                self.sections.insert(section_id, info.clone());
                self.last_section = Some(section_id);
                self.state = State::Body(section_id);
                if info.is_ram() && info.version_id != RAM_VERSION {
                    return Err(self.err_at(offset, ErrorKind::RamVersion(info.version_id)));
                }
                Ok(Event::Section {
                    offset,
                    kind: ty,
                    info,
                })
            }
            SectionType::Part | SectionType::End => {
                let section_id = self.f.get_be32().map_err(|e| io(self, e))?;
                let info =
                    self.sections.get(&section_id).cloned().ok_or_else(|| {
                        self.err_at(offset, ErrorKind::UnknownSectionId(section_id))
                    })?;
                self.last_section = Some(section_id);
                self.state = State::Body(section_id);
                Ok(Event::Section {
                    offset,
                    kind: ty,
                    info,
                })
            }
            SectionType::Footer => {
                let section_id = self.f.get_be32().map_err(|e| io(self, e))?;
                match self.last_section {
                    Some(expected) if expected == section_id => {}
                    expected => {
                        return Err(self.err_at(
                            offset,
                            ErrorKind::FooterMismatch {
                                expected: expected.unwrap_or(u32::MAX),
                                found: section_id,
                            },
                        ))
                    }
                }
                Ok(Event::Footer { offset, section_id })
            }
            SectionType::Eof => {
                self.state = State::AfterEof;
                self.last_section = None;
                Ok(Event::Eof { offset })
            }
            SectionType::Command => {
                let cmd = self.f.get_be16().map_err(|e| io(self, e))?;
                let len = self.f.get_be16().map_err(|e| io(self, e))?;
                let data = self.f.get_vec(usize::from(len)).map_err(|e| io(self, e))?;
                Ok(Event::Command {
                    offset,
                    cmd,
                    name: CommandKind::from_u16(cmd).map(CommandKind::name),
                    data,
                })
            }
            SectionType::Subsection | SectionType::VmDescription => {
                Err(self.err_at(offset, ErrorKind::UnexpectedRecord(ty.name())))
            }
        }
    }

    fn apply_configuration(&mut self, value: &Value) -> Result<()> {
        if let Some(bits) = value
            .get("configuration/target-page-bits")
            .and_then(|v| v.get("target_page_bits"))
            .and_then(Value::as_u64)
        {
            let ps = 1u64
                .checked_shl(u32::try_from(bits).unwrap_or(64))
                .unwrap_or(0);
            self.set_page_size(ps)?;
        }
        let caps = value
            .get("configuration/capabilities")
            .and_then(|v| v.get("capabilities"));
        if let Some(Value::Array(caps)) = caps {
            let has = |name: &str| caps.iter().any(|c| c.as_bytes() == Some(name.as_bytes()));
            if has("x-ignore-shared") {
                let ps = self.ram.page_size();
                self.ram = RamReader::new(ps, true).map_err(|e| self.err(e.into()))?;
            }
            self.ram.set_lz4(has(LZ4_CAPABILITY));
        }
        Ok(())
    }

    /// One record of the RAM section.
    fn read_ram(&mut self) -> Result<Item> {
        let offset = self.f.position();
        let header = self
            .ram
            .read_header(&mut self.f)
            .map_err(|e| self.err_at(offset, e.into()))?;
        match header {
            RamHeader::MemSize { .. } if !self.page_size_known => {
                let ps = infer_page_size(self.ram.blocks());
                self.ram.set_page_size(ps).map_err(|e| self.err(e.into()))?;
            }
            RamHeader::Page { .. } => match (self.ram.compressed_len(), self.ram.xbzrle_len()) {
                (Some(len), _) => {
                    self.pending_page = len as u64;
                    self.pending_lz4 = true;
                }
                (None, Some(len)) => {
                    self.pending_page = len as u64;
                    self.pending_xbzrle = true;
                }
                (None, None) => self.pending_page = self.ram.page_size(),
            },
            RamHeader::Eos => self.state = State::Top,
            _ => {}
        }
        Ok(Item::Ram { offset, header })
    }

    /// A device body (anything but RAM).
    fn read_body(&mut self, id: u32) -> Result<Event> {
        let offset = self.f.position();
        self.state = State::Top;
        let info = self
            .sections
            .get(&id)
            .cloned()
            .ok_or_else(|| self.err(ErrorKind::UnknownSectionId(id)))?;
        let key = (info.idstr.clone(), info.instance_id);
        if let Some(dec) = self.decoders.get(&key).cloned() {
            let version = if dec.check_version {
                info.version_id
            } else {
                dec.vmsd.version_id
            };
            let value = dec
                .vmsd
                .decode(&mut self.f, version)
                .map_err(|e| self.err(e.into()))?;
            return Ok(Event::Device { offset, value });
        }
        let bytes = self.capture_body(id)?;
        Ok(Event::RawBody { offset, bytes })
    }

    /// Reads bytes up to the first plausible footer of section `id`.
    fn capture_body(&mut self, id: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let footer = {
            let mut b = [0u8; 5];
            b[0] = SectionType::Footer as u8;
            b[1..].copy_from_slice(&id.to_be_bytes());
            b
        };
        loop {
            let (found, step) = match self.f.peek(512) {
                Ok([]) => (false, 0),
                Ok(window) => {
                    let found = window.starts_with(&footer)
                        && plausible_after_footer(&self.sections, &window[5..]);
                    // Consume up to the next candidate 0x7e in the window.
                    let step = window[1..]
                        .iter()
                        .position(|&b| b == SectionType::Footer as u8)
                        .map_or(window.len(), |p| p + 1);
                    (found, step)
                }
                Err(e) => return Err(self.err(e.into())),
            };
            if found {
                return Ok(out);
            }
            if step == 0 {
                return Err(self.err(ErrorKind::NoFooterFound {
                    section_id: id,
                    scanned: out.len(),
                }));
            }
            let start = out.len();
            out.resize(start + step, 0);
            self.f
                .read_exact(&mut out[start..])
                .map_err(|e| self.err(e.into()))?;
            if out.len() > MAX_CAPTURE {
                return Err(self.err(ErrorKind::NoFooterFound {
                    section_id: id,
                    scanned: out.len(),
                }));
            }
        }
    }

    fn read_after_eof(&mut self) -> Result<Event> {
        let offset = self.f.position();
        let Some(b) = self.f.peek_u8().map_err(|e| self.err(e.into()))? else {
            self.state = State::Done;
            return Ok(Event::End);
        };
        if b != SectionType::VmDescription as u8 {
            return Err(self.err_at(offset, ErrorKind::AfterEof(b)));
        }
        self.f.skip(1).map_err(|e| self.err(e.into()))?;
        let len = self.f.get_be32().map_err(|e| self.err(e.into()))?;
        if len > MAX_VMDESC_BYTES {
            return Err(self.err_at(offset, ErrorKind::VmDescTooLarge(len)));
        }
        let json = self
            .f
            .get_vec(len as usize)
            .map_err(|e| self.err(e.into()))?;
        self.state = State::Done;
        Ok(Event::VmDescription { offset, json })
    }
}

/// Whether `w` (the bytes after a candidate footer) starts like a record that can follow a
/// section: the stream's end, EOF + vmdesc, a new section header, or PART/END of a known section.
fn plausible_after_footer(sections: &HashMap<u32, SectionInfo>, w: &[u8]) -> bool {
    let Some(&t) = w.first() else {
        return true; // stream ends right after the footer
    };
    let be32 = |b: &[u8]| -> Option<u32> { Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)) };
    match SectionType::try_from(t) {
        Ok(SectionType::Eof) => w.len() == 1 || w[1] == SectionType::VmDescription as u8,
        Ok(SectionType::Start | SectionType::Full) => {
            let Some(len) = w.get(5).copied() else {
                return false;
            };
            let len = usize::from(len);
            len > 0
                && w.len() >= 6 + len + 8
                && w[6..6 + len].iter().all(|c| (0x20..0x7f).contains(c))
        }
        Ok(SectionType::Part | SectionType::End) => {
            be32(&w[1..]).is_some_and(|id| sections.contains_key(&id))
        }
        Ok(SectionType::Command) => {
            let cmd = w.get(1..3).map(|b| u16::from_be_bytes([b[0], b[1]]));
            cmd.and_then(CommandKind::from_u16).is_some()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::configuration::{configuration_name, configuration_value};
    use crate::migration::stream::StreamWriter;
    use crate::migration::vmstate::Field;

    fn info(id: u32, idstr: &str) -> SectionInfo {
        SectionInfo {
            section_id: id,
            idstr: idstr.into(),
            instance_id: 0,
            version_id: 1,
        }
    }

    /// A stream with one device whose body contains a fake footer for its own id.
    fn sample(body: &[u8], footer_id: u32) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        w.write_header().unwrap();
        w.write_configuration(&configuration_value("pc")).unwrap();
        w.write_command(2, &[0, 0, 0, 9]).unwrap();
        w.write_section_header(SectionType::Full, &info(3, "dev"))
            .unwrap();
        w.f.put_buffer(body).unwrap();
        w.write_footer(footer_id).unwrap();
        w.write_eof().unwrap();
        w.write_vmdesc(br#"{"page_size": 4096, "devices": []}"#)
            .unwrap();
        w.finish().unwrap()
    }

    fn events(bytes: &[u8]) -> Result<Vec<Event>> {
        let mut r = StreamReader::new(bytes);
        let mut out = Vec::new();
        loop {
            let e = r.next_event()?;
            if e == Event::End {
                return Ok(out);
            }
            out.push(e);
        }
    }

    #[test]
    fn walks_every_record_kind_and_skips_fake_footers() {
        // The body holds "7e 00 00 00 03" followed by junk: not a plausible footer.
        let body = [1u8, 0x7e, 0, 0, 0, 3, 0x99, 2, 3];
        let ev = events(&sample(&body, 3)).unwrap();
        assert!(matches!(ev[0], Event::Header { version: 3 }));
        match &ev[1] {
            Event::Configuration { value, offset: 8 } => {
                assert_eq!(configuration_name(value), "pc")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ev[2],
            Event::Command {
                cmd: 2,
                name: Some("PING"),
                ..
            }
        ));
        assert!(
            matches!(&ev[3], Event::Section { kind: SectionType::Full, info, .. } if info.idstr == "dev")
        );
        assert!(matches!(&ev[4], Event::RawBody { bytes, .. } if bytes == &body));
        assert!(matches!(ev[5], Event::Footer { section_id: 3, .. }));
        assert!(matches!(ev[6], Event::Eof { .. }));
        assert!(matches!(ev[7], Event::VmDescription { .. }));
    }

    #[test]
    fn decodes_with_a_known_description_and_checks_footers() {
        let bytes = sample(&[0, 0, 0, 5], 4);
        let mut r = StreamReader::new(&bytes[..]);
        r.add_decoder(
            "dev",
            0,
            Decoder {
                vmsd: Arc::new(VMStateDescription::new("dev", 1, 1).field(Field::uint("v", 4))),
                check_version: true,
            },
        );
        let mut got = None;
        let err = loop {
            match r.next_event() {
                Ok(Event::Device { value, .. }) => got = Some(value),
                Ok(Event::End) => panic!("footer mismatch not detected"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(got.unwrap().get("v"), Some(&Value::u32(5)));
        assert!(matches!(
            *err.kind,
            ErrorKind::FooterMismatch {
                expected: 3,
                found: 4
            }
        ));
        assert!(
            err.to_string().contains("in section 'dev' (id 0x3)"),
            "{err}"
        );
    }

    #[test]
    fn part_of_unknown_section_and_bad_bytes() {
        let mut bytes = b"QEVM\0\0\0\x03".to_vec();
        bytes.extend_from_slice(&[2, 0, 0, 0, 9]);
        let e = events(&bytes).unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::UnknownSectionId(9)));
        assert_eq!(e.offset, 8);
        let e = events(b"QEVM\0\0\0\x03\x00\x42").unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::AfterEof(0x42)));
        let e = events(b"XEVM\0\0\0\x03").unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::BadMagic(_)));
        let e = events(b"QEVM\0\0\0\x03\x05").unwrap_err();
        assert!(matches!(*e.kind, ErrorKind::UnexpectedRecord("SUBSECTION")));
    }
}
