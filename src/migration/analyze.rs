//! What `analyze-migration.py` prints for a stream (`--dump state`, `--dump desc`, `-m`,
//! `-x`), computed in one forward pass with bounded memory, plus the facts the inspector's
//! human output shows (section table, RAM statistics).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value as Json};

use super::configuration::configuration_capabilities;
use super::protocol::SectionType;
use super::ram::RamHeader;
use super::stream::{configuration_name, decode_body, Event, Item, StreamError, StreamReader};
use super::value::{hex_bytes, Value};
use super::vmdesc::{to_python_json, VmDesc};

/// Errors of the analysis itself (the stream's own errors are kept in [`Analysis::error`]).
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    /// Writing extracted files failed.
    #[error("extracting to '{path}': {source}")]
    Extract {
        /// File or directory.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A RAM block name that cannot be used as a relative path.
    #[error("RAM block name '{0}' is not a safe relative path")]
    UnsafeBlockName(String),
}

/// Most bytes of device bodies kept while waiting for the vmdesc (QEMU VMs have well under
/// 1 MiB of device state; RAM is never kept).
pub const MAX_KEPT: usize = 256 << 20;

/// What to collect besides the state.
#[derive(Debug, Clone, Default)]
pub struct AnalyzeOptions {
    /// Collect page contents (`-m`).
    pub memory: bool,
    /// Write each RAM block as a sparse file under this directory (`-x`).
    pub extract_dir: Option<PathBuf>,
    /// Target page size to decode RAM with, instead of inferring it.
    pub page_size: Option<u64>,
}

/// One row of the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionRow {
    /// Offset of the record's first byte.
    pub offset: u64,
    /// Record type name (START, FULL, CONFIGURATION, …).
    pub kind: &'static str,
    /// Section id (none for configuration, EOF, vmdesc).
    pub section_id: Option<u32>,
    /// idstr (or machine name for the configuration).
    pub idstr: String,
    /// Instance id.
    pub instance_id: Option<u32>,
    /// Version id.
    pub version_id: Option<u32>,
    /// Bytes from the record's start to the end of its footer (or the record).
    pub size: u64,
}

/// RAM statistics of one block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Block length from MEM_SIZE.
    pub used_length: u64,
    /// Pages sent with data.
    pub pages: u64,
    /// Pages sent as zero/fill pages.
    pub zero_pages: u64,
    /// Of `pages`, those sent LZ4-compressed (vmsnap's opt-in `x-vmsnap-lz4`).
    pub lz4_pages: u64,
    /// Compressed bytes of those pages.
    pub lz4_bytes: u64,
    /// Of `pages`, those sent as XBZRLE deltas.
    pub xbzrle_pages: u64,
    /// Encoded bytes of those pages.
    pub xbzrle_bytes: u64,
}

/// A decoded device section.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    /// Section id.
    pub section_id: u32,
    /// idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// The decoded value, or `None` when the vmdesc does not describe it.
    pub value: Option<Value>,
}

/// Everything gathered from a stream.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Machine name from the configuration section.
    pub machine: Option<String>,
    /// Capabilities the configuration section announces.
    pub capabilities: Vec<String>,
    /// Target page size used for RAM.
    pub page_size: u64,
    /// Section table in stream order.
    pub rows: Vec<SectionRow>,
    /// Device sections in stream order (decoded once the vmdesc was read).
    pub devices: Vec<DeviceRow>,
    /// RAM statistics per block, in block-list order.
    pub ram_blocks: Vec<(String, BlockStats)>,
    /// `--dump state` JSON (what could be decoded).
    pub state: Json,
    /// `--dump desc` JSON, if the stream has a vmdesc.
    pub desc: Option<Json>,
    /// Where and why decoding stopped early.
    pub error: Option<StreamError>,
    /// Non-fatal findings (undescribed sections, missing vmdesc, …).
    pub warnings: Vec<String>,
    /// Total bytes decoded.
    pub bytes: u64,
}

impl Analysis {
    /// True if decoding stopped inside the RAM section, where a wrong page size shows.
    pub fn stopped_in_ram(&self) -> bool {
        self.error.as_ref().is_some_and(|e| {
            matches!(*e.kind, super::stream::ErrorKind::Ram(_))
                || e.section.as_deref().is_some_and(|s| s.starts_with("'ram'"))
        })
    }

    /// The page size the vmdesc states, if there is one.
    pub fn vmdesc_page_size(&self) -> Option<u64> {
        self.desc.as_ref()?.get("page_size")?.as_u64()
    }
}

enum Pending {
    Ram(Map<String, Json>, Option<Map<String, Json>>),
    Device(usize),
}

struct Extractor {
    dir: PathBuf,
    files: BTreeMap<String, File>,
}

impl Extractor {
    fn path_for(&self, block: &str) -> Result<PathBuf, AnalyzeError> {
        let rel = Path::new(block.trim_start_matches('/'));
        let ok = !block.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(AnalyzeError::UnsafeBlockName(block.to_string()));
        }
        Ok(self.dir.join(rel))
    }

    fn create(&mut self, block: &str, len: u64) -> Result<(), AnalyzeError> {
        let path = self.path_for(block)?;
        let ioerr = |source| AnalyzeError::Extract {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(ioerr)?;
        }
        // Read back too: XBZRLE pages are applied to what was extracted before.
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(ioerr)?;
        f.set_len(len).map_err(ioerr)?;
        self.files.insert(block.to_string(), f);
        Ok(())
    }

    /// Reads back what was extracted of `block` at `addr` (zeros where nothing was).
    fn read(&mut self, block: &str, addr: u64, buf: &mut [u8]) -> Result<(), AnalyzeError> {
        use std::io::Read as _;
        let Some(f) = self.files.get_mut(block) else {
            return Ok(());
        };
        let r = f
            .seek(SeekFrom::Start(addr))
            .and_then(|_| f.read_exact(buf));
        r.map_err(|source| AnalyzeError::Extract {
            path: block.to_string(),
            source,
        })
    }

    fn write(&mut self, block: &str, addr: u64, data: &[u8]) -> Result<(), AnalyzeError> {
        let Some(f) = self.files.get_mut(block) else {
            return Ok(());
        };
        let r = f
            .seek(SeekFrom::Start(addr))
            .and_then(|_| f.write_all(data));
        r.map_err(|source| AnalyzeError::Extract {
            path: block.to_string(),
            source,
        })
    }
}

/// Fills `page` from a page as [`hex_bytes`] printed it, or with the fill byte of a
/// `Filled with` entry (pages the dump could not give stay zero).
fn unhex_into(h: &str, page: &mut [u8]) {
    if let Some(fill) = h.strip_prefix("Filled with 0x") {
        let v = match fill.strip_prefix('-') {
            Some(neg) => u8::from_str_radix(neg, 16).map(u8::wrapping_neg),
            None => u8::from_str_radix(fill, 16),
        };
        page.fill(v.unwrap_or(0));
        return;
    }
    for (b, x) in page.iter_mut().zip(h.split(' ')) {
        *b = u8::from_str_radix(x, 16).unwrap_or(0);
    }
}

/// `Filled with 0x%02x` of a fill byte read as signed, exactly as the Python script prints it.
fn filled_with(fill: u8) -> String {
    #[allow(clippy::cast_possible_wrap)]
    let v = fill as i8;
    if v < 0 {
        format!("Filled with 0x-{:x}", -i16::from(v))
    } else {
        format!("Filled with 0x{v:02x}")
    }
}

/// The name of RAM block `i` as the reader announced it.
fn block_name<R: Read>(r: &StreamReader<R>, i: usize) -> String {
    r.ram_blocks()
        .get(i)
        .map(|b| b.idstr.clone())
        .unwrap_or_default()
}

/// Reads a whole stream and gathers the analysis. Stream errors do not fail the call: what
/// was decoded is returned with [`Analysis::error`] set.
pub fn analyze<R: Read>(src: R, opts: &AnalyzeOptions) -> Result<Analysis, AnalyzeError> {
    analyze_stream(StreamReader::new(src), opts)
}

/// [`analyze`] over a stream reader set up by the caller: with
/// [`StreamReader::new_seekable`], page bodies are seeked over unless `-m`/`-x` need them,
/// which is what makes the default `--dump state` fast on multi-GiB streams.
pub fn analyze_stream<R: Read>(
    mut r: StreamReader<R>,
    opts: &AnalyzeOptions,
) -> Result<Analysis, AnalyzeError> {
    let mut a = Analysis::default();
    if let Some(ps) = opts.page_size {
        if let Err(e) = r.set_page_size(ps) {
            a.error = Some(e);
            return Ok(a);
        }
    }
    let mut order: Vec<(u32, String, Pending)> = Vec::new();
    let mut bodies: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut extractor = opts.extract_dir.as_ref().map(|d| Extractor {
        dir: d.clone(),
        files: BTreeMap::new(),
    });
    let mut vmdesc_bytes: Option<(u64, Vec<u8>)> = None;
    let mut open_row: Option<usize> = None;
    let mut kept = 0usize;
    let mut current_id: u32 = 0;
    // The page an XBZRLE record applies to.
    let mut xpage: Vec<u8> = Vec::new();
    // Reader block index → index in a.ram_blocks.
    let mut stats_of: Vec<usize> = Vec::new();
    loop {
        let ev = match r.next_item() {
            Ok(Item::Other(ev)) => ev,
            Ok(Item::Ram { header, .. }) => {
                let Some((_, _, Pending::Ram(sizes, memory))) =
                    order.iter_mut().find(|(id, ..)| *id == current_id)
                else {
                    continue;
                };
                match header {
                    RamHeader::MemSize { .. } => {
                        stats_of.clear();
                        for b in r.ram_blocks() {
                            sizes.insert(
                                b.idstr.clone(),
                                Json::from(format!("0x{:016x}", b.used_length)),
                            );
                            if let Some(x) = extractor.as_mut() {
                                x.create(&b.idstr, b.used_length)?;
                            }
                            let i = match a.ram_blocks.iter().position(|(n, _)| n == &b.idstr) {
                                Some(i) => i,
                                None => {
                                    a.ram_blocks.push((b.idstr.clone(), BlockStats::default()));
                                    a.ram_blocks.len() - 1
                                }
                            };
                            a.ram_blocks[i].1.used_length = b.used_length;
                            stats_of.push(i);
                        }
                    }
                    RamHeader::Zero {
                        block, addr, fill, ..
                    } => {
                        if let Some(&i) = stats_of.get(block) {
                            a.ram_blocks[i].1.zero_pages += 1;
                        }
                        if memory.is_some() || (fill != 0 && extractor.is_some()) {
                            let name = block_name(&r, block);
                            if let Some(m) = memory {
                                m.insert(
                                    format!("{name} (0x{addr:016x})"),
                                    Json::from(filled_with(fill)),
                                );
                            }
                            if let (Some(x), true) = (extractor.as_mut(), fill != 0) {
                                let page = vec![fill; r.page_size() as usize];
                                x.write(&name, addr, &page)?;
                            }
                        }
                    }
                    RamHeader::Page { block, addr, .. } => {
                        if let Some(&i) = stats_of.get(block) {
                            let st = &mut a.ram_blocks[i].1;
                            st.pages += 1;
                            if let Some(len) = r.page_compressed_len() {
                                st.lz4_pages += 1;
                                st.lz4_bytes += len;
                            }
                            if let Some(len) = r.page_xbzrle_len() {
                                st.xbzrle_pages += 1;
                                st.xbzrle_bytes += len;
                            }
                        }
                        if memory.is_some() || extractor.is_some() {
                            let name = block_name(&r, block);
                            let got = if r.page_xbzrle_len().is_some() {
                                // A delta: applied to the page as extracted or dumped so far
                                // (zero if it was never sent, as on a fresh destination).
                                xpage.clear();
                                xpage.resize(r.page_size() as usize, 0);
                                if let Some(x) = extractor.as_mut() {
                                    x.read(&name, addr, &mut xpage)?;
                                } else if let Some(Json::String(h)) = memory
                                    .as_ref()
                                    .and_then(|m| m.get(&format!("{name} (0x{addr:016x})")))
                                {
                                    unhex_into(h, &mut xpage);
                                }
                                r.read_page_into(&mut xpage).map(|()| &xpage[..])
                            } else {
                                r.page_data()
                            };
                            let data = match got {
                                Ok(d) => d,
                                Err(e) => {
                                    a.error = Some(e);
                                    break;
                                }
                            };
                            if let Some(m) = memory {
                                m.insert(
                                    format!("{name} (0x{addr:016x})"),
                                    Json::from(hex_bytes(data)),
                                );
                            }
                            if let Some(x) = extractor.as_mut() {
                                x.write(&name, addr, data)?;
                            }
                        }
                    }
                    RamHeader::MultifdFlush | RamHeader::Eos => {}
                }
                continue;
            }
            Err(e) => {
                a.error = Some(e);
                break;
            }
        };
        match ev {
            Event::Header { .. } => {}
            Event::Configuration { offset, value } => {
                let name = configuration_name(&value);
                a.rows.push(SectionRow {
                    offset,
                    kind: SectionType::Configuration.name(),
                    section_id: None,
                    idstr: name.clone(),
                    instance_id: None,
                    version_id: None,
                    size: r.position() - offset,
                });
                a.machine = Some(name);
                a.capabilities = configuration_capabilities(&value);
            }
            Event::Section { offset, kind, info } => {
                current_id = info.section_id;
                a.rows.push(SectionRow {
                    offset,
                    kind: kind.name(),
                    section_id: Some(info.section_id),
                    idstr: info.idstr.clone(),
                    instance_id: Some(info.instance_id),
                    version_id: Some(info.version_id),
                    size: 0,
                });
                open_row = Some(a.rows.len() - 1);
                if matches!(kind, SectionType::Start | SectionType::Full) {
                    let key = format!("{} ({})", info.idstr, info.section_id);
                    let pending = if info.is_ram() {
                        Pending::Ram(Map::new(), opts.memory.then(Map::new))
                    } else {
                        Pending::Device(usize::MAX)
                    };
                    if let Some(slot) = order.iter_mut().find(|(id, ..)| *id == info.section_id) {
                        slot.1 = key;
                        slot.2 = pending;
                    } else {
                        order.push((info.section_id, key, pending));
                    }
                }
            }
            Event::Ram { .. } => {}
            Event::Device { .. } => {}
            Event::RawBody { offset, bytes } => {
                // Device bodies wait for the vmdesc at the end; keep at most MAX_KEPT bytes.
                kept += bytes.len();
                if kept > MAX_KEPT {
                    a.warnings.push(format!(
                        "device body at {offset:#x} not kept: more than {MAX_KEPT:#x} bytes of device state"
                    ));
                    continue;
                }
                if let Some((_, _, Pending::Device(slot))) =
                    order.iter_mut().find(|(id, ..)| *id == current_id)
                {
                    *slot = bodies.len();
                }
                bodies.push((offset, bytes));
            }
            Event::Footer { .. } => {
                if let Some(i) = open_row.take() {
                    a.rows[i].size = r.position() - a.rows[i].offset;
                }
            }
            Event::Command { offset, name, .. } => a.rows.push(SectionRow {
                offset,
                kind: SectionType::Command.name(),
                section_id: None,
                idstr: name.unwrap_or("unknown").to_string(),
                instance_id: None,
                version_id: None,
                size: r.position() - offset,
            }),
            Event::Eof { offset } => a.rows.push(SectionRow {
                offset,
                kind: SectionType::Eof.name(),
                section_id: None,
                idstr: String::new(),
                instance_id: None,
                version_id: None,
                size: 1,
            }),
            Event::VmDescription { offset, json } => {
                a.rows.push(SectionRow {
                    offset,
                    kind: SectionType::VmDescription.name(),
                    section_id: None,
                    idstr: String::new(),
                    instance_id: None,
                    version_id: None,
                    size: r.position() - offset,
                });
                vmdesc_bytes = Some((offset, json));
            }
            Event::End => break,
        }
    }
    a.bytes = r.position();
    a.page_size = r.page_size();

    let vmdesc = match vmdesc_bytes {
        Some((offset, bytes)) => match VmDesc::parse(&bytes) {
            Ok(d) => Some(d),
            Err(e) => {
                a.warnings
                    .push(format!("vmdesc at {offset:#x} is unusable: {e}"));
                None
            }
        },
        None => {
            a.warnings
                .push("no vmdesc in the stream: device sections are listed but not decoded".into());
            None
        }
    };
    if let Some(d) = &vmdesc {
        a.desc = Some(d.json.clone());
        if d.page_size != a.page_size && a.ram_blocks.iter().any(|(_, s)| s.pages > 0) {
            a.warnings.push(format!(
                "vmdesc page size {:#x} differs from the {:#x} used to decode RAM",
                d.page_size, a.page_size
            ));
        }
    }

    let mut state = Map::new();
    for (id, key, pending) in order {
        match pending {
            Pending::Ram(sizes, memory) => {
                let mut m = Map::new();
                m.insert("section sizes".into(), Json::Object(sizes));
                if let Some(mem) = memory {
                    m.insert("memory".into(), Json::Object(mem));
                }
                state.insert(key, Json::Object(m));
            }
            Pending::Device(slot) => {
                let Some((at, bytes)) = bodies.get(slot) else {
                    continue;
                };
                let idstr = key.rsplit_once(" (").map_or(key.as_str(), |(n, _)| n);
                let instance = a
                    .rows
                    .iter()
                    .find(|r| r.section_id == Some(id) && r.instance_id.is_some())
                    .and_then(|r| r.instance_id)
                    .unwrap_or(0);
                let value = match vmdesc.as_ref().and_then(|d| d.device(idstr, instance)) {
                    Some(dev) => match decode_body(bytes, &dev.vmsd, *at) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            a.warnings
                                .push(format!("section '{idstr}' (id {id:#x}): {e}"));
                            None
                        }
                    },
                    None => {
                        if vmdesc.is_some() {
                            a.warnings.push(format!(
                                "section '{idstr}' (id {id:#x}) is not in the vmdesc"
                            ));
                        }
                        None
                    }
                };
                if let Some(v) = &value {
                    state.insert(key.clone(), v.to_analyze_json());
                }
                a.devices.push(DeviceRow {
                    section_id: id,
                    idstr: idstr.to_string(),
                    instance_id: instance,
                    value,
                });
            }
        }
    }
    a.state = Json::Object(state);

    if let Some(x) = &extractor {
        let write = |name: &str, j: &Json| {
            let path = x.dir.join(name);
            fs::write(&path, to_python_json(j)).map_err(|source| AnalyzeError::Extract {
                path: path.display().to_string(),
                source,
            })
        };
        if let Some(d) = &a.desc {
            write("desc.json", d)?;
        }
        write("state.json", &a.state)?;
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_bytes_print_like_python() {
        assert_eq!(filled_with(0), "Filled with 0x00");
        assert_eq!(filled_with(0x7f), "Filled with 0x7f");
        assert_eq!(filled_with(0xff), "Filled with 0x-1");
        assert_eq!(filled_with(0x80), "Filled with 0x-80");
    }

    #[test]
    fn garbage_reports_error_not_panic() {
        let a = analyze(&b"QEVM\0\0\0\x03\x42"[..], &AnalyzeOptions::default()).unwrap();
        let e = a.error.unwrap();
        assert_eq!(e.offset, 8);
        assert!(e.to_string().contains("0x42"), "{e}");
    }
}
