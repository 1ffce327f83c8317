//! `save_state` / `load_state`: QEMU's `qemu_savevm_state` and `qemu_loadvm_state` over a
//! registry of save-state entries.
//!
//! Saving: header → configuration → every iterative entry's setup (START) → iterate rounds
//! (PART) until all are done → completion (END) → every device as a FULL section → EOF →
//! vmdesc JSON. Each section is followed by its footer. Loading checks the configuration,
//! that every section is known, versions, and footers.
//!
//! A device registers its description and converts its state to and from [`Value`]:
//!
//! ```
//! use std::sync::Arc;
//! use vmsnap::migration::ram_state::RamState;
//! use vmsnap::migration::savevm::{load_state, save_state, DeviceState, Registry};
//! use vmsnap::migration::{Field, VMStateDescription, Value};
//!
//! struct Uart { lcr: u8 }
//! impl DeviceState for Uart {
//!     fn save(&self) -> Value {
//!         Value::structure([("lcr", Value::u8(self.lcr))])
//!     }
//!     fn load(&mut self, v: &Value, _version: u32) -> Result<(), String> {
//!         self.lcr = v.get("lcr").and_then(Value::as_u64).ok_or("no lcr")? as u8;
//!         Ok(())
//!     }
//! }
//! let vmsd = Arc::new(VMStateDescription::new("serial", 3, 2).field(Field::uint("lcr", 1)));
//! let memory = vec![1u8; 2 * 4096];
//!
//! let mut stream = Vec::new();
//! let (mut uart, mut ram) = (Uart { lcr: 3 }, RamState::for_save(vec![("pc.ram".into(), &memory[..])], 4096));
//! let mut reg = Registry::new("my-machine");
//! reg.register_iterative("ram", 0, 4, &mut ram);
//! reg.register_device("serial", 0, vmsd.clone(), &mut uart);
//! save_state(&mut reg, &mut stream).unwrap();
//!
//! let mut restored = vec![0u8; 2 * 4096];
//! let mut uart2 = Uart { lcr: 0 };
//! let mut ram = RamState::for_load(vec![("pc.ram".into(), &mut restored[..])], 4096);
//! let mut reg = Registry::new("my-machine");
//! reg.register_iterative("ram", 0, 4, &mut ram);
//! reg.register_device("serial", 0, vmsd, &mut uart2);
//! load_state(&mut reg, &mut &stream[..]).unwrap();
//! drop(reg);
//! assert_eq!((uart2.lcr, restored), (3, memory));
//! ```

use std::io::{Read, Write};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use super::configuration::{configuration_capabilities, configuration_value_with_capabilities};
use super::protocol::SectionType;
use super::qemu_file::QemuFileWriter;
use super::stream::{
    configuration_name, Decoder, ErrorKind, Event, Result, SectionInfo, StreamError, StreamReader,
    StreamWriter,
};
use super::value::Value;
use super::vmdesc::to_qemu_json;
use super::vmstate::VMStateDescription;

/// The writer handlers write into.
pub type Sink<'w> = QemuFileWriter<&'w mut dyn Write>;
/// The reader handlers read from.
pub type Source<'r> = StreamReader<&'r mut dyn Read>;

/// State saved in several passes (RAM): QEMU's `SaveVMHandlers`.
pub trait IterativeState {
    /// Writes the START section body.
    fn save_setup(&mut self, f: &mut Sink<'_>) -> std::result::Result<(), String>;
    /// Writes one PART section body; returns true when nothing is left to send.
    fn save_iterate(&mut self, f: &mut Sink<'_>) -> std::result::Result<bool, String>;
    /// Writes the END section body.
    fn save_complete(&mut self, f: &mut Sink<'_>) -> std::result::Result<(), String>;
    /// Reads one START/PART/END section body (the reader is positioned after its header).
    fn load(&mut self, r: &mut Source<'_>) -> Result<()>;
}

/// A device's state, converted to and from the generic value model.
pub trait DeviceState {
    /// The current state.
    fn save(&self) -> Value;
    /// Applies a decoded state sent at `version_id`.
    fn load(&mut self, value: &Value, version_id: u32) -> std::result::Result<(), String>;
}

/// How an entry's state is saved.
pub enum Handler<'a> {
    /// Iterative (RAM-like) state.
    Iterative(&'a mut dyn IterativeState),
    /// Device state described by a VMState description.
    Device {
        /// The description.
        vmsd: Arc<VMStateDescription>,
        /// The device.
        state: &'a mut dyn DeviceState,
    },
}

impl std::fmt::Debug for Handler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handler::Iterative(_) => f.write_str("Iterative"),
            Handler::Device { vmsd, .. } => write!(f, "Device({})", vmsd.name),
        }
    }
}

/// QEMU's `SaveStateEntry`.
#[derive(Debug)]
pub struct SaveStateEntry<'a> {
    /// Section idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version written (for devices, the description's version_id).
    pub version_id: u32,
    /// Section id in streams we write (registration order).
    pub section_id: u32,
    /// The handler.
    pub handler: Handler<'a>,
}

/// The entries of one VM, in registration order.
#[derive(Debug, Default)]
pub struct Registry<'a> {
    entries: Vec<SaveStateEntry<'a>>,
    /// Machine name sent in the configuration section and checked on load.
    pub machine: String,
    /// Target page size written to the vmdesc and used for RAM.
    pub page_size: u64,
    capabilities: Vec<String>,
}

impl<'a> Registry<'a> {
    /// An empty registry for `machine` with 4 KiB pages.
    pub fn new(machine: &str) -> Self {
        Registry {
            entries: Vec::new(),
            machine: machine.to_string(),
            page_size: 4096,
            capabilities: Vec::new(),
        }
    }

    /// Announces a capability in the configuration section of streams saved from this
    /// registry (e.g. [`super::ram::LZ4_CAPABILITY`], together with
    /// [`super::ram_state::RamState::set_lz4`]). None by default: the configuration is then
    /// exactly QEMU's.
    pub fn add_capability(&mut self, name: &str) {
        if !self.capabilities.iter().any(|c| c == name) {
            self.capabilities.push(name.to_string());
        }
    }

    /// The capabilities announced when saving.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    fn push(&mut self, idstr: &str, instance_id: u32, version_id: u32, handler: Handler<'a>) {
        let section_id = self.entries.len() as u32;
        self.entries.push(SaveStateEntry {
            idstr: idstr.to_string(),
            instance_id,
            version_id,
            section_id,
            handler,
        });
    }

    /// Registers iterative state (QEMU: `register_savevm_live`).
    pub fn register_iterative(
        &mut self,
        idstr: &str,
        instance_id: u32,
        version_id: u32,
        state: &'a mut dyn IterativeState,
    ) {
        self.push(idstr, instance_id, version_id, Handler::Iterative(state));
    }

    /// Registers a device (QEMU: `vmstate_register`).
    pub fn register_device(
        &mut self,
        idstr: &str,
        instance_id: u32,
        vmsd: Arc<VMStateDescription>,
        state: &'a mut dyn DeviceState,
    ) {
        let v = vmsd.version_id;
        self.push(idstr, instance_id, v, Handler::Device { vmsd, state });
    }

    /// The entries.
    pub fn entries(&self) -> &[SaveStateEntry<'a>] {
        &self.entries
    }
}

fn info(e: &SaveStateEntry<'_>) -> SectionInfo {
    SectionInfo {
        section_id: e.section_id,
        idstr: e.idstr.clone(),
        instance_id: e.instance_id,
        version_id: e.version_id,
    }
}

pub(crate) fn handler_err(at: u64, idstr: &str, message: String) -> StreamError {
    StreamError {
        offset: at,
        section: Some(format!("'{idstr}'")),
        kind: Box::new(ErrorKind::Handler {
            idstr: idstr.to_string(),
            message,
        }),
    }
}

/// Writes the whole VM state as one stream (setup, iterate until done, complete); returns
/// its length in bytes. This is what savevm does with the VM stopped.
pub fn save_state(reg: &mut Registry<'_>, out: &mut dyn Write) -> Result<u64> {
    let mut session = SaveSession::begin(reg, out)?;
    while !session.iterate()? {}
    session.complete()
}

/// The steps of `qemu_savevm_state`, for callers that interleave them with running the guest
/// (live migration): [`SaveSession::begin`] → [`SaveSession::iterate`] until it returns true
/// (or the caller decides to stop) → [`SaveSession::complete`].
pub struct SaveSession<'r, 'a, 'w> {
    reg: &'r mut Registry<'a>,
    w: StreamWriter<&'w mut dyn Write>,
    pending: Vec<bool>,
}

impl std::fmt::Debug for SaveSession<'_, '_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveSession")
            .field("position", &self.w.f.position())
            .field("pending", &self.pending)
            .finish()
    }
}

impl<'r, 'a, 'w> SaveSession<'r, 'a, 'w> {
    /// Writes the header, the configuration and every iterative entry's setup (START).
    pub fn begin(reg: &'r mut Registry<'a>, out: &'w mut dyn Write) -> Result<Self> {
        let mut w = StreamWriter::new(out);
        w.write_header()?;
        w.write_configuration(&configuration_value_with_capabilities(
            &reg.machine,
            &reg.capabilities,
        ))?;
        for e in reg.entries.iter_mut() {
            let inf = info(e);
            if let Handler::Iterative(h) = &mut e.handler {
                w.write_section_header(SectionType::Start, &inf)?;
                let at = w.f.position();
                h.save_setup(&mut w.f)
                    .map_err(|m| handler_err(at, &inf.idstr, m))?;
                w.write_footer(inf.section_id)?;
            }
        }
        let pending = reg
            .entries
            .iter()
            .map(|e| matches!(e.handler, Handler::Iterative(_)))
            .collect();
        Ok(SaveSession { reg, w, pending })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.w.f.position()
    }

    /// One round: a PART section for every iterative entry (QEMU's
    /// `qemu_savevm_state_iterate`). Returns true when every entry reported in this round that
    /// nothing is left. An entry that was done once is asked again: while the guest runs (live
    /// migration) it can have new dirty pages; with the guest stopped (savevm) the first round
    /// in which all are done ends the loop.
    pub fn iterate(&mut self) -> Result<bool> {
        for (e, p) in self.reg.entries.iter_mut().zip(self.pending.iter_mut()) {
            let inf = info(e);
            if let Handler::Iterative(h) = &mut e.handler {
                self.w.write_section_header(SectionType::Part, &inf)?;
                let at = self.w.f.position();
                let done = h
                    .save_iterate(&mut self.w.f)
                    .map_err(|m| handler_err(at, &inf.idstr, m))?;
                self.w.write_footer(inf.section_id)?;
                *p = !done;
            }
        }
        Ok(!self.pending.iter().any(|p| *p))
    }

    /// END sections for the iterative entries, every device as FULL, EOF and the vmdesc;
    /// flushes and returns the stream length.
    pub fn complete(mut self) -> Result<u64> {
        let w = &mut self.w;
        for e in self.reg.entries.iter_mut() {
            let inf = info(e);
            if let Handler::Iterative(h) = &mut e.handler {
                w.write_section_header(SectionType::End, &inf)?;
                let at = w.f.position();
                h.save_complete(&mut w.f)
                    .map_err(|m| handler_err(at, &inf.idstr, m))?;
                w.write_footer(inf.section_id)?;
            }
        }
        let mut devices = Vec::new();
        for e in self.reg.entries.iter_mut() {
            let inf = info(e);
            if let Handler::Device { vmsd, state } = &mut e.handler {
                let mut obj = Map::new();
                obj.insert("name".into(), Json::from(inf.idstr.clone()));
                obj.insert("instance_id".into(), Json::from(inf.instance_id));
                w.write_section_header(SectionType::Full, &inf)?;
                let at = w.f.position();
                vmsd.encode(&mut w.f, &state.save(), Some(&mut obj))
                    .map_err(|err| StreamError {
                        offset: at,
                        section: Some(inf.label()),
                        kind: Box::new(err.into()),
                    })?;
                w.write_footer(inf.section_id)?;
                devices.push(Json::Object(obj));
            }
        }
        w.write_eof()?;
        let mut desc = Map::new();
        desc.insert("page_size".into(), Json::from(self.reg.page_size));
        desc.insert("devices".into(), Json::Array(devices));
        w.write_vmdesc(&to_qemu_json(&Json::Object(desc)))?;
        let len = w.f.position();
        self.w.finish()?;
        Ok(len)
    }
}

/// Capabilities a stream may announce and still be loaded: QEMU's `x-ignore-shared` (the
/// block list carries addresses; shared blocks are simply not sent) and vmsnap's LZ4 pages.
const LOADABLE_CAPABILITIES: &[&str] = &["x-ignore-shared", super::ram::LZ4_CAPABILITY];

/// Refuses a stream announcing a capability we cannot honour, as QEMU does ("Received unknown
/// capability"): it changes the format of what follows.
fn check_capabilities(value: &Value, offset: u64) -> Result<()> {
    for cap in configuration_capabilities(value) {
        if !LOADABLE_CAPABILITIES.contains(&cap.as_str()) {
            return Err(StreamError {
                offset,
                section: None,
                kind: Box::new(ErrorKind::UnknownCapability(cap)),
            });
        }
    }
    Ok(())
}

/// Reads a stream into the registered entries (QEMU's `qemu_loadvm_state`).
pub fn load_state(reg: &mut Registry<'_>, input: &mut dyn Read) -> Result<()> {
    let mut r: Source<'_> = StreamReader::new(input);
    r.set_page_size(reg.page_size)?;
    for e in &reg.entries {
        if let Handler::Device { vmsd, .. } = &e.handler {
            r.add_decoder(
                &e.idstr,
                e.instance_id,
                Decoder {
                    vmsd: vmsd.clone(),
                    check_version: true,
                },
            );
        }
    }
    loop {
        let at = r.position();
        match r.next_event()? {
            Event::Header { .. } => {}
            Event::Configuration { value, offset } => {
                let found = configuration_name(&value);
                if found != reg.machine {
                    return Err(StreamError {
                        offset,
                        section: None,
                        kind: Box::new(ErrorKind::ConfigurationMismatch {
                            expected: reg.machine.clone(),
                            found,
                        }),
                    });
                }
                check_capabilities(&value, offset)?;
            }
            Event::Section { offset, kind, info } => {
                let Some(e) = reg
                    .entries
                    .iter_mut()
                    .find(|e| e.idstr == info.idstr && e.instance_id == info.instance_id)
                else {
                    return Err(StreamError {
                        offset,
                        section: Some(info.label()),
                        kind: Box::new(ErrorKind::UnknownSection {
                            idstr: info.idstr.clone(),
                            instance_id: info.instance_id,
                        }),
                    });
                };
                if matches!(kind, SectionType::Start | SectionType::Full)
                    && info.version_id > e.version_id
                {
                    return Err(StreamError {
                        offset,
                        section: Some(info.label()),
                        kind: Box::new(ErrorKind::VmState(
                            super::vmstate::VmStateError::VersionTooNew {
                                vmsd: info.idstr.clone(),
                                version: info.version_id,
                                max: e.version_id,
                            },
                        )),
                    });
                }
                match &mut e.handler {
                    Handler::Iterative(h) => h.load(&mut r)?,
                    Handler::Device { state, .. } => {
                        let body_at = r.position();
                        match r.next_event()? {
                            Event::Device { value, .. } => state
                                .load(&value, info.version_id)
                                .map_err(|m| handler_err(body_at, &info.idstr, m))?,
                            other => {
                                return Err(handler_err(
                                    body_at,
                                    &info.idstr,
                                    format!("unexpected record {other:?}"),
                                ))
                            }
                        }
                    }
                }
                let foot_at = r.position();
                match r.next_event()? {
                    Event::Footer { .. } => {}
                    other => {
                        return Err(StreamError {
                            offset: foot_at,
                            section: Some(info.label()),
                            kind: Box::new(ErrorKind::MissingFooter {
                                idstr: info.idstr.clone(),
                                found: other.name(),
                            }),
                        })
                    }
                }
            }
            Event::Footer { offset, .. } => {
                return Err(StreamError {
                    offset,
                    section: None,
                    kind: Box::new(ErrorKind::UnexpectedRecord("FOOTER")),
                })
            }
            Event::Command { .. } => {}
            Event::Eof { .. } => {}
            Event::VmDescription { .. } | Event::End => return Ok(()),
            Event::Ram { .. } | Event::Device { .. } | Event::RawBody { .. } => {
                return Err(StreamError {
                    offset: at,
                    section: None,
                    kind: Box::new(ErrorKind::UnexpectedRecord("section body")),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::ram_state::RamState;
    use crate::migration::vmstate::Field;

    struct Counter(Value);
    impl DeviceState for Counter {
        fn save(&self) -> Value {
            self.0.clone()
        }
        fn load(&mut self, v: &Value, version: u32) -> std::result::Result<(), String> {
            if version != 2 {
                return Err(format!("version {version}"));
            }
            self.0 = v.clone();
            Ok(())
        }
    }

    fn vmsd() -> Arc<VMStateDescription> {
        Arc::new(VMStateDescription::new("counter", 2, 1).field(Field::uint("n", 4)))
    }

    #[test]
    fn save_then_load_ram_and_device() {
        let ram: Vec<u8> = (0..3 * 4096).map(|i| (i / 4096) as u8).collect();
        let mut out = Vec::new();
        {
            let mut mem = RamState::for_save(vec![("pc.ram".into(), &ram[..])], 4096);
            let mut dev = Counter(Value::structure([("n", Value::u32(41))]));
            let mut reg = Registry::new("m");
            reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
            reg.register_device("counter", 0, vmsd(), &mut dev);
            assert_eq!(reg.entries()[1].section_id, 1);
            save_state(&mut reg, &mut out).unwrap();
        }
        // Page 0 is all zero and goes out as a ZERO record: two pages of data.
        assert!(
            out.len() > 2 * 4096 && out.len() < 3 * 4096,
            "{}",
            out.len()
        );
        assert!(
            String::from_utf8_lossy(&out[out.len() - 150..]).contains("\"vmsd_name\": \"counter\"")
        );

        let mut back = vec![0xeeu8; ram.len()];
        let mut dev = Counter(Value::Null);
        {
            let mut mem = RamState::for_load(vec![("pc.ram".into(), &mut back[..])], 4096);
            let mut reg = Registry::new("m");
            reg.register_iterative("ram", 0, 4, &mut mem);
            reg.register_device("counter", 0, vmsd(), &mut dev);
            load_state(&mut reg, &mut &out[..]).unwrap();
        }
        assert_eq!(back, ram);
        assert_eq!(dev.0.get("n"), Some(&Value::u32(41)));
    }

    #[test]
    fn session_steps_are_visible_to_the_caller() {
        let ram = vec![7u8; 3 * 4096];
        let mut out = Vec::new();
        let mut mem = RamState::for_save(vec![("r".into(), &ram[..])], 4096);
        mem.pages_per_round = 2;
        let mut reg = Registry::new("m");
        reg.register_iterative("ram", 0, 4, &mut mem);
        let mut s = SaveSession::begin(&mut reg, &mut out).unwrap();
        let after_setup = s.position();
        assert!(!s.iterate().unwrap());
        assert!(s.position() > after_setup + 2 * 4096);
        assert!(s.iterate().unwrap());
        let len = s.complete().unwrap();
        assert_eq!(len as usize, out.len());
    }

    #[test]
    fn ram_length_mismatch_is_refused() {
        let ram = vec![1u8; 2 * 4096];
        let mut out = Vec::new();
        {
            let mut mem = RamState::for_save(vec![("pc.ram".into(), &ram[..])], 4096);
            let mut reg = Registry::new("m");
            reg.register_iterative("ram", 0, 4, &mut mem);
            save_state(&mut reg, &mut out).unwrap();
        }
        let mut small = vec![0u8; 4096];
        let mut mem = RamState::for_load(vec![("pc.ram".into(), &mut small[..])], 4096);
        let mut reg = Registry::new("m");
        reg.register_iterative("ram", 0, 4, &mut mem);
        let e = load_state(&mut reg, &mut &out[..]).unwrap_err();
        assert!(
            e.to_string()
                .contains("Length mismatch: pc.ram: 0x2000 in != 0x1000"),
            "{e}"
        );
    }
}
