//! The VM's state as migration-stream sections: one VMState description per device, and the
//! conversions between [`VmState`] and the codec's value model.
//!
//! ```text
//!  section            instance      fields
//!  cpu                vCPU index    GPRs by name, rip, rflags, segments (cs … ldt), gdt, idt,
//!                                   cr0 … cr8, efer, apic_base, interrupt_bitmap, fpu, xsave, xcrs,
//!                                   nr_msrs + msrs[{index, data}], lapic, events, mp_state,
//!                                   debugregs, tsc_khz
//!  i8259              0 / 1         chip (KVM_GET_IRQCHIP image)
//!  ioapic             0             chip
//!  i8254              0             pit (KVM_GET_PIT2 image)
//!  kvmclock           0             clock, flags
//!  serial             0             divider, rbr, ier, iir, lcr, mcr, lsr, msr, scr, fcr
//!  vmsnap-pvblock     drive index   sector, addr, count, status
//!  vmsnap-control     0             check_requested, fault
//!  vmsnap-capture     drive index   name_len, name, size, data (capture=on drives only)
//! ```
//!
//! KVM structures without an obvious field-by-field QEMU equivalent travel as fixed-size
//! buffers holding the structure's bytes (little-endian, as KVM lays them out). Field lists
//! are written down in `formats/vmstate/`.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};

use super::devices::control::ControlState;
use super::devices::pvblock::PvBlockState;
use super::devices::serial::SerialState;
use super::devices::DeviceStates;
use super::vcpu::{VcpuState, MAX_MSRS, XSAVE_WORDS};
use super::vm::VmArchState;
use super::VmState;
use crate::migration::vmstate::{Count, Field, FieldType, VMStateDescription};
use crate::migration::Value;

/// CONFIGURATION machine name of streams we write; streams naming another are refused.
pub const MACHINE: &str = "vmsnap-counter-v1";

/// Errors converting decoded sections back into a [`VmState`].
#[derive(Debug, thiserror::Error)]
pub enum VmStateMapError {
    /// A section this VM needs is not in the stream.
    #[error("section '{idstr}' instance {instance_id} is missing from the VM state")]
    MissingSection {
        /// Section idstr.
        idstr: String,
        /// Instance id.
        instance_id: u32,
    },
    /// A field is missing or has the wrong type or size.
    #[error("section '{idstr}': field '{field}' is missing or malformed")]
    BadField {
        /// Section idstr.
        idstr: String,
        /// Field name.
        field: String,
    },
    /// A count is out of range.
    #[error("section '{idstr}': {what}")]
    BadValue {
        /// Section idstr.
        idstr: String,
        /// What is wrong, with the value.
        what: String,
    },
}

/// One device's part of the state, ready for the codec.
#[derive(Debug, Clone)]
pub struct Section {
    /// Section idstr.
    pub idstr: &'static str,
    /// Instance id.
    pub instance_id: u32,
    /// The description.
    pub vmsd: Arc<VMStateDescription>,
    /// The state.
    pub value: Value,
}

/// Plain KVM structures whose bytes we copy.
///
/// # Safety
/// Implementors must be `repr(C)` structures of integers (and arrays/unions of them) with no
/// implicit padding, so that every byte is initialised and every bit pattern is valid.
unsafe trait Pod: Copy + Default {}

// SAFETY: all of these are kvm-bindings `repr(C)` structures made only of integer fields,
// integer arrays, nested such structures and unions of integer arrays, with explicit padding
// fields; any bit pattern is a valid value.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above (integer arrays only).
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above (a char array).
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above (chip id, padding, union of integer arrays).
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}

fn pod_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` guarantees every byte of the value is initialised; the slice covers
    // exactly the value and lives no longer than the borrow of `v`.
    let bytes = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) };
    bytes.to_vec()
}

fn pod_from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked to be exactly `size_of::<T>()`, the read is unaligned,
    // and `T: Pod` makes every bit pattern a valid `T`.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

const GPRS: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

fn gprs(r: &kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

fn buffer<T>(name: &str) -> Field {
    Field::new(name, FieldType::Buffer(size_of::<T>() as u32))
}

/// The `cpu` section's description.
pub fn cpu_vmsd() -> VMStateDescription {
    let msr = Arc::new(
        VMStateDescription::new("cpu/msr", 1, 1)
            .field(Field::uint("index", 4))
            .field(Field::uint("data", 8)),
    );
    let mut d = VMStateDescription::new("cpu", 1, 1);
    for name in GPRS {
        d = d.field(Field::uint(name, 8));
    }
    d = d
        .field(Field::uint("rip", 8))
        .field(Field::uint("rflags", 8));
    let seg = Arc::new(segment_vmsd());
    for name in SEGMENTS {
        d = d.field(Field::structure(name, Arc::clone(&seg)));
    }
    let dt = Arc::new(
        VMStateDescription::new("cpu/dtable", 1, 1)
            .field(Field::uint("base", 8))
            .field(Field::uint("limit", 2)),
    );
    d = d
        .field(Field::structure("gdt", Arc::clone(&dt)))
        .field(Field::structure("idt", dt));
    for name in CONTROL_REGS {
        d = d.field(Field::uint(name, 8));
    }
    d.field(Field::uint("interrupt_bitmap", 8).count(Count::Fixed(4)))
        .field(buffer::<kvm_fpu>("fpu"))
        .field(Field::new(
            "xsave",
            FieldType::Buffer(XSAVE_WORDS as u32 * 4),
        ))
        .field(buffer::<kvm_xcrs>("xcrs"))
        .field(Field::uint("nr_msrs", 4))
        .field(Field::structure("msrs", msr).count(Count::FromField("nr_msrs".into())))
        .field(buffer::<kvm_lapic_state>("lapic"))
        .field(buffer::<kvm_vcpu_events>("events"))
        .field(Field::uint("mp_state", 4))
        .field(buffer::<kvm_debugregs>("debugregs"))
        .field(Field::uint("tsc_khz", 4))
}

const SEGMENTS: [&str; 8] = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"];
const CONTROL_REGS: [&str; 7] = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"];
const SEGMENT_U8: [&str; 9] = [
    "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable",
];

fn segment_vmsd() -> VMStateDescription {
    let mut d = VMStateDescription::new("cpu/segment", 1, 1)
        .field(Field::uint("base", 8))
        .field(Field::uint("limit", 4))
        .field(Field::uint("selector", 2));
    for name in SEGMENT_U8 {
        d = d.field(Field::uint(name, 1));
    }
    d
}

fn segments(s: &kvm_sregs) -> [&kvm_segment; 8] {
    [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt]
}

fn segment_value(g: &kvm_segment) -> Value {
    let mut f = vec![
        ("base".to_string(), Value::u64(g.base)),
        ("limit".into(), Value::u32(g.limit)),
        ("selector".into(), Value::u16(g.selector)),
    ];
    let bytes = [
        g.type_, g.present, g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable,
    ];
    for (n, b) in SEGMENT_U8.iter().zip(bytes) {
        f.push((n.to_string(), Value::u8(b)));
    }
    Value::Struct(f)
}

fn dtable_value(t: &kvm_dtable) -> Value {
    Value::structure([("base", Value::u64(t.base)), ("limit", Value::u16(t.limit))])
}

fn sregs_fields(s: &kvm_sregs) -> Vec<(String, Value)> {
    let mut f: Vec<(String, Value)> = SEGMENTS
        .iter()
        .zip(segments(s))
        .map(|(n, g)| (n.to_string(), segment_value(g)))
        .collect();
    f.push(("gdt".into(), dtable_value(&s.gdt)));
    f.push(("idt".into(), dtable_value(&s.idt)));
    let crs = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base];
    for (n, v) in CONTROL_REGS.iter().zip(crs) {
        f.push((n.to_string(), Value::u64(v)));
    }
    f.push((
        "interrupt_bitmap".into(),
        Value::Array(s.interrupt_bitmap.iter().map(|&w| Value::u64(w)).collect()),
    ));
    f
}

fn segment_from(r: &Reader<'_>, name: &str) -> Result<kvm_segment, VmStateMapError> {
    let v = r.v.get(name).ok_or_else(|| r.bad(name))?;
    let g = Reader { idstr: r.idstr, v };
    let b = |n: &str| g.u8(n);
    Ok(kvm_segment {
        base: g.uint("base")?,
        limit: g.u32("limit")?,
        selector: u16::try_from(g.uint("selector")?).map_err(|_| r.bad(name))?,
        type_: b("type")?,
        present: b("present")?,
        dpl: b("dpl")?,
        db: b("db")?,
        s: b("s")?,
        l: b("l")?,
        g: b("g")?,
        avl: b("avl")?,
        unusable: b("unusable")?,
        padding: 0,
    })
}

fn dtable_from(r: &Reader<'_>, name: &str) -> Result<kvm_dtable, VmStateMapError> {
    let v = r.v.get(name).ok_or_else(|| r.bad(name))?;
    let t = Reader { idstr: r.idstr, v };
    Ok(kvm_dtable {
        base: t.uint("base")?,
        limit: u16::try_from(t.uint("limit")?).map_err(|_| r.bad(name))?,
        padding: [0; 3],
    })
}

fn sregs_from(r: &Reader<'_>) -> Result<kvm_sregs, VmStateMapError> {
    let bitmap =
        r.v.get("interrupt_bitmap")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 4)
            .ok_or_else(|| r.bad("interrupt_bitmap"))?;
    let mut interrupt_bitmap = [0u64; 4];
    for (w, v) in interrupt_bitmap.iter_mut().zip(bitmap) {
        *w = v.as_u64().ok_or_else(|| r.bad("interrupt_bitmap"))?;
    }
    Ok(kvm_sregs {
        cs: segment_from(r, "cs")?,
        ds: segment_from(r, "ds")?,
        es: segment_from(r, "es")?,
        fs: segment_from(r, "fs")?,
        gs: segment_from(r, "gs")?,
        ss: segment_from(r, "ss")?,
        tr: segment_from(r, "tr")?,
        ldt: segment_from(r, "ldt")?,
        gdt: dtable_from(r, "gdt")?,
        idt: dtable_from(r, "idt")?,
        cr0: r.uint("cr0")?,
        cr2: r.uint("cr2")?,
        cr3: r.uint("cr3")?,
        cr4: r.uint("cr4")?,
        cr8: r.uint("cr8")?,
        efer: r.uint("efer")?,
        apic_base: r.uint("apic_base")?,
        interrupt_bitmap,
    })
}

fn chip_vmsd(name: &str) -> VMStateDescription {
    VMStateDescription::new(name, 1, 1).field(buffer::<kvm_irqchip>("chip"))
}

fn pit_vmsd() -> VMStateDescription {
    VMStateDescription::new("i8254", 1, 1).field(buffer::<kvm_pit_state2>("pit"))
}

fn kvmclock_vmsd() -> VMStateDescription {
    VMStateDescription::new("kvmclock", 1, 1)
        .field(Field::uint("clock", 8))
        .field(Field::uint("flags", 4))
}

const SERIAL_U8: [&str; 9] = [
    "rbr", "ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "fcr",
];

fn serial_vmsd() -> VMStateDescription {
    let mut d = VMStateDescription::new("serial", 1, 1).field(Field::uint("divider", 2));
    for name in SERIAL_U8 {
        d = d.field(Field::uint(name, 1));
    }
    d
}

fn pvblock_vmsd() -> VMStateDescription {
    VMStateDescription::new("vmsnap-pvblock", 1, 1)
        .field(Field::uint("sector", 8))
        .field(Field::uint("addr", 4))
        .field(Field::uint("count", 4))
        .field(Field::uint("status", 4))
}

fn control_vmsd() -> VMStateDescription {
    VMStateDescription::new("vmsnap-control", 1, 1)
        .field(Field::bool("check_requested"))
        .field(Field::uint("fault", 1))
}

/// The descriptions of every device section of a VM with `vcpus` vCPUs and `drives` drives,
/// in stream order: `(idstr, instance_id, description)`.
pub fn layout(vcpus: usize, drives: usize) -> Vec<(&'static str, u32, Arc<VMStateDescription>)> {
    let cpu = Arc::new(cpu_vmsd());
    let pvblock = Arc::new(pvblock_vmsd());
    let mut out = Vec::new();
    for i in 0..vcpus {
        out.push(("cpu", i as u32, Arc::clone(&cpu)));
    }
    out.push(("i8259", 0, Arc::new(chip_vmsd("i8259"))));
    out.push(("i8259", 1, Arc::new(chip_vmsd("i8259"))));
    out.push(("ioapic", 0, Arc::new(chip_vmsd("ioapic"))));
    out.push(("i8254", 0, Arc::new(pit_vmsd())));
    out.push(("kvmclock", 0, Arc::new(kvmclock_vmsd())));
    out.push(("serial", 0, Arc::new(serial_vmsd())));
    for i in 0..drives {
        out.push(("vmsnap-pvblock", i as u32, Arc::clone(&pvblock)));
    }
    out.push(("vmsnap-control", 0, Arc::new(control_vmsd())));
    out
}

fn cpu_value(v: &VcpuState) -> Value {
    let mut fields: Vec<(String, Value)> = GPRS
        .iter()
        .zip(gprs(&v.regs))
        .map(|(n, x)| (n.to_string(), Value::u64(x)))
        .collect();
    let msrs = v
        .msrs
        .iter()
        .map(|m| Value::structure([("index", Value::u32(m.index)), ("data", Value::u64(m.data))]))
        .collect();
    let xsave: Vec<u8> = v.xsave.iter().flat_map(|w| w.to_le_bytes()).collect();
    fields.push(("rip".to_string(), Value::u64(v.regs.rip)));
    fields.push(("rflags".to_string(), Value::u64(v.regs.rflags)));
    fields.extend(sregs_fields(&v.sregs));
    fields.extend([
        ("fpu".to_string(), Value::Bytes(pod_bytes(&v.fpu))),
        ("xsave".into(), Value::Bytes(xsave)),
        ("xcrs".into(), Value::Bytes(pod_bytes(&v.xcrs))),
        ("nr_msrs".into(), Value::u32(v.msrs.len() as u32)),
        ("msrs".into(), Value::Array(msrs)),
        ("lapic".into(), Value::Bytes(pod_bytes(&v.lapic))),
        ("events".into(), Value::Bytes(pod_bytes(&v.events))),
        ("mp_state".into(), Value::u32(v.mp_state.mp_state)),
        ("debugregs".into(), Value::Bytes(pod_bytes(&v.debug_regs))),
        ("tsc_khz".into(), Value::u32(v.tsc_khz)),
    ]);
    Value::Struct(fields)
}

/// Converts a captured state into sections, in the order of [`layout`].
pub fn to_sections(state: &VmState) -> Vec<Section> {
    let lay = layout(state.vcpus.len(), state.devices.blocks.len());
    let a = &state.arch;
    let d = &state.devices;
    let s = &d.serial;
    let mut values: Vec<Value> = state.vcpus.iter().map(cpu_value).collect();
    values.push(Value::structure([(
        "chip",
        Value::Bytes(pod_bytes(&a.pic_master)),
    )]));
    values.push(Value::structure([(
        "chip",
        Value::Bytes(pod_bytes(&a.pic_slave)),
    )]));
    values.push(Value::structure([(
        "chip",
        Value::Bytes(pod_bytes(&a.ioapic)),
    )]));
    values.push(Value::structure([("pit", Value::Bytes(pod_bytes(&a.pit)))]));
    values.push(Value::structure([
        ("clock", Value::u64(a.clock.clock)),
        ("flags", Value::u32(a.clock.flags)),
    ]));
    let mut serial = vec![("divider".to_string(), Value::u16(s.divider))];
    for (n, x) in SERIAL_U8.iter().zip([
        s.rbr, s.ier, s.iir, s.lcr, s.mcr, s.lsr, s.msr, s.scr, s.fcr,
    ]) {
        serial.push((n.to_string(), Value::u8(x)));
    }
    values.push(Value::Struct(serial));
    for b in &d.blocks {
        values.push(Value::structure([
            ("sector", Value::u64(b.sector)),
            ("addr", Value::u32(b.addr)),
            ("count", Value::u32(b.count)),
            ("status", Value::u32(b.status)),
        ]));
    }
    values.push(Value::structure([
        ("check_requested", Value::Bool(d.control.check_requested)),
        ("fault", Value::u8(d.control.fault)),
    ]));
    lay.into_iter()
        .zip(values)
        .map(|((idstr, instance_id, vmsd), value)| Section {
            idstr,
            instance_id,
            vmsd,
            value,
        })
        .collect()
}

/// Reads fields of one decoded section, naming the section in errors.
struct Reader<'v> {
    idstr: &'static str,
    v: &'v Value,
}

impl Reader<'_> {
    fn bad(&self, field: &str) -> VmStateMapError {
        VmStateMapError::BadField {
            idstr: self.idstr.to_string(),
            field: field.to_string(),
        }
    }

    fn uint(&self, field: &str) -> Result<u64, VmStateMapError> {
        self.v
            .get(field)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.bad(field))
    }

    fn u32(&self, field: &str) -> Result<u32, VmStateMapError> {
        u32::try_from(self.uint(field)?).map_err(|_| self.bad(field))
    }

    fn u8(&self, field: &str) -> Result<u8, VmStateMapError> {
        u8::try_from(self.uint(field)?).map_err(|_| self.bad(field))
    }

    fn bytes(&self, field: &str) -> Result<&[u8], VmStateMapError> {
        self.v
            .get(field)
            .and_then(Value::as_bytes)
            .ok_or_else(|| self.bad(field))
    }

    fn pod<T: Pod>(&self, field: &str) -> Result<T, VmStateMapError> {
        pod_from_bytes(self.bytes(field)?).ok_or_else(|| self.bad(field))
    }
}

fn cpu_from(r: &Reader<'_>) -> Result<VcpuState, VmStateMapError> {
    let mut g = [0u64; 16];
    for (slot, name) in g.iter_mut().zip(GPRS) {
        *slot = r.uint(name)?;
    }
    let regs = kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rsp: g[6],
        rbp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: r.uint("rip")?,
        rflags: r.uint("rflags")?,
    };
    let xsave_bytes = r.bytes("xsave")?;
    if xsave_bytes.len() != XSAVE_WORDS * 4 {
        return Err(r.bad("xsave"));
    }
    let xsave = xsave_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let list =
        r.v.get("msrs")
            .and_then(Value::as_array)
            .ok_or_else(|| r.bad("msrs"))?;
    if list.len() > MAX_MSRS {
        return Err(VmStateMapError::BadValue {
            idstr: r.idstr.to_string(),
            what: format!("{} MSRs, at most {MAX_MSRS} accepted", list.len()),
        });
    }
    let mut msrs = Vec::with_capacity(list.len());
    for m in list {
        let mr = Reader {
            idstr: r.idstr,
            v: m,
        };
        msrs.push(kvm_msr_entry {
            index: mr.u32("index")?,
            data: mr.uint("data")?,
            ..Default::default()
        });
    }
    Ok(VcpuState {
        regs,
        sregs: sregs_from(r)?,
        fpu: r.pod("fpu")?,
        xsave,
        xcrs: r.pod("xcrs")?,
        msrs,
        lapic: r.pod("lapic")?,
        events: r.pod("events")?,
        mp_state: kvm_bindings::kvm_mp_state {
            mp_state: r.u32("mp_state")?,
        },
        debug_regs: r.pod("debugregs")?,
        tsc_khz: r.u32("tsc_khz")?,
    })
}

/// Rebuilds the state of a VM with `vcpus` vCPUs and `drives` drives from decoded sections;
/// `find(idstr, instance_id)` returns a section's value if the stream had it.
pub fn from_sections<'v>(
    vcpus: usize,
    drives: usize,
    find: impl Fn(&str, u32) -> Option<&'v Value>,
) -> Result<VmState, VmStateMapError> {
    let get = |idstr: &'static str, instance_id: u32| {
        find(idstr, instance_id).map(|v| Reader { idstr, v }).ok_or(
            VmStateMapError::MissingSection {
                idstr: idstr.to_string(),
                instance_id,
            },
        )
    };
    let mut cpus = Vec::with_capacity(vcpus);
    for i in 0..vcpus {
        cpus.push(cpu_from(&get("cpu", i as u32)?)?);
    }
    let clock = get("kvmclock", 0)?;
    let arch = VmArchState {
        pic_master: get("i8259", 0)?.pod("chip")?,
        pic_slave: get("i8259", 1)?.pod("chip")?,
        ioapic: get("ioapic", 0)?.pod("chip")?,
        pit: get("i8254", 0)?.pod("pit")?,
        clock: kvm_clock_data {
            clock: clock.uint("clock")?,
            flags: clock.u32("flags")?,
            ..Default::default()
        },
    };
    let s = get("serial", 0)?;
    let serial = SerialState {
        divider: u16::try_from(s.uint("divider")?).map_err(|_| s.bad("divider"))?,
        rbr: s.u8("rbr")?,
        ier: s.u8("ier")?,
        iir: s.u8("iir")?,
        lcr: s.u8("lcr")?,
        mcr: s.u8("mcr")?,
        lsr: s.u8("lsr")?,
        msr: s.u8("msr")?,
        scr: s.u8("scr")?,
        fcr: s.u8("fcr")?,
    };
    let mut blocks = Vec::with_capacity(drives);
    for i in 0..drives {
        let b = get("vmsnap-pvblock", i as u32)?;
        blocks.push(PvBlockState {
            sector: b.uint("sector")?,
            addr: b.u32("addr")?,
            count: b.u32("count")?,
            status: b.u32("status")?,
        });
    }
    let c = get("vmsnap-control", 0)?;
    let control = ControlState {
        check_requested: c
            .v
            .get("check_requested")
            .and_then(Value::as_bool)
            .ok_or_else(|| c.bad("check_requested"))?,
        fault: c.u8("fault")?,
    };
    Ok(VmState {
        vcpus: cpus,
        arch,
        devices: DeviceStates {
            serial,
            blocks,
            control,
        },
    })
}

/// Section idstr of a `capture=on` raw drive's contents (instance id = drive index).
pub const CAPTURE_IDSTR: &str = "vmsnap-capture";

/// Largest drive whose contents may travel in the VM state (`capture=on`).
pub const MAX_CAPTURE_BYTES: u64 = 64 << 20;

/// The `vmsnap-capture` description for a drive of `size` bytes (at most
/// [`MAX_CAPTURE_BYTES`]): `name_len` (uint8), `name` (buffer of `name_len`), `size` (uint64,
/// must equal the drive's on load), `data` (buffer of `size`).
pub fn capture_vmsd(size: u64) -> VMStateDescription {
    let len = u32::try_from(size.min(MAX_CAPTURE_BYTES)).unwrap_or(0);
    VMStateDescription::new(CAPTURE_IDSTR, 1, 1)
        .field(Field::uint("name_len", 1))
        .field(Field::new(
            "name",
            FieldType::VBuffer {
                len_field: "name_len".into(),
            },
        ))
        .field(Field::new(
            "size",
            FieldType::Equal {
                size: 8,
                signed: false,
                expected: Some(size),
            },
        ))
        .field(Field::new("data", FieldType::Buffer(len)))
}

/// The `vmsnap-capture` value of drive `name` holding `data` (names longer than 255 bytes
/// are cut; ours are `driveN`).
pub fn capture_value(name: &str, data: &[u8]) -> Value {
    let name = &name.as_bytes()[..name.len().min(255)];
    Value::structure([
        ("name_len", Value::u8(name.len() as u8)),
        ("name", Value::Bytes(name.to_vec())),
        ("size", Value::u64(data.len() as u64)),
        ("data", Value::Bytes(data.to_vec())),
    ])
}

/// Checks a decoded `vmsnap-capture` section against the drive it is for (name and size)
/// and returns its contents.
pub fn capture_from(v: &Value, name: &str, size: u64) -> Result<Vec<u8>, VmStateMapError> {
    let r = Reader {
        idstr: CAPTURE_IDSTR,
        v,
    };
    let saved_name = r.bytes("name")?;
    if saved_name != name.as_bytes() {
        return Err(VmStateMapError::BadValue {
            idstr: CAPTURE_IDSTR.to_string(),
            what: format!(
                "saved for drive '{}', not '{name}'",
                String::from_utf8_lossy(saved_name)
            ),
        });
    }
    let saved_size = r.uint("size")?;
    let data = r.bytes("data")?;
    if saved_size != size || data.len() as u64 != size {
        return Err(VmStateMapError::BadValue {
            idstr: CAPTURE_IDSTR.to_string(),
            what: format!(
                "drive '{name}' holds {saved_size:#x} bytes in the VM state but is {size:#x} bytes"
            ),
        });
    }
    Ok(data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_bytes_round_trip_and_check_the_length() {
        let s = kvm_sregs {
            cr3: 0x8000,
            cs: kvm_bindings::kvm_segment {
                selector: 0x23,
                ..Default::default()
            },
            ..Default::default()
        };
        let b = pod_bytes(&s);
        assert_eq!(b.len(), size_of::<kvm_sregs>());
        let back: kvm_sregs = pod_from_bytes(&b).unwrap();
        assert_eq!((back.cr3, back.cs.selector), (0x8000, 0x23));
        assert!(pod_from_bytes::<kvm_sregs>(&b[1..]).is_none());
    }

    #[test]
    fn layout_names_every_device_once() {
        let lay = layout(2, 1);
        let names: Vec<String> = lay.iter().map(|(n, i, _)| format!("{n}/{i}")).collect();
        assert_eq!(
            names,
            [
                "cpu/0",
                "cpu/1",
                "i8259/0",
                "i8259/1",
                "ioapic/0",
                "i8254/0",
                "kvmclock/0",
                "serial/0",
                "vmsnap-pvblock/0",
                "vmsnap-control/0"
            ]
        );
    }

    #[test]
    fn a_missing_section_is_named() {
        let err = from_sections(1, 0, |_, _| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "section 'cpu' instance 0 is missing from the VM state"
        );
    }

    #[test]
    fn capture_sections_check_name_and_size() {
        let v = capture_value("drive1", &[1, 2, 3, 4]);
        assert_eq!(capture_from(&v, "drive1", 4).unwrap(), [1, 2, 3, 4]);
        let err = capture_from(&v, "drive2", 4).unwrap_err();
        assert!(err.to_string().contains("'drive1', not 'drive2'"), "{err}");
        let err = capture_from(&v, "drive1", 8).unwrap_err();
        assert!(err.to_string().contains("0x4 bytes"), "{err}");
        assert_eq!(capture_vmsd(4).fields.len(), 4);
    }
}
