//! The VM's state as one migration stream: registry of the VM's sections (RAM first, then
//! every device), written with `save_state` and read back with `load_state`.

use std::io::{Read, Write};
use std::sync::Arc;

use crate::migration::ram_state::RamState;
use crate::migration::savevm::{load_state, DeviceState, IterativeState, Registry, SaveSession};
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

/// A `capture=on` drive's contents, as savevm puts them into the VM state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedDrive {
    /// Drive index (the section's instance id).
    pub index: usize,
    /// Drive name (`driveN`).
    pub name: String,
    /// The drive's contents.
    pub data: Vec<u8>,
}

/// A `capture=on` drive as loadvm expects it in the VM state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Drive index (the section's instance id).
    pub index: usize,
    /// Drive name (`driveN`).
    pub name: String,
    /// Drive size in bytes: the section's `size` must be this.
    pub size: u64,
}

/// Writes `state` and `ram` as a stream to `out`; returns its length.
pub fn write_state(state: &VmState, ram: &[u8], out: &mut dyn Write) -> Result<u64, StateIoError> {
    write_state_with(state, ram, &[], out)
}

/// [`write_state`] plus one `vmsnap-capture` section per captured drive, after the devices.
pub fn write_state_with(
    state: &VmState,
    ram: &[u8],
    captured: &[CapturedDrive],
    out: &mut dyn Write,
) -> Result<u64, StateIoError> {
    write_state_opts(state, ram, captured, false, out)
}

/// [`write_state_with`]; with `lz4`, RAM pages go out LZ4-compressed and the configuration
/// announces the `x-vmsnap-lz4` capability (QEMU cannot load such a state).
pub fn write_state_opts(
    state: &VmState,
    ram: &[u8],
    captured: &[CapturedDrive],
    lz4: bool,
    out: &mut dyn Write,
) -> Result<u64, StateIoError> {
    Ok(write_state_recorded(state, ram, captured, lz4, None, out)?.0)
}

/// Where the parts of a stream written by [`write_state_recorded`] are: what a lazy loadvm
/// reads to get the devices without the RAM pages in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLayout {
    /// End of the header, configuration and RAM setup (START) section.
    pub setup_end: u64,
    /// Start of the last RAM section (END), after which come the devices, EOF and vmdesc.
    pub ram_end_section: u64,
    /// Stream length.
    pub len: u64,
}

/// [`write_state_opts`], recording where every RAM page lands into `recorder` (see
/// [`crate::migration::page_index`]); also returns the stream's layout.
pub fn write_state_recorded(
    state: &VmState,
    ram: &[u8],
    captured: &[CapturedDrive],
    lz4: bool,
    recorder: Option<crate::migration::page_index::PageRecorder>,
    out: &mut dyn Write,
) -> Result<(u64, StreamLayout), StateIoError> {
    let sections = vmstate::to_sections(state);
    let mut slots: Vec<Slot> = sections
        .iter()
        .map(|s| Slot(Some(s.value.clone())))
        .collect();
    let mut capture_slots: Vec<Slot> = captured
        .iter()
        .map(|c| Slot(Some(vmstate::capture_value(&c.name, &c.data))))
        .collect();
    let mut ram_state = RamState::for_save(vec![(RAM_BLOCK.to_string(), ram)], PAGE_SIZE);
    ram_state.set_lz4(lz4);
    if let Some(r) = recorder {
        ram_state.set_recorder(r);
    }
    let mut reg = Registry::new(vmstate::MACHINE);
    reg.page_size = PAGE_SIZE;
    if lz4 {
        reg.add_capability(crate::migration::ram::LZ4_CAPABILITY);
    }
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut ram_state);
    for (s, slot) in sections.iter().zip(slots.iter_mut()) {
        reg.register_device(s.idstr, s.instance_id, s.vmsd.clone(), slot);
    }
    for (c, slot) in captured.iter().zip(capture_slots.iter_mut()) {
        let vmsd = Arc::new(vmstate::capture_vmsd(c.data.len() as u64));
        reg.register_device(vmstate::CAPTURE_IDSTR, instance(c.index), vmsd, slot);
    }
    // save_state's steps, noting where the RAM setup ends and the last RAM section starts.
    let mut session = SaveSession::begin(&mut reg, out)?;
    let setup_end = session.position();
    while !session.iterate()? {}
    let ram_end_section = session.position();
    let len = session.complete()?;
    Ok((
        len,
        StreamLayout {
            setup_end,
            ram_end_section,
            len,
        },
    ))
}

fn instance(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
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
    Ok(read_state_with(vcpus, drives, &[], ram, input)?.0)
}

/// [`read_state`] for a VM with captured drives. Returns the state and each captured
/// drive's saved contents, in the order of `captured`; a missing section or one of another
/// name or size is refused.
pub fn read_state_with(
    vcpus: usize,
    drives: usize,
    captured: &[CaptureSpec],
    ram: &mut [u8],
    input: &mut dyn Read,
) -> Result<(VmState, Vec<Vec<u8>>), StateIoError> {
    let mut ram_state = RamState::for_load(vec![(RAM_BLOCK.to_string(), ram)], PAGE_SIZE);
    load_with(vcpus, drives, captured, &mut ram_state, input)
}

/// What [`check_state_with`] found in a stream that fits the VM.
#[derive(Debug)]
pub struct CheckedState {
    /// The devices' state.
    pub state: VmState,
    /// Each captured drive's saved contents, in the order of the specs.
    pub captured: Vec<Vec<u8>>,
    /// True if the stream has every page of guest RAM (a page or a zero page); false if
    /// some page would keep its current contents on load.
    pub all_ram: bool,
}

/// Parses and checks a whole stream for a VM with `vcpus` vCPUs, `drives` drives, the
/// `captured` drives and `ram_len` bytes of RAM, exactly as [`read_state_with`] would load
/// it, without storing any RAM page (their data is skipped). A stream that passes loads
/// into the VM with [`read_state_with`] without a parse error.
pub fn check_state_with(
    vcpus: usize,
    drives: usize,
    captured: &[CaptureSpec],
    ram_len: u64,
    input: &mut dyn Read,
) -> Result<CheckedState, StateIoError> {
    let mut ram_state = RamState::for_check(vec![(RAM_BLOCK.to_string(), ram_len)], PAGE_SIZE);
    let (state, contents) = load_with(vcpus, drives, captured, &mut ram_state, input)?;
    Ok(CheckedState {
        state,
        captured: contents,
        all_ram: ram_state.all_pages_seen(),
    })
}

/// Loads a whole stream laid out as savevm writes it (devices of `vmstate::layout`, the
/// `captured` drives), its RAM section going to `ram_state` (the loadvm check, loadvm into
/// guest memory, or a live migration's incoming RAM).
pub(crate) fn load_with(
    vcpus: usize,
    drives: usize,
    captured: &[CaptureSpec],
    ram_state: &mut dyn IterativeState,
    input: &mut dyn Read,
) -> Result<(VmState, Vec<Vec<u8>>), StateIoError> {
    load_with_extra(vcpus, drives, captured, ram_state, None, input)
}

/// One more iterative section a stream may carry (idstr, version, handler): a live
/// migration's `vmsnap-block`.
pub(crate) type ExtraSection<'a> = (&'a str, u32, &'a mut dyn IterativeState);

/// [`load_with`], with `extra` registered after RAM.
pub(crate) fn load_with_extra(
    vcpus: usize,
    drives: usize,
    captured: &[CaptureSpec],
    ram_state: &mut dyn IterativeState,
    extra: Option<ExtraSection<'_>>,
    input: &mut dyn Read,
) -> Result<(VmState, Vec<Vec<u8>>), StateIoError> {
    let layout = vmstate::layout(vcpus, drives);
    let mut slots: Vec<Slot> = layout.iter().map(|_| Slot::default()).collect();
    let mut capture_slots: Vec<Slot> = captured.iter().map(|_| Slot::default()).collect();
    {
        let mut reg = Registry::new(vmstate::MACHINE);
        reg.page_size = PAGE_SIZE;
        reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, ram_state);
        if let Some((idstr, version, handler)) = extra {
            reg.register_iterative(idstr, 0, version, handler);
        }
        for ((idstr, inst, vmsd), slot) in layout.iter().zip(slots.iter_mut()) {
            reg.register_device(idstr, *inst, vmsd.clone(), slot);
        }
        for (c, slot) in captured.iter().zip(capture_slots.iter_mut()) {
            let vmsd = Arc::new(vmstate::capture_vmsd(c.size));
            reg.register_device(vmstate::CAPTURE_IDSTR, instance(c.index), vmsd, slot);
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
    let state = vmstate::from_sections(vcpus, drives, found)?;
    let mut contents = Vec::with_capacity(captured.len());
    for (c, slot) in captured.iter().zip(&capture_slots) {
        let v = slot
            .0
            .as_ref()
            .ok_or_else(|| VmStateMapError::MissingSection {
                idstr: vmstate::CAPTURE_IDSTR.to_string(),
                instance_id: instance(c.index),
            })?;
        contents.push(vmstate::capture_from(v, &c.name, c.size)?);
    }
    Ok((state, contents))
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
    fn checking_finds_what_loading_finds_without_ram() {
        let st = state(2, 1);
        let mut ram = vec![0u8; 1 << 20];
        ram[0x10000..0x10004].copy_from_slice(b"tick");
        let mut stream = Vec::new();
        write_state(&st, &ram, &mut stream).unwrap();
        let c = check_state_with(2, 1, &[], 1 << 20, &mut stream.as_slice()).unwrap();
        assert!(c.all_ram);
        assert_eq!(c.state.vcpus, st.vcpus);
        assert_eq!(c.state.devices, st.devices);
        let err = check_state_with(1, 1, &[], 1 << 20, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("'cpu' 1"), "{err}");
        let err = check_state_with(2, 1, &[], 1 << 19, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("Length mismatch"), "{err}");
        let cut = &stream[..stream.len() / 2];
        assert!(check_state_with(2, 1, &[], 1 << 20, &mut &cut[..]).is_err());
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

    #[test]
    fn captured_drives_round_trip_and_are_checked() {
        let cap = |index, data: Vec<u8>| CapturedDrive {
            index,
            name: format!("drive{index}"),
            data,
        };
        let mut stream = Vec::new();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        write_state_with(
            &state(1, 2),
            &vec![0u8; 1 << 20],
            &[cap(1, pattern.clone())],
            &mut stream,
        )
        .unwrap();
        let mut ram = vec![0u8; 1 << 20];
        let spec = |size| CaptureSpec {
            index: 1,
            name: "drive1".into(),
            size,
        };
        let want = [spec(8192)];
        let (_, back) = read_state_with(1, 2, &want, &mut ram, &mut stream.as_slice()).unwrap();
        assert_eq!(back, [pattern]);
        // Another size: refused by the codec's `size` check before the data is read.
        let err =
            read_state_with(1, 2, &[spec(4096)], &mut ram, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("size"), "{err}");
        // Not captured here: an unknown section.
        let err = read_state(1, 2, &mut ram, &mut stream.as_slice()).unwrap_err();
        assert!(err.to_string().contains("vmsnap-capture"), "{err}");
        // Captured here but not in the stream: missing.
        let mut plain = Vec::new();
        write_state(&state(1, 2), &vec![0u8; 1 << 20], &mut plain).unwrap();
        let err = read_state_with(1, 2, &want, &mut ram, &mut plain.as_slice()).unwrap_err();
        assert!(
            err.to_string()
                .contains("'vmsnap-capture' instance 1 is missing"),
            "{err}"
        );
    }
}
