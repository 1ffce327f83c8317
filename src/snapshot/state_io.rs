//! The VM's state as one migration stream: registry of the VM's sections (RAM first, then
//! every device), written with `save_state` and read back with `load_state`.

use std::io::{Read, Write};

use crate::migration::ram_state::RamState;
use crate::migration::savevm::{load_state, save_state, DeviceState, Registry};
use crate::migration::stream::StreamError;
use crate::migration::Value;
use crate::vmm::vmstate::{self, VmStateMapError};
use crate::vmm::VmState;

/// Name of the single RAM block (QEMU's PC machines call theirs `pc.ram`).
pub const RAM_BLOCK: &str = "pc.ram";
/// Target page size of our streams.
pub const PAGE_SIZE: u64 = 4096;

/// Errors reading a VM state stream.
#[derive(Debug, thiserror::Error)]
pub enum StateIoError {
    /// The stream could not be written or parsed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Writing to or reading from the disk failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The sections do not make up this VM's state.
    #[error(transparent)]
    Map(#[from] VmStateMapError),
}

/// One device's decoded or to-be-encoded value.
#[derive(Debug, Default)]
struct Slot(Option<Value>);

impl DeviceState for Slot {
    fn save(&self) -> Value {
        self.0.clone().unwrap_or(Value::Struct(Vec::new()))
    }

    fn load(&mut self, value: &Value, _version_id: u32) -> Result<(), String> {
        self.0 = Some(value.clone());
        Ok(())
    }
}

/// Writes `state` and `ram` as a stream to `out`; returns its length.
pub fn write_state(state: &VmState, ram: &[u8], out: &mut dyn Write) -> Result<u64, StateIoError> {
    let sections = vmstate::to_sections(state);
    let mut slots: Vec<Slot> = sections
        .iter()
        .map(|s| Slot(Some(s.value.clone())))
        .collect();
    let mut ram_state = RamState::for_save(vec![(RAM_BLOCK.to_string(), ram)], PAGE_SIZE);
    let mut reg = Registry::new(vmstate::MACHINE);
    reg.page_size = PAGE_SIZE;
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut ram_state);
    for (s, slot) in sections.iter().zip(slots.iter_mut()) {
        reg.register_device(s.idstr, s.instance_id, s.vmsd.clone(), slot);
    }
    Ok(save_state(&mut reg, out)?)
}

/// Reads a stream for a VM with `vcpus` vCPUs and `drives` drives: RAM into `ram` (which
/// must be zeroed: pages absent from the stream stay as they are), devices into the returned
/// state.
pub fn read_state(
    vcpus: usize,
    drives: usize,
    ram: &mut [u8],
    input: &mut dyn Read,
) -> Result<VmState, StateIoError> {
    let layout = vmstate::layout(vcpus, drives);
    let mut slots: Vec<Slot> = layout.iter().map(|_| Slot::default()).collect();
    {
        let mut ram_state = RamState::for_load(vec![(RAM_BLOCK.to_string(), ram)], PAGE_SIZE);
        let mut reg = Registry::new(vmstate::MACHINE);
        reg.page_size = PAGE_SIZE;
        reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut ram_state);
        for ((idstr, inst, vmsd), slot) in layout.iter().zip(slots.iter_mut()) {
            reg.register_device(idstr, *inst, vmsd.clone(), slot);
        }
        load_state(&mut reg, input)?;
    }
    let found = |idstr: &str, inst: u32| {
        layout
            .iter()
            .zip(&slots)
            .find(|((n, i, _), _)| *n == idstr && *i == inst)
            .and_then(|(_, s)| s.0.as_ref())
    };
    Ok(vmstate::from_sections(vcpus, drives, found)?)
}
