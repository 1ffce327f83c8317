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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::devices::{ControlState, DeviceStates, PvBlockState, SerialState};
    use crate::vmm::vcpu::VcpuState;
    use crate::vmm::vm::VmArchState;
    use kvm_bindings::kvm_msr_entry;

    fn state(vcpus: usize, drives: usize) -> VmState {
        let vcpu = |i: usize| {
            let mut v = VcpuState {
                regs: Default::default(),
                sregs: Default::default(),
                fpu: Default::default(),
                xsave: (0..1024u32).collect(),
                xcrs: Default::default(),
                msrs: vec![kvm_msr_entry {
                    index: 0x10,
                    data: 0x1234_5678_9abc + i as u64,
                    ..Default::default()
                }],
                lapic: Default::default(),
                events: Default::default(),
                mp_state: Default::default(),
                debug_regs: Default::default(),
                tsc_khz: 2_250_000,
            };
            v.regs.rip = 0x10217 + i as u64;
            v.regs.r15 = 0xfeed;
            v.sregs.cr3 = 0x8000;
            v.sregs.efer = 0x500;
            v.lapic.regs[0x20] = i as _;
            v
        };
        let mut arch = VmArchState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        };
        arch.clock.clock = 1_234_567_890;
        arch.pit.channels[0].count = 11932;
        VmState {
            vcpus: (0..vcpus).map(vcpu).collect(),
            arch,
            devices: DeviceStates {
                serial: SerialState {
                    scr: 0x5a,
                    ..Default::default()
                },
                blocks: (0..drives)
                    .map(|i| PvBlockState {
                        sector: i as u64 + 1,
                        ..Default::default()
                    })
                    .collect(),
                control: ControlState {
                    check_requested: true,
                    fault: 0,
                },
            },
        }
    }

    #[test]
    fn state_and_ram_round_trip() {
        let st = state(2, 1);
        let mut ram = vec![0u8; 1 << 20];
        ram[0x10000..0x10004].copy_from_slice(b"tick");
        ram[0xfffff] = 7;
        let mut stream = Vec::new();
        let len = write_state(&st, &ram, &mut stream).unwrap();
        assert_eq!(len, stream.len() as u64);
        let mut back_ram = vec![0u8; 1 << 20];
        let back = read_state(2, 1, &mut back_ram, &mut stream.as_slice()).unwrap();
        assert!(back_ram == ram);
        assert_eq!(back.vcpus, st.vcpus);
        assert_eq!(back.devices, st.devices);
        assert_eq!(back.arch.clock.clock, 1_234_567_890);
        assert_eq!({ back.arch.pit.channels[0].count }, 11932);
    }

    #[test]
    fn another_configuration_is_refused() {
        let mut stream = Vec::new();
        write_state(&state(1, 1), &vec![0u8; 1 << 20], &mut stream).unwrap();
        let mut ram = vec![0u8; 1 << 20];
        let err = read_state(2, 1, &mut ram, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("'cpu' instance 1"), "{err}");
        let err = read_state(1, 0, &mut ram, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("vmsnap-pvblock"), "{err}");
        let mut small = vec![0u8; 1 << 19];
        let err = read_state(1, 1, &mut small, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("Length mismatch"), "{err}");
    }

    #[test]
    fn a_truncated_stream_is_refused() {
        let mut stream = Vec::new();
        write_state(&state(1, 1), &vec![0u8; 1 << 20], &mut stream).unwrap();
        stream.truncate(stream.len() / 2);
        let mut ram = vec![0u8; 1 << 20];
        assert!(read_state(1, 1, &mut ram, &mut stream.as_slice()).is_err());
    }
}
